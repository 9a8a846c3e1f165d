"""Stage 1, `bebop pretrain-mtp`: MTP draft heads trained on a frozen trunk.

Data (`bebop_jax.data`) is laid into fixed rows [R, T]. The trunk is frozen, so it runs once over every
row and its final hidden states are cached in bf16 (`bebop_jax.trunk_cache`: `{pretrain.cache_dir}`, shared by
runs on the same rows; `pretrain.cache_hidden=false` runs the trunk in every step instead, rounding to
bf16 the same way). A train step then costs only the heads:

    h^0 = cached trunk hidden [B,T,D]  ->  teacher-forced h^1..h^K over the whole row (MTP blocks attend
    to the prompt too)  ->  the origins that count for some step gathered, a static number per row (the
    data's maximum: no vocabulary projections are spent on prompt or padding)  ->  `losses.draft_loss`

with targets h^trunk_{t+k} and tokens x_{t+k+1}; gradients reach only the MTP parameters. AdamW with
linear warm-up and cosine decay, global-norm clipping; one jitted step with the train state donated.
The step has no randomness (the draft losses are analytic), so a run's only RNG use is the head
initialisation from `pretrain.seed` and its only other state is the grain iterator's: orbax
checkpoints hold both (state pytree + iterator + meta) and a resumed run repeats the uninterrupted
run's losses exactly. SIGTERM (a TPU VM's preemption) checkpoints the step under way and raises
`distributed.Preempted` (the CLI exits 143); running it again resumes. tensorboardX scalars, a tqdm
bar; a non-finite loss stops the run naming the step.

Devices: the step runs on the `mesh.*` mesh over every device of every process (`bebop pretrain-mtp`
starts `jax.distributed` first), jitted with shardings: the heads and their AdamW moments laid out by
their logical axes, the frozen embedding and vocabulary rows by (vocab, embed), batch rows over the
batch axes. Each process reads only its rows of every global batch (`data.row_iterator` on the mesh),
which hold the one-process batch's rows in another order, so a sharded run repeats a one-device run's
losses up to rounding. Process 0 computes the caches while the others wait, then they read its files
(or, where cache_dir is not a disk they share, make their own copy); every process writes its own
shards and iterator state into one checkpoint; logs, the bar and summary.json come from process 0.

Head initialisation (`pretrain.init`): "trunk" copies the trunk's last layer into each MTP block and
the trunk's final norm into each output norm, with fc = [I ; I] (the sum of the normed embedding of
x_{t+k} and the normed previous hidden state); "random" is `init_mtp_params`. On SmolLM2 neither
accepts anything at step 0 (alpha ~0.01), but over the same 20 e2e-TV steps (same batches) the trunk
copy reached a mean loss of -0.054 over steps 16-20 against -0.031 from random (fc scaled x20 to
the trunk's residual RMS: -0.046), so "trunk" is the default. A path continues from trained heads (a run or HF dir), as the paper
fine-tunes existing (CE-trained) MTP heads with its TV loss.

Draft sub-vocabulary (`pretrain.draft_vocab` = Vd > 0): the heads learn to draft from the Vd ids most
frequent in the training completions (+ EOS), with p kept exact (`losses` docstring). What it needs
beyond the hidden cache is each position's full-vocabulary log-normaliser logZ at the loss temperature,
[R,T] f32, computed once from the cached states (`{cache_dir}/logz_*.npy`). A step then projects onto
Vd rows instead of V: on SmolLM2 (V=49152, Vd=4096) the vocabulary cost falls 12x and a step is
bounded by the MTP block instead. The ids are saved with the heads, and the engine drafts from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from bebop_jax import data as data_lib
from bebop_jax import distributed, sharding, trunk_cache
from bebop_jax.checkpoint import RunCheckpoints, load_mtp_heads
from bebop_jax.config import Config, to_dict
from bebop_jax.losses import draft_loss
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.model.mtp import MTPConfig, init_mtp_params, teacher_forced_hidden, vocab_matrix
from bebop_jax.model.transformer import TransformerConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates done
    params: dict  # MTP parameters
    opt_state: optax.OptState


def draft_vocabulary(rows: data_lib.Rows, vocab_size: int, size: int, always: tuple[int, ...]) -> np.ndarray:
    """The `size` ids most frequent among the rows' completion tokens (+ `always`), [Vd] int32 ascending."""
    from bebop_jax.speculative import frequent_tokens

    return frequent_tokens([rows.tokens[rows.completion]], vocab_size, size, always)


