"""Checkpoints of a training run (orbax), and MTP heads read from a run or an HF directory.

`RunCheckpoints(run_dir)` manages `{run_dir}/checkpoints/{step}/` with three items per step:
`state` (a whole-state pytree: params, optimizer state, step counter, RNG keys), `data` (the grain
iterator's state) and `meta` (JSON: what the state holds, e.g. the MTPConfig, the loss, the trunk).
Saves are asynchronous; `close()` waits for them. Typed PRNG keys are stored as their raw key data
and rebuilt on restore, so a state with keys restores bit-exactly. Used by `bebop pretrain-mtp` now
and by RL later.

`load_mtp_heads(path, trunk)` reads heads shipped in the package, a heads file (`save_heads_file`:
the heads alone, bf16, checked against the trunk they load for), the latest step of a pretraining run
directory, or the Qwen3-Next `mtp.*` tensors of an HF directory (`export_hf_with_mtp` writes one). Heads
trained on a draft sub-vocabulary carry its ids (run meta `draft_ids`; HF tensor `mtp.draft_ids`).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bebop_jax.model import LoadedModel
from bebop_jax.model import tokenizer as tokenizer_lib
from bebop_jax.model import weights as weights_lib
from bebop_jax.model.mtp import MTPConfig, init_mtp_params, mtp_params_from_hf_tensors, mtp_params_to_hf_tensors
from bebop_jax.model.transformer import TransformerConfig


# Recorded in every checkpoint's meta: weight matrices stored [out, in] (`transformer.linear`). Checkpoints
# without it hold [in, out] matrices (bebop-jax before the layout change): heads read from them are converted
# (`from_in_out_layout`); resuming training from them is refused.
WEIGHT_LAYOUT = "out_in"
# Leaf name -> the axis order that takes an [in, out]-layout matrix to ours.
_FROM_IN_OUT = {"wq": (1, 2, 0), "wk": (1, 2, 0), "wv": (1, 2, 0), "wo": (2, 0, 1), "gate": (1, 0), "up": (1, 0),
                "down": (1, 0), "fc": (1, 0), "lm_head": (1, 0)}


def from_in_out_layout(params: dict) -> dict:
    """Trunk or MTP parameters (numpy) saved with [in, out] matrices -> today's [out, in] layout."""
    def convert(path, x):
        name = getattr(path[-1], "key", None)
        return np.ascontiguousarray(np.transpose(x, _FROM_IN_OUT[name])) if name in _FROM_IN_OUT else x
    return jax.tree_util.tree_map_with_path(convert, params)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class RunCheckpoints:
    """orbax CheckpointManager over `{run_dir}/checkpoints`: state pytree + grain iterator + JSON meta."""

    def __init__(self, run_dir: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator: grain.DatasetIterator | None, meta: dict) -> None:
        """Starts an asynchronous save of step `step` (the previous save is finished first)."""
        raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        items = dict(state=ocp.args.StandardSave(raw), meta=ocp.args.JsonSave(meta | {"weight_layout": WEIGHT_LAYOUT}))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, like, data_iterator: grain.DatasetIterator | None = None):
        """(state shaped like the pytree `like`, meta); restores `data_iterator` in place when given.

        numpy leaves of `like` come back as numpy (uncommitted: a jitted step that took fresh, uncommitted
        arrays reuses its compilation), jax.Array leaves with their sharding, keys as keys.
        """
        meta = self.read_meta(step)
        if meta.get("weight_layout") != WEIGHT_LAYOUT:
            raise weights_lib.WeightsError(
                f"checkpoint {self.directory}/{step} holds [in, out] weight matrices (written by bebop-jax before "
                "matrices were stored [out, in]) and cannot be resumed; its heads still load (`--mtp` / "
                "`load_mtp_heads` convert them): export them with `bebop export --heads-only` and start a new run")
        abstract = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(
            jax.random.key_data(x) if _is_key(x) else x), like)
        items = dict(state=ocp.args.StandardRestore(abstract))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = jax.tree.map(lambda x, raw: jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
                             if _is_key(x) else raw, like, out["state"])
        return state, meta

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_raw(self, step: int):
        """(state as saved, as numpy arrays, meta): for reading parameters only, on any devices (the state
        may have been saved sharded over another mesh, by several processes)."""
        saved = self.manager.item_metadata(step)["state"]  # the saved tree: shapes and dtypes
        like = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MTPHeadsCheckpoint(NamedTuple):
    cfg: MTPConfig
    params: dict  # MTP parameters (numpy)
    draft_ids: np.ndarray | None  # [Vd] int32, ascending: the draft sub-vocabulary; None = the full vocabulary


