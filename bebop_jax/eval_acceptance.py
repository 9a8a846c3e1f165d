"""`bebop eval-acceptance`: how well the draft heads match the policy on held-out policy samples.

For every origin t of the held-out sequences ({data.dir}/heldout) and draft step k, under teacher
forcing (DESIGN.md): alpha^k_t = sum_v min(p_{t+k}, q^k_t) = 1 - TV, the acceptance probability of one
rejection-sampling step, at each temperature of `eval.temperatures`. Reported per temperature: the mean
alpha_k of each head and the expected accepted length of one verify step,
1 + sum_k E_t prod_{j<=k} alpha^j_t (`losses.expected_accepted`; a step counts where all earlier ones do).
Acceptance against the entropy of the policy's distribution p_{t+k}: equal-count entropy buckets, and a
least-squares line alpha = intercept + slope * H fitted on the per-origin points (slope per nat, R^2).
Writes JSON and a PNG.

The trunk runs in f32 here (no bf16 cache). The samples were drawn at `data.temperature`; at other
temperatures the same text is re-scored, so the positions are not a sample of that temperature's policy.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bebop_jax import data as data_lib
from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.config import Config
from bebop_jax.losses import expected_accepted
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.model.mtp import MTPConfig, vocab_matrix
from bebop_jax.model.transformer import Transformer, TransformerConfig, vocab_logits
from bebop_jax.pretrain_mtp import draft_inputs


@functools.partial(jax.jit, static_argnames=("cfg", "mtp", "temperatures", "num_origins"))
def score_batch(trunk_params, mtp_params, batch, draft_ids=None, *, cfg: TransformerConfig, mtp: MTPConfig,
                temperatures: tuple[float, ...], num_origins: int):
    """alpha, entropy of p [len(temperatures), K, B*G] and masks [K, B*G] of a batch of padded rows.

    draft_ids [Vd] (optional): the heads' draft sub-vocabulary; q is 0 outside it, p stays the full one.
    """
    hidden, _ = Transformer(cfg).apply({"params": trunk_params}, batch["tokens"], batch["positions"], None,
                                       batch["segment_ids"])  # [B,T,D]
    h_d, h_t, _, masks, _ = draft_inputs(cfg, mtp, mtp_params, trunk_params["embedding"],
                                         dict(batch, hidden=hidden), num_origins)  # [K,N,D], [K,N,D], [K,N]
    w = vocab_matrix(cfg, trunk_params)  # [V,D]
    w_draft = w if draft_ids is None else w[draft_ids]  # [Vd,D]

    def one_step(hs):  # one draft step at a time: [N,V] logits of p and q, never [K,N,V]
        z_q = vocab_logits(hs[0], w_draft, w_draft.dtype)
        z_p = vocab_logits(hs[1], w, w.dtype)
        alphas, entropies = [], []
        for tau in temperatures:
            logp, logq = jax.nn.log_softmax(z_p / tau, -1), jax.nn.log_softmax(z_q / tau, -1)
            logp_draft = logp if draft_ids is None else logp[:, draft_ids]
            alphas.append(jnp.sum(jnp.minimum(jnp.exp(logp_draft), jnp.exp(logq)), -1))  # [N]
            entropies.append(-jnp.sum(jnp.exp(logp) * logp, -1))  # [N]
        return jnp.stack(alphas), jnp.stack(entropies)  # [nT, N] each

    alpha, entropy = jax.lax.map(one_step, (h_d, h_t))  # [K, nT, N]
    return jnp.swapaxes(alpha, 0, 1), jnp.swapaxes(entropy, 0, 1), masks


def entropy_analysis(alpha: np.ndarray, entropy: np.ndarray, num_buckets: int) -> dict:
    """Per-origin alpha [n] against entropy [n]: equal-count buckets and a least-squares line."""
    edges = np.quantile(entropy, np.linspace(0.0, 1.0, num_buckets + 1))
    which = np.clip(np.searchsorted(edges, entropy, side="right") - 1, 0, num_buckets - 1)
    buckets = [{"entropy_lo": float(edges[b]), "entropy_hi": float(edges[b + 1]),
                "entropy_mean": float(entropy[which == b].mean()), "alpha_mean": float(alpha[which == b].mean()),
                "count": int((which == b).sum())} for b in range(num_buckets) if (which == b).any()]
    slope, intercept = np.polyfit(entropy, alpha, 1)
    residual = alpha - (intercept + slope * entropy)
    total = np.sum((alpha - alpha.mean()) ** 2)
    r2 = 1.0 - float(np.sum(residual ** 2) / total) if total > 0 else 0.0
    return {"fit": {"slope": float(slope), "intercept": float(intercept), "r2": r2}, "buckets": buckets}


def evaluate(model: LoadedModel, mtp: MTPConfig, mtp_params: dict, seqs: data_lib.Sequences,
             temperatures: tuple[float, ...], num_buckets: int, batch_size: int, draft_ids=None) -> dict:
    """Acceptance report of the heads on `seqs` (see the module docstring); draft_ids as in `score_batch`."""
    D = model.cfg.hidden_size
    fc = mtp_params["layers_0"]["fc"]
    if tuple(np.shape(fc)) != (D, 2 * D):
        raise ValueError(f"MTP heads have fc of shape {tuple(np.shape(fc))}; the trunk (hidden size {D}) "
                         f"needs {(D, 2 * D)}: the heads belong to another model")
    seq_len = int(-(-max(len(t) for t in seqs.tokens) // 64) * 64)
    rows = data_lib.layout_rows(seqs, seq_len, pack=False)
    num_origins = data_lib.max_loss_origins(rows, mtp.num_steps)
    # Under jax.distributed each process scores every P-th batch; the scores are gathered, so every process
    # reports on all rows. Extra rows without completion tokens (masked everywhere) even out the batches.
    rank, num_procs = jax.process_index(), jax.process_count()
    pad = -len(rows) % (batch_size * num_procs)
    arrays = {name: np.concatenate([getattr(rows, name), np.zeros((pad, seq_len), getattr(rows, name).dtype)])
              for name in ("tokens", "positions", "segment_ids", "completion")}
    mtp_params = jax.tree.map(jnp.asarray, mtp_params)
    ids = None if draft_ids is None else jnp.asarray(draft_ids, jnp.int32)
    alphas, entropies, masks = [], [], []
    starts = range(rank * batch_size, len(rows) + pad, batch_size * num_procs)
    for start in tqdm(starts, desc="eval-acceptance" + (f" (process {rank})" if num_procs > 1 else ""),
                      unit="batch"):
        batch = {name: a[start:start + batch_size] for name, a in arrays.items()}
        a, e, m = score_batch(model.params, mtp_params, batch, ids, cfg=model.cfg, mtp=mtp,
                              temperatures=tuple(temperatures), num_origins=num_origins)
        alphas.append(np.asarray(a))
        entropies.append(np.asarray(e))
        masks.append(np.asarray(m))
    alpha, entropy, mask = (np.concatenate(x, axis=-1) for x in (alphas, entropies, masks))  # [nT,K,N], [K,N]
    if num_procs > 1:  # [P, ..., N / P] -> [..., N]: every statistic below is order-free over origins
        from jax.experimental import multihost_utils

        alpha, entropy, mask = (np.concatenate(list(multihost_utils.process_allgather(x)), axis=-1)
                                for x in (alpha, entropy, mask))
    results = []
    for i, tau in enumerate(temperatures):
        per_head = [dict(k=k + 1, alpha=float(alpha[i, k][mask[k]].mean()),
                         **entropy_analysis(alpha[i, k][mask[k]], entropy[i, k][mask[k]], num_buckets))
                    for k in range(mtp.num_steps)]
        chain = expected_accepted(jnp.asarray(alpha[i]), jnp.asarray(mask))  # [K]
        results.append({"temperature": float(tau), "alpha": [h["alpha"] for h in per_head],
                        "expected_length": 1.0 + float(jnp.sum(chain)),
                        "entropy_mean": float(entropy[i, 0][mask[0]].mean()), "heads": per_head})
    return {"num_sequences": len(seqs), "num_origins": [int(m.sum()) for m in mask],
            "draft_vocab": None if draft_ids is None else len(draft_ids),
            "mtp": {"num_steps": mtp.num_steps, "num_layers": mtp.num_layers}, "results": results}


def plot(report: dict, path: str) -> None:
    """alpha_k against the policy's entropy (bucket means and fitted lines), one panel per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for head in res["heads"]:
            xs = [b["entropy_mean"] for b in head["buckets"]]
            line = ax.plot(xs, [b["alpha_mean"] for b in head["buckets"]], "o-", label=f"alpha_{head['k']}")[0]
            fit, grid = head["fit"], np.linspace(min(xs), max(xs), 20)
            ax.plot(grid, fit["intercept"] + fit["slope"] * grid, "--", color=line.get_color(), alpha=0.6)
        ax.set(title=f"T={res['temperature']:g}: E[accepted length] {res['expected_length']:.3f}",
               xlabel="policy entropy H(p) [nats]", ylabel="acceptance alpha = 1 - TV", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_report_path(heads: str) -> str:
    """Where the report of `heads` goes without --out: inside a run or HF directory, beside a heads file
    (`x.safetensors` -> `x.acceptance.json`), and for shipped heads under runs/ (never into the package)."""
    if os.path.isdir(heads):
        return os.path.join(heads, "acceptance.json")
    if heads.endswith(".safetensors"):
        return os.path.splitext(heads)[0] + ".acceptance.json"
    return os.path.join("runs", "eval-acceptance", heads, "acceptance.json")


def run(cfg: Config, heads: str, out: str | None = None, model: LoadedModel | None = None) -> dict:
    """`bebop eval-acceptance`: evaluates the heads at `heads` (run dir, HF dir, heads file or shipped name);
    writes JSON + PNG and returns the report (with `out`: where the JSON went).

    `out` defaults to `default_report_path(heads)`; the plot goes beside it as .png. Under jax.distributed
    every process scores its share of the rows and process 0 alone writes.
    """
    model = model or load_model(cfg.model.source, cfg.model.dtype)
    mtp, params, draft_ids = load_mtp_heads(heads, model.cfg)
    seqs = data_lib.read_split(cfg.data, "heldout")
    report = evaluate(model, mtp, params, seqs, cfg.eval.temperatures, cfg.eval.entropy_buckets, cfg.eval.batch_size,
                      draft_ids)
    report = {"heads": heads, "data": [os.path.join(d, "heldout") for d in cfg.data.dirs]} | report
    out = out or default_report_path(heads)
    if jax.process_index() != 0:
        return report
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.splitext(out)[0] + ".png")
    return report