def vocab_index(draft_ids, vocab_size: int) -> np.ndarray:
    """[V] int32: each id's row in the draft vocabulary, -1 outside it."""
    index = np.full(vocab_size, -1, np.int32)
    index[np.asarray(draft_ids)] = np.arange(len(draft_ids), dtype=np.int32)
    return index


def frozen_inputs(cfg: TransformerConfig, trunk_params: dict, draft_ids=None) -> dict:
    """The trunk matrices `train_step` reads: embedding [V,D] and w_vocab [V,D], or with a draft
    sub-vocabulary w_vocab = its rows [Vd,D] and vocab_index [V] (`vocab_index`)."""
    w_vocab = vocab_matrix(cfg, trunk_params)
    if draft_ids is None:
        return {"embedding": trunk_params["embedding"], "w_vocab": w_vocab}
    return {"embedding": trunk_params["embedding"], "w_vocab": w_vocab[jnp.asarray(draft_ids)],
            "vocab_index": vocab_index(draft_ids, cfg.vocab_size)}


# ---------------------------------------------------------------------------------------------
# Heads, loss and the train step


def init_heads(model: LoadedModel, mtp: MTPConfig, init: str, key: jax.Array) -> dict:
    """MTP parameters: random, or ("trunk") blocks from the trunk's last layer (see the module docstring)."""
    params = init_mtp_params(model.cfg, mtp, key)
    if init == "random":
        return params
    D = model.cfg.hidden_size
    last = model.params[f"layers_{model.cfg.num_layers - 1}"]
    eye = jnp.eye(D, dtype=jnp.float32)
    for i in range(mtp.num_layers):
        layer = dict(params[f"layers_{i}"])
        layer["block"] = jax.tree.map(jnp.array, last)
        layer["norm"] = {"scale": jnp.array(model.params["final_norm"]["scale"])}
        layer["fc"] = jnp.concatenate([eye, eye], axis=1)  # [D, 2D]: embedding columns, then hidden columns
        params[f"layers_{i}"] = layer
    return params


def draft_inputs(cfg: TransformerConfig, mtp: MTPConfig, mtp_params, embedding, batch, num_origins: int,
                 vocab_index=None):
    """The inputs of `draft_loss` for a batch of rows, at the origins that count for some step.

    batch: hidden [B,T,D] (trunk, bf16), tokens, positions, segment_ids [B,T], completion [B,T] bool,
    and with a draft sub-vocabulary target_logz [B,T] (`trunk_cache.full_logz`); vocab_index [V] (`vocab_index`).
    Returns h_drafts, h_targets [K, B*G, D], targets [K, B*G] (rows of the draft vocabulary when
    vocab_index is given), masks [K, B*G] and target_logz [K, B*G] (None without a sub-vocabulary), with
    G = num_origins >= every row's count of such origins (the gather is exact; fill entries point at
    T-1, masked for all k).
    """
    K = mtp.num_steps
    h0 = batch["hidden"].astype(jnp.float32)  # [B,T,D]
    tokens = batch["tokens"]  # [B,T]
    B, T = tokens.shape
    emb = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)  # [B,T,D]
    drafts = teacher_forced_hidden(cfg, mtp, mtp_params, h0, emb, batch["positions"], batch["segment_ids"])
    masks = data_lib.loss_masks(batch["completion"], batch["segment_ids"], K)  # [K,B,T]
    origins = jax.vmap(lambda m: jnp.nonzero(m, size=num_origins, fill_value=T - 1)[0])(jnp.any(masks, 0))  # [B,G]

    def gather(x, offset):  # x [B,T,...] at origins + offset -> [B*G, ...]
        idx = jnp.minimum(origins + offset, T - 1)  # [B,G]
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
        out = jnp.take_along_axis(x, idx, axis=1)
        return out.reshape((B * num_origins,) + x.shape[2:])

    h_drafts = jnp.stack([gather(drafts[k - 1], 0) for k in range(1, K + 1)])  # [K,B*G,D]
    h_targets = jnp.stack([gather(h0, k) for k in range(1, K + 1)])  # [K,B*G,D]: h^trunk_{t+k}
    targets = jnp.stack([gather(tokens, k + 1) for k in range(1, K + 1)])  # [K,B*G]: x_{t+k+1}
    loss_masks = jnp.stack([gather(masks[k - 1], 0) for k in range(1, K + 1)])  # [K,B*G]
    target_logz = None
    if vocab_index is not None:
        targets = jnp.take(vocab_index, targets)
        target_logz = jnp.stack([gather(batch["target_logz"], k) for k in range(1, K + 1)])  # [K,B*G]
    return h_drafts, h_targets, targets, loss_masks, target_logz


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static settings of the train step (hashable: equal settings share one compiled step)."""

    loss: str
    temperature: float
    num_origins: int  # origins gathered per row (`draft_inputs`)
    learning_rate: float
    warmup_steps: int
    steps: int
    weight_decay: float
    grad_clip: float

    @classmethod
    def from_config(cls, pc, num_origins: int) -> "StepSettings":
        return cls(pc.loss, pc.temperature, num_origins, pc.learning_rate, pc.warmup_steps, pc.steps,
                   pc.weight_decay, pc.grad_clip)

    def schedule(self) -> optax.Schedule:
        """Linear warm-up to the peak learning rate, then cosine decay to 10% of it at `steps`."""
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.warmup_steps,
                                                  max(self.steps, self.warmup_steps + 1), self.learning_rate * 0.1)

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW (weight decay on matrices only) on `schedule`, after global-norm clipping."""
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
        return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                           optax.adamw(self.schedule(), b1=0.9, b2=0.95, weight_decay=self.weight_decay,
                                       mask=decay_mask))


