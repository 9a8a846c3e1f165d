"""Draft-head losses (DESIGN.md, Distributions and losses): CE, forward KL, TV and Bebop's e2e TV.

Per origin t and draft step k (temperature tau):
    p = softmax(W h^trunk_{t+k} / tau)   the policy's distribution of x_{t+k+1}
    q = softmax(W h^k_t / tau)           the draft's
    alpha = sum_v min(p, q) = 1 - TV(p, q)   acceptance of one rejection-sampling step
    CE = -log q(x_{t+k+1}),  KL = KL(p || q),  TV = 1 - alpha,
    e2e TV = -(1/K) sum_k prod_{j<=k} alpha_j   (expected accepted drafts of one verify step, / K)
    LK losses (Samarin et al. 2026, arXiv 2602.23881: train on acceptance itself):
    lk_alpha  = -(1/K) sum_k log alpha_k         (gradient grad(alpha) / alpha: large where p and q
                                                  barely overlap, where TV's gradient vanishes)
    lk_lambda = (1/K) sum_k lam_k KL_k + (1 - lam_k) TV_k,  lam_k = exp(-LK_ETA * stopgrad(alpha_k))
                                                 (KL while alpha is small, TV as it grows)
    alpha_k, KL_k, TV_k above are masked means over the origins.

Inputs are hidden states, never logits: alpha goes through the fused kernel
(`kernels_pallas.tv_loss.fused_acceptance`), which never holds a [tokens x vocab] array of both
models; CE and KL are computed over row chunks under `jax.checkpoint` so their memory is bounded too.
Masks: `masks[k-1][n]` is True where origin n has a real, non-prompt target for step k. For the
e2e product a step counts only where every earlier step does (cumulative mask).

Draft sub-vocabulary (`target_logz` given): the heads draft from Vd << V frequent ids (EAGLE-3 /
FR-Spec), `w_vocab` holds those Vd rows, q = softmax over them (0 elsewhere), and p stays the policy's
full-vocabulary distribution restricted to them, p_v = exp(W_v h_t / tau - logZ_t) with logZ_t the
full log-normaliser (computed once per position, `trunk_cache.target_logz_cache`). Then alpha =
sum_{v in Vd} min(p_v, q_v) is still the exact acceptance of rejection sampling with that draft (the
mass of p outside Vd is never accepted), at Vd/V of the projection cost. CE counts targets inside Vd
(`targets` are row indices into `w_vocab`, -1 outside); KL is KL(p~ || q) with p~ = p renormalised
over Vd. These paths are plain jnp over row chunks ([rows x Vd] tiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bebop_jax import sharding
from bebop_jax.model.transformer import vocab_logits
from kernels_pallas.tv_loss import fused_acceptance

LOSSES = ("ce", "kl", "tv", "e2e_tv", "lk_alpha", "lk_lambda")
LK_ETA = 3.0  # lk_lambda: the KL weight is 0.74 at alpha 0.1, 0.22 at 0.5, 0.09 at 0.8
_ROW_CHUNK = 256


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _row_chunks(fn, *arrays):
    """fn over rows in chunks of _ROW_CHUNK (rematerialised in the backward pass); arrays [N, ...]."""
    n = arrays[0].shape[0]
    pad = -n % _ROW_CHUNK
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    chunked = [a.reshape(-1, _ROW_CHUNK, *a.shape[1:]) for a in padded]
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), chunked)
    return out.reshape(-1)[:n]


def cross_entropy(h_draft, targets, w_vocab, temperature: float = 1.0):
    """-log q(target) per row: h_draft [N,D], targets [N] int, w_vocab [V,D] -> [N]."""
    def fn(h, y):
        logq = jax.nn.log_softmax(vocab_logits(h, w_vocab, w_vocab.dtype)
                                  / temperature, axis=-1)
        return -jnp.take_along_axis(logq, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
    return _row_chunks(fn, h_draft, targets)


def forward_kl(h_draft, h_target, w_vocab, temperature: float = 1.0):
    """KL(p || q) per row, p from h_target, q from h_draft: [N,D] each -> [N]."""
    def fn(hd, ht):
        logq = jax.nn.log_softmax(vocab_logits(hd, w_vocab, w_vocab.dtype)
                                  / temperature, axis=-1)
        logp = jax.nn.log_softmax(vocab_logits(ht, w_vocab, w_vocab.dtype)
                                  / temperature, axis=-1)
        return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return _row_chunks(fn, h_draft, jax.lax.stop_gradient(h_target))


def acceptance(h_draft, h_target, w_vocab, temperature: float = 1.0, mask=None, implementation=None,
               target_logz=None):
    """alpha = sum_v min(p, q) per row [N] (the analytic acceptance), through the fused kernel; with
    `target_logz` [N] (p's full-vocabulary log-normaliser) over the draft sub-vocabulary `w_vocab` [Vd,D]."""
    h_target = jax.lax.stop_gradient(h_target)
    logz = None if target_logz is None else jax.lax.stop_gradient(target_logz)
    return fused_acceptance(h_draft, h_target, w_vocab, temperature=temperature, mask=mask,
                            implementation=implementation, target_logz=logz, partition=sharding.kernel_partition())


def expected_accepted(alphas, masks):
    """Per step k, the masked mean of prod_{j<=k} alpha_j over origins: alphas, masks [K, N] -> [K]."""
    chain = jnp.cumprod(alphas, axis=0)  # [K, N]
    chain_mask = jnp.cumprod(masks.astype(jnp.float32), axis=0)
    return jax.vmap(_masked_mean)(chain, chain_mask)


def draft_loss(kind: str, h_drafts, h_targets, targets, masks, w_vocab, temperature: float = 1.0,
               implementation=None, target_logz=None):
    """The training loss of K draft steps and its metrics.

    h_drafts, h_targets [K, N, D] (h^k_t and h^trunk_{t+k}); targets [K, N] (x_{t+k+1}, as rows of
    w_vocab; -1 = outside the draft vocabulary); masks [K, N] bool; w_vocab [V, D] (frozen LM head) or,
    with target_logz [K, N] (the log-normaliser of p over the full vocabulary), the draft sub-vocabulary's
    rows [Vd, D] (module docstring). Returns (scalar loss, metrics dict) where the metrics hold alpha_k [K]
    (masked means), the expected accepted length 1 + sum_k E prod alpha and, for CE/KL, their values.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown draft loss {kind!r}; choose one of {', '.join(LOSSES)}")
    w_vocab = jax.lax.stop_gradient(w_vocab)
    K = h_drafts.shape[0]
    h_alpha = jax.lax.stop_gradient(h_drafts) if kind in ("ce", "kl") else h_drafts  # metric only: no TV backward
    alphas = jnp.stack([acceptance(h_alpha[k], h_targets[k], w_vocab, temperature, masks[k], implementation,
                                   None if target_logz is None else target_logz[k]) for k in range(K)])  # [K, N]
    alpha_means = jax.vmap(_masked_mean)(alphas, masks)
    chain = expected_accepted(alphas, masks)  # [K]
    metrics = {"alpha": alpha_means, "expected_length": 1.0 + jnp.sum(chain)}
    if kind == "tv":
        loss = jnp.mean(1.0 - alpha_means)
    elif kind == "e2e_tv":
        loss = -jnp.mean(chain)
    elif kind == "lk_alpha":
        loss = -jnp.mean(jnp.log(jnp.maximum(alpha_means, 1e-6)))
    elif kind == "ce":
        per_step = jnp.stack([_masked_mean(cross_entropy(h_drafts[k], targets[k], w_vocab, temperature),
                                           masks[k] & (targets[k] >= 0)) for k in range(K)])
        loss = jnp.mean(per_step)
        metrics["ce"] = per_step
    else:  # kl, lk_lambda
        per_step = jnp.stack([_masked_mean(forward_kl(h_drafts[k], h_targets[k], w_vocab, temperature), masks[k])
                              for k in range(K)])
        if kind == "kl":
            loss = jnp.mean(per_step)
        else:
            lam = jnp.exp(-LK_ETA * jax.lax.stop_gradient(alpha_means))
            loss = jnp.mean(lam * per_step + (1.0 - lam) * (1.0 - alpha_means))
            metrics["lk_lambda"] = lam
        metrics["kl"] = jax.lax.stop_gradient(per_step)
    if kind in ("ce", "kl"):
        metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
    return loss, metrics