def _draft_ids(ids) -> np.ndarray | None:
    return None if ids is None else np.asarray(ids, np.int32)


# Heads shipped in this package: name -> file under bebop_jax/heads/ (model card beside it).
SHIPPED_HEADS = {"smollm2-135m-instruct-e2e-tv": "smollm2-135m-instruct-e2e-tv.safetensors"}
# The trunk fields a heads file records and checks against the model it is loaded for.
_TRUNK_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim", "qkv_bias", "qk_norm")


def shipped_heads_path(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "heads", SHIPPED_HEADS[name])


def save_heads_file(path: str, trunk: TransformerConfig, mtp: MTPConfig, params: dict,
                    draft_ids: np.ndarray | None, model: str, dtype=jnp.bfloat16) -> None:
    """One safetensors file of the heads alone: Qwen3-Next `mtp.*` tensors in `dtype`, `mtp.draft_ids`,
    and metadata (K, the MTP layers, the trunk it was trained on) that `load_mtp_heads` checks."""
    from safetensors.flax import save_file

    tensors = {k: jnp.asarray(v, dtype) for k, v in mtp_params_to_hf_tensors(trunk, mtp, params).items()}
    if draft_ids is not None:
        tensors["mtp.draft_ids"] = jnp.asarray(draft_ids, jnp.int32)
    meta = {"format": "bebop-mtp-heads", "model": model, "num_steps": str(mtp.num_steps),
            "num_layers": str(mtp.num_layers), "trunk": json.dumps({f: getattr(trunk, f) for f in _TRUNK_FIELDS})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=meta)


def _load_heads_file(path: str, trunk: TransformerConfig | None) -> MTPHeadsCheckpoint:
    from safetensors import SafetensorError, safe_open

    if trunk is None:
        raise ValueError(f"heads file '{path}': give the trunk's config to load it against")
    try:
        with safe_open(path, framework="flax") as f:
            meta = f.metadata() or {}
            tensors = {name: np.asarray(f.get_tensor(name)) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise weights_lib.WeightsError(f"heads file '{path}' is not a readable safetensors file ({e})") from None
    if meta.get("format") != "bebop-mtp-heads":
        raise weights_lib.WeightsError(f"'{path}' is not a bebop heads file (no 'bebop-mtp-heads' metadata); "
                                       "write one with `bebop export --heads-only`")
    recorded = json.loads(meta["trunk"])
    differs = [f"{k}: heads {recorded[k]!r}, model {getattr(trunk, k)!r}" for k in _TRUNK_FIELDS
               if recorded.get(k) != getattr(trunk, k)]
    if differs:
        raise weights_lib.WeightsError(f"heads '{path}' were trained for another trunk ({meta.get('model')}): "
                                       + "; ".join(differs))
    ids = tensors.pop("mtp.draft_ids", None)
    mtp, params = mtp_params_from_hf_tensors(trunk, {k: v.astype(np.float32) for k, v in tensors.items()})
    if mtp.num_layers != int(meta["num_layers"]):
        raise weights_lib.WeightsError(f"heads file '{path}': metadata says {meta['num_layers']} MTP layers, "
                                       f"the tensors hold {mtp.num_layers}")
    return MTPHeadsCheckpoint(MTPConfig(num_steps=int(meta["num_steps"]), num_layers=mtp.num_layers), params,
                              _draft_ids(ids))


def _check_against(heads: MTPHeadsCheckpoint, trunk: TransformerConfig, path: str) -> None:
    """Parameter shapes as the trunk's MTPHeads expect them, draft ids inside its vocabulary: else a clear error."""
    want = jax.eval_shape(lambda: init_mtp_params(trunk, heads.cfg, jax.random.key(0)))
    got_shapes = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(heads.params)}
    problems = []
    for k, v in jax.tree_util.tree_leaves_with_path(want):
        name = jax.tree_util.keystr(k)
        if name not in got_shapes:
            problems.append(f"missing {name} {v.shape}")
        elif (got := tuple(got_shapes.pop(name))) != v.shape:
            problems.append(f"{name}: expected {v.shape} for this model, found {got}")
    problems += [f"unexpected {name}" for name in got_shapes]
    ids = heads.draft_ids
    if ids is not None:
        if ids.ndim != 1 or len(ids) == 0 or np.any(np.diff(ids) <= 0):
            problems.append("draft ids must be a non-empty ascending list of distinct token ids")
        elif ids[0] < 0 or ids[-1] >= trunk.vocab_size:
            problems.append(f"draft ids span [{ids[0]}, {ids[-1]}], outside the model's vocabulary of {trunk.vocab_size}")
    if problems:
        raise weights_lib.WeightsError(f"MTP heads '{path}' do not match the model:\n  " + "\n  ".join(problems))