@functools.partial(jax.jit, static_argnames=("cfg", "mtp", "settings"), donate_argnums=0)
def train_step(state: TrainState, frozen, batch, cfg: TransformerConfig, mtp: MTPConfig, settings: StepSettings):
    """One update of the heads: (state, frozen, batch) -> (state, metrics). The static settings may come
    by position, as a jit with shardings needs (`train`).

    frozen: embedding [V,D], w_vocab [V,D] or the draft vocabulary's rows [Vd,D] with vocab_index [V].
    """

    def loss_fn(params):
        h_d, h_t, targets, masks, logz = draft_inputs(cfg, mtp, params, frozen["embedding"], batch,
                                                      settings.num_origins, frozen.get("vocab_index"))
        return draft_loss(settings.loss, h_d, h_t, targets, masks, frozen["w_vocab"], settings.temperature,
                          target_logz=logz)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = settings.optimizer().update(grads, state.opt_state, state.params)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics


def with_trunk_hidden(trunk, batch, cfg: TransformerConfig, temperature: float, target_logz: bool) -> dict:
    """`batch` with what the caches hold, computed per step (`pretrain.cache_hidden=false`): the trunk's
    hidden states (`trunk_cache.trunk_hidden`) and, for a draft sub-vocabulary, their log-normalisers."""
    hidden = trunk_cache.trunk_hidden(trunk, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=cfg)
    batch = dict(batch, hidden=hidden)
    if target_logz:
        batch["target_logz"] = trunk_cache.full_logz(hidden, vocab_matrix(cfg, trunk), temperature=temperature)
    return batch


# ---------------------------------------------------------------------------------------------
# The loop

# Settings that define a run: resuming with any of them changed is refused.
_RUN_IDENTITY = ("loss", "temperature", "batch_size", "seq_len", "pack", "init", "seed", "learning_rate",
                 "warmup_steps", "weight_decay", "grad_clip", "draft_vocab")


def _run_meta(cfg: Config, model: LoadedModel, mtp: MTPConfig, draft_ids) -> dict:
    return {"mtp": dataclasses.asdict(mtp), "loss": cfg.pretrain.loss, "model": cfg.model.source,
            "draft_ids": None if draft_ids is None else [int(i) for i in draft_ids],
            "trunk": {"family": model.cfg.family, "hidden_size": model.cfg.hidden_size,
                      "vocab_size": model.cfg.vocab_size, "num_layers": model.cfg.num_layers},
            "data": cfg.data.corpus or os.path.join(cfg.data.dir, "train"), "extra_data": list(cfg.data.extra_dirs),
            "config": to_dict(cfg)}


def _check_resume(saved: dict, meta: dict, run_dir: str) -> None:
    old, new = saved["config"]["pretrain"], meta["config"]["pretrain"]
    changed = [f"pretrain.{k}" for k in _RUN_IDENTITY if old.get(k) != new.get(k)]
    changed += [k for k in ("mtp", "model", "trunk", "data", "draft_ids") if saved.get(k) != meta.get(k)]
    if saved.get("extra_data", []) != meta["extra_data"]:  # runs from before data.extra_dirs have none
        changed.append("data.extra_dirs")
    if changed:
        raise ValueError(f"pretrain.run_dir '{run_dir}' holds a run with other settings ({', '.join(changed)}); "
                         "choose another run_dir or restore the settings")


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"pretrain-mtp: the loss is {loss} at step {step}; stopping (the last "
                                 "checkpoint is kept; lower pretrain.learning_rate or check the data)")


def _initial_heads(cfg: Config, model: LoadedModel, mtp: MTPConfig, rows: data_lib.Rows):
    """(MTP params, draft ids [Vd] or None) of a fresh run: `pretrain.init` and `pretrain.draft_vocab`.

    Heads continued from a path keep that path's draft vocabulary when `draft_vocab` is its size; another size
    drafts from the `draft_vocab` ids most frequent in this run's rows (0: the full vocabulary), as the heads'
    layers do not depend on it: only the LM-head rows their softmax covers change (heads moving to new data).
    """
    pc = cfg.pretrain

    def frequent_ids():
        if not pc.draft_vocab:
            return None
        eos = model.tokenizer.eos_token_ids if model.tokenizer else ()
        return draft_vocabulary(rows, model.cfg.vocab_size, min(pc.draft_vocab, model.cfg.vocab_size), tuple(eos))

    if pc.init in ("trunk", "random"):
        return init_heads(model, mtp, pc.init, jax.random.key(pc.seed)), frequent_ids()
    try:
        heads = load_mtp_heads(pc.init, model.cfg)
    except FileNotFoundError as e:
        raise ValueError(f"pretrain.init='{pc.init}': expected trunk, random or trained heads ({e})") from None
    if heads.cfg != mtp:
        raise ValueError(f"pretrain.init='{pc.init}' holds heads {heads.cfg}, the config asks for {mtp}")
    size = 0 if heads.draft_ids is None else len(heads.draft_ids)
    ids = heads.draft_ids if pc.draft_vocab == size else frequent_ids()
    return jax.tree.map(jnp.asarray, heads.params), ids