def load_mtp_heads(path: str, trunk: TransformerConfig | None = None) -> MTPHeadsCheckpoint:
    """MTP heads from a shipped name (SHIPPED_HEADS), a heads file (`save_heads_file`), a `bebop
    pretrain-mtp` run directory (latest step) or an HF directory holding Qwen3-Next `mtp.*` (or
    DeepSeek-V3 MTP) tensors beside the trunk.

    With `trunk` the heads are checked against that model before anything runs: trunk identity
    (heads files), parameter shapes and draft ids; a mismatch or a corrupt file is a WeightsError
    naming what differs.
    """
    if path in SHIPPED_HEADS:
        path = shipped_heads_path(path)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"heads file '{path}' does not exist")
        heads = _load_heads_file(path, trunk)
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt = RunCheckpoints(path)
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"run directory '{path}' holds no finished checkpoint")
        state, meta = ckpt.restore_raw(step)
        ckpt.close()
        params = jax.tree.map(np.asarray, state["params"])
        if meta.get("weight_layout") != WEIGHT_LAYOUT:
            params = from_in_out_layout(params)
        heads = MTPHeadsCheckpoint(MTPConfig(**meta["mtp"]), params, _draft_ids(meta.get("draft_ids")))
    elif os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        tensors = weights_lib.read_safetensors_dir(path)
        mtp, params = mtp_params_from_hf_tensors(weights_lib.config_from_hf(hf), tensors)
        steps = hf.get("bebop_mtp_num_steps", mtp.num_steps)
        heads = MTPHeadsCheckpoint(MTPConfig(num_steps=steps, num_layers=mtp.num_layers), params,
                                   _draft_ids(tensors.get("mtp.draft_ids")))
    else:
        raise FileNotFoundError(f"'{path}' is neither shipped heads ({', '.join(SHIPPED_HEADS)}), a heads "
                                ".safetensors file, a pretrain-mtp run directory (with checkpoints/) nor an HF "
                                "directory (with config.json)")
    if trunk is not None:
        _check_against(heads, trunk, path)
    return heads


def export_hf_with_mtp(model: LoadedModel, mtp: MTPConfig, mtp_params: dict, path: str,
                       max_shard_bytes: int | None = None, draft_ids: np.ndarray | None = None) -> None:
    """Writes the trunk, the heads as Qwen3-Next `mtp.*` tensors and the tokenizer as one HF directory.

    config.json also records `num_nextn_predict_layers` (the distinct MTP layers, as DeepSeek-V3 and
    Qwen3-Next configs name it) and `bebop_mtp_num_steps` (K, which the tensors do not show).
    """
    tok = model.tokenizer
    weights_lib.save_hf(path, model.cfg, jax.tree.map(np.asarray, model.params),
                        bos_token_id=tok.bos_token_id if tok else None,
                        eos_token_id=tok.eos_token_ids[0] if tok and tok.eos_token_ids else None,
                        extra_tensors=mtp_params_to_hf_tensors(model.cfg, mtp, mtp_params)
                        | ({} if draft_ids is None else {"mtp.draft_ids": np.asarray(draft_ids, np.int32)}),
                        max_shard_bytes=max_shard_bytes)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        hf = json.load(f)
    hf.update(num_nextn_predict_layers=mtp.num_layers, bebop_mtp_num_steps=mtp.num_steps)
    with open(config_file, "w") as f:
        json.dump(hf, f, indent=2)
    if tok is not None:
        tokenizer_lib.save_tokenizer(path, tok)