def train(cfg: Config, model: LoadedModel | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) the heads of `cfg` for `pretrain.steps` steps; returns the run summary with
    the per-step losses of this invocation (`history`)."""
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    pc = cfg.pretrain
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.mesh)  # every device of every process: a mesh they cannot form fails first
    lead = jax.process_index() == 0  # the process that shows progress and writes logs and the summary
    progress = progress and lead
    # the training set: the corpus when data.corpus is set, else {data.dir}/train and each extra dir's; shards
    # are read before the model loads, so a missing data set fails fast
    seqs = None if cfg.data.corpus else data_lib.read_split(cfg.data, "train")
    model = model or load_model(cfg.model.source, cfg.model.dtype)
    if seqs is None:
        seqs = data_lib.read_corpus(cfg.data.corpus, model.tokenizer, pc.seq_len)
    rules = sharding.make_rules(mesh, cfg.mesh.rules, sharding.trunk_dims(model.cfg))
    mtp = MTPConfig(cfg.mtp.num_steps, cfg.mtp.num_layers)
    rows = data_lib.layout_rows(seqs, pc.seq_len, pc.pack)
    num_origins = data_lib.max_loss_origins(rows, mtp.num_steps)
    params, draft_ids = _initial_heads(cfg, model, mtp, rows)
    meta = _run_meta(cfg, model, mtp, draft_ids)
    ckpt = RunCheckpoints(pc.run_dir)
    start = ckpt.latest_step()
    if start is not None:  # a run with other settings is refused before the caches are computed
        _check_resume(ckpt.read_meta(start), meta, pc.run_dir)
    w_vocab = vocab_matrix(model.cfg, model.params)
    frozen = frozen_inputs(model.cfg, model.params, draft_ids)
    t0 = time.perf_counter()
    hidden = logz = None
    if pc.cache_hidden:
        hidden, logz = trunk_cache.load(model, rows, None if draft_ids is None else w_vocab, pc, progress)
    cache_seconds = time.perf_counter() - t0
    data_iter = data_lib.row_iterator(data_lib.RowSource(rows, hidden, logz), pc.batch_size, pc.seed, mesh, rules)

    # On the mesh: heads and AdamW moments by their logical axes, the frozen matrices by (vocab, embed),
    # batch rows over the batch axes; the step's metrics replicated, so every process reads them.
    settings = StepSettings.from_config(pc, num_origins)
    new_state = lambda p: TrainState(jnp.int32(0), p, settings.optimizer().init(p))  # noqa: E731
    state_sh = sharding.logical_to_sharding(jax.eval_shape(new_state, sharding.abstract_heads(model.cfg, mtp)),
                                            mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_sh = {k: replicated if k == "vocab_index" else
                 sharding.named_sharding(("vocab", "embed"), v.shape, mesh, rules) for k, v in frozen.items()}
    batch_sh = sharding.batch_sharding((pc.batch_size,), mesh, rules)  # a prefix: every array of a batch
    # the module's functions with static settings by position: later runs in this process reuse the compilation
    step_fn = sharding.sharded_jit(train_step, mesh, rules, in_shardings=(state_sh, frozen_sh, batch_sh),
                                   out_shardings=(state_sh, replicated), donate_argnums=0,
                                   static_argnames=("cfg", "mtp", "settings"))
    state, frozen = jax.device_put(new_state(params), state_sh), jax.device_put(frozen, frozen_sh)
    if hidden is None:
        trunk_sh = sharding.param_shardings(model.cfg, mesh, rules)
        trunk = jax.device_put(model.params, trunk_sh)
        add_hidden = sharding.sharded_jit(with_trunk_hidden, mesh, rules, in_shardings=(trunk_sh, batch_sh),
                                          out_shardings=batch_sh,
                                          static_argnames=("cfg", "temperature", "target_logz"))
    if start is not None:
        state, _ = ckpt.restore(start, state, data_iter)
    start = int(state.step)
    writer = SummaryWriter(os.path.join(pc.run_dir, "tb")) if lead else None
    history, metrics = [], {}
    bar = tqdm(total=pc.steps, initial=start, desc=f"pretrain-mtp {pc.loss}", disable=not progress)
    t_loop = time.perf_counter()
    stopped_at = None  # the step a SIGTERM (a TPU VM's preemption) stopped the run at, after its checkpoint
    with distributed.PreemptionGuard() as guard:
        try:
            for step in range(start + 1, pc.steps + 1):
                batch = distributed.to_global(next(data_iter), pc.batch_size, mesh, rules)
                if hidden is None:
                    batch = add_hidden(trunk, batch, model.cfg, pc.temperature, draft_ids is not None)
                state, metrics = step_fn(state, frozen, batch, model.cfg, mtp, settings)
                loss = float(metrics["loss"])
                _check_finite(loss, step)
                history.append({"step": step, "loss": loss})
                if lead and (step % pc.log_every == 0 or step == pc.steps):
                    m = jax.device_get(metrics)
                    scalars = {"loss": loss, "expected_length": float(m["expected_length"]),
                               "grad_norm": float(m["grad_norm"]),
                               "learning_rate": float(settings.schedule()(step - 1))}
                    scalars |= {f"alpha_{k + 1}": float(a) for k, a in enumerate(m["alpha"])}
                    for name, value in scalars.items():
                        writer.add_scalar(f"train/{name}", value, step)
                    bar.set_postfix(loss=f"{loss:.4f}", a1=f"{scalars['alpha_1']:.3f}",
                                    len=f"{scalars['expected_length']:.3f}")
                bar.update(1)
                stop = guard.should_stop() and step < pc.steps  # every process, at the same step
                if step % pc.checkpoint_every == 0 or step == pc.steps or stop:
                    ckpt.save(step, state, data_iter, meta)  # every process its own shards and iterator
                if stop:
                    stopped_at = step
                    break
            if start == pc.steps == 0:
                ckpt.save(0, state, data_iter, meta)  # steps=0: keep the initial heads
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            ckpt.close()
    if stopped_at is not None:
        raise distributed.Preempted(stopped_at)  # no summary.json: the run is not finished
    train_seconds = time.perf_counter() - t_loop
    last = jax.device_get(metrics)
    summary = {"loss_kind": pc.loss, "steps": pc.steps, "resumed_from": start, "rows": len(rows),
               "init": pc.init, "draft_vocab": None if draft_ids is None else len(draft_ids),
               "origins_per_row": num_origins, "cache_hidden": pc.cache_hidden,
               "hidden_cache_seconds": round(cache_seconds, 2), "train_seconds": round(train_seconds, 2),
               "total_seconds": round(time.perf_counter() - t_start, 2),
               "final": {"loss": history[-1]["loss"] if history else None,
                         "alpha": [float(a) for a in last["alpha"]] if last else None,
                         "expected_length": float(last["expected_length"]) if last else None}}
    if lead:
        with open(os.path.join(pc.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary | {"history": history}

