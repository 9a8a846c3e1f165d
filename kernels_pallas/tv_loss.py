"""Fused acceptance probability alpha = sum_v min(p, q) of a draft head, over vocabulary blocks.

For N positions with a target hidden state h_t, a draft hidden state h_d and a shared LM head
W[V, D], at temperature T:

    p = softmax(W h_t / T),   q = softmax(W h_d / T),   alpha = sum_v min(p, q) = 1 - TV(p, q).

`fused_acceptance` computes alpha[N] and its gradient without holding the [N, V] logits, in passes
over (row block x vocab block) tiles:

1. the log-normalisers of p and q (online logsumexp);
2. alpha, <s, q> and <-s, p>, with s = sign(q - p);
3. d alpha / d h_d = G_q @ W, with G_q = d alpha / d z_q = -q (s - <s, q>) / (2T).

Gradient. TV = 0.5 sum_v |p - q| gives d TV / d q_v = s_v / 2; through the softmax of z_q / T,
with z_q = W h_d the draft logits, d TV / d z_q = q (s - <s, q>) / (2T) (DESIGN.md's formula with
the temperature), so d alpha / d z_q = -q (s - <s, q>) / (2T). The target side is symmetric in
s_p = sign(p - q) = -s: d alpha / d z_p = -p (s_p - <s_p, p>) / (2T). At ties (s = 0) this is the
mean of min's one-sided derivatives, as `jax.grad` of the reference takes it. Pass 3 runs inside
the VJP's forward rule (alpha_n depends on row n of h_d only, so the backward just scales the rows
by the cotangent); with one vocab block the three passes share one logits tile. With
`grad_wrt_vocab=True` the backward adds one pass for d alpha / d W = G_q^T h_d + G_p^T h_t (both
paths through W, h_t held fixed).

Two implementations of the passes: "chunked" (jnp; `lax.map` over row blocks, `fori_loop` over
vocab blocks; the CPU/GPU path; temporaries O(block_n x block_v)) and "pallas" (TPU kernels, one
`pallas_call` per pass, grid (row blocks, vocab blocks) with the vocab axis sequential; tested
with `interpret=True`). Rows and vocab are padded to whole blocks (padded logits are -inf).

Left out on purpose: gradients into h_target (stopped: the target is what the drafts learn to
match), a differentiable temperature, the scalar losses built on alpha (TV = 1 - alpha, e2e TV;
they live with the losses), and a GPU kernel (GPU runs the chunked path).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

IMPLEMENTATIONS = ("reference", "chunked", "pallas", "pallas_interpret")
LANES = 128  # TPU kernels keep per-row statistics lane-replicated, [rows, LANES]
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: `block_n` rows of h_draft / h_target times `block_v` rows of w_vocab.

    Both must be positive; the Pallas kernel also needs block_n % 8 == 0 and block_v % 128 == 0
    (TPU sublane / lane tiling). A block larger than its axis is clamped to the (padded) axis.
    """

    block_n: int = 256
    block_v: int = 2048

    def __post_init__(self):
        for name in ("block_n", "block_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"block_sizes.{name} must be a positive int, got {value!r}")

    def check_tpu(self):
        """Raises ValueError unless the sizes tile TPU vector registers (8 x 128)."""
        for name, multiple in (("block_n", 8), ("block_v", 128)):
            value = getattr(self, name)
            if value % multiple:
                raise ValueError(
                    f"block_sizes.{name} must be a multiple of {multiple} for the Pallas kernel, "
                    f"got {value}")


# The chunked path on CPU is matmul-bound: a whole-vocabulary tile lets the three passes share
# one logits tile (XLA merges the identical dots), so fused costs the plain path's flops while
# holding only [block_n, V] temporaries; vocab blocks would recompute the logits in every pass
# (7 matmuls of [N, D] x [D, V] instead of 3: 1.6x slower here). benchmarks/tv_loss.py, N=4096,
# D=576, V=49152 / 151936: temporaries 1/29 / 1/31 of plain, CPU time 0.85x / 0.77x of plain.
CHUNKED_BLOCK_SIZES = BlockSizes(block_n=128, block_v=1 << 20)
PALLAS_BLOCK_SIZES = BlockSizes()


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) arguments of the custom VJP."""

    temperature: float
    block_sizes: BlockSizes
    implementation: str
    grad_wrt_vocab: bool


class _Stats(NamedTuple):
    """Per-row statistics, each [N] f32: log-normalisers, alpha, sq = <s, q>, sp = <-s, p>.

    s = sign(q - p) is the draft's sign vector; -s = sign(p - q) the target's.
    """

    lse_p: jax.Array
    lse_q: jax.Array
    alpha: jax.Array
    sq: jax.Array
    sp: jax.Array


# ----------------------------------------------------------------------------- reference


def fused_acceptance_reference(h_draft, h_target, w_vocab, *, temperature=1.0, mask=None,
                               grad_wrt_vocab=False):
    """The definition, holding both [N, V] logits in f32; arguments and gradients as the fused one.

    h_draft, h_target: [N, D]; w_vocab: [V, D]; mask: [N] bool or None. Returns alpha [N] f32.
    """
    w = w_vocab.astype(F32)  # [V, D]
    if not grad_wrt_vocab:
        w = lax.stop_gradient(w)
    h_t = lax.stop_gradient(h_target.astype(F32))  # [N, D]
    q = jax.nn.softmax(h_draft.astype(F32) @ w.T / temperature, axis=-1)  # [N, V]
    p = jax.nn.softmax(h_t @ w.T / temperature, axis=-1)  # [N, V]
    alpha = jnp.minimum(p, q).sum(-1)  # [N]
    return alpha if mask is None else jnp.where(mask, alpha, 0.0)


# ----------------------------------------------------------------------------- tile math


def _tile_logits(h, w, col0, vocab_size, temperature):
    """Logits [rows, bv] of h [rows, D] against vocab rows col0.. of w [bv, D]; padding -> -inf."""
    z = lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=F32) / temperature
    if vocab_size % w.shape[0] == 0:  # no padded block: skip a select pass over the tile
        return z  # [rows, bv]
    col = col0 + lax.broadcasted_iota(jnp.int32, z.shape, 1)  # [rows, bv]
    return jnp.where(col < vocab_size, z, -jnp.inf)


def _tile_probs(h_t, h_d, w, lse_p, lse_q, col0, vocab_size, temperature):
    """p, q tiles [bn, bv] from h_t, h_d [bn, D], w [bv, D] and log-normalisers lse_* [bn, 1]."""
    p = jnp.exp(_tile_logits(h_t, w, col0, vocab_size, temperature) - lse_p)  # [bn, bv]
    q = jnp.exp(_tile_logits(h_d, w, col0, vocab_size, temperature) - lse_q)  # [bn, bv]
    return p, q


def _dalpha_dlogits(x, y, s_mean, temperature):
    """d alpha / d z_x [bn, bv] for x, y = (q, p) or (p, q); s_mean = <sign(x - y), x> [bn, 1]."""
    return -x * (jnp.sign(x - y) - s_mean) / (2 * temperature)


def _pad_rows(x, multiple):
    """Pads axis 0 of x with zeros to a multiple of `multiple`."""
    return jnp.pad(x, ((0, -x.shape[0] % multiple),) + ((0, 0),) * (x.ndim - 1))


# ----------------------------------------------------------------------------- chunked (jnp)


def _chunked_geometry(h_draft, w_vocab, block_sizes):
    """(block_n, block_v, number of vocab blocks, padded w_vocab [n_vb * block_v, D])."""
    bn = min(block_sizes.block_n, h_draft.shape[0])
    bv = min(block_sizes.block_v, w_vocab.shape[0])
    w = _pad_rows(w_vocab, bv)  # [Vp, D]
    return bn, bv, w.shape[0] // bv, w


def _chunked_forward(h_draft, h_target, w_vocab, temperature, block_sizes, with_grad):
    """Passes 1-3 in jnp. h_draft, h_target: [N, D]; w_vocab: [V, D].

    Returns (_Stats, d alpha / d h_draft [N, D] f32, or None without `with_grad`).
    """
    n, d = h_draft.shape
    v = w_vocab.shape[0]
    bn, bv, n_vb, w_pad = _chunked_geometry(h_draft, w_vocab, block_sizes)

    def row_block(hs):
        h_t, h_d = hs  # [bn, D] each
        h2 = jnp.concatenate([h_t, h_d])  # [2bn, D], one dot per tile for both models

        def w_block(j):
            return lax.dynamic_slice_in_dim(w_pad, j * bv, bv)  # [bv, D]

        def lse_step(j, carry):
            m, l = carry  # [2bn, 1] running max and sum
            z = _tile_logits(h2, w_block(j), j * bv, v, temperature)  # [2bn, bv]
            m_new = jnp.maximum(m, z.max(-1, keepdims=True))  # [2bn, 1]
            return m_new, l * jnp.exp(m - m_new) + jnp.exp(z - m_new).sum(-1, keepdims=True)

        init = (jnp.full((2 * bn, 1), -jnp.inf, F32), jnp.zeros((2 * bn, 1), F32))
        m, l = lax.fori_loop(0, n_vb, lse_step, init)
        lse = m + jnp.log(l)  # [2bn, 1]
        lse_p, lse_q = lse[:bn], lse[bn:]  # [bn, 1] each

        def probs(j):
            z = _tile_logits(h2, w_block(j), j * bv, v, temperature) - lse  # [2bn, bv]
            return jnp.exp(z[:bn]), jnp.exp(z[bn:])  # p, q: [bn, bv] each

        def stats_step(j, acc):
            p, q = probs(j)
            s = jnp.sign(q - p)  # [bn, bv]
            return acc + jnp.stack([jnp.minimum(p, q).sum(-1), (s * q).sum(-1), -(s * p).sum(-1)])

        alpha, sq, sp = lax.fori_loop(0, n_vb, stats_step, jnp.zeros((3, bn), F32))
        stats = _Stats(lse_p[:, 0], lse_q[:, 0], alpha, sq, sp)
        if not with_grad:
            return stats, None

        def grad_step(j, acc):
            p, q = probs(j)
            w = w_block(j)
            g_q = _dalpha_dlogits(q, p, sq[:, None], temperature)  # [bn, bv]
            return acc + jnp.dot(g_q.astype(w.dtype), w, preferred_element_type=F32)  # [bn, D]

        return stats, lax.fori_loop(0, n_vb, grad_step, jnp.zeros((bn, d), F32))

    blocks = [_pad_rows(x, bn).reshape(-1, bn, d) for x in (h_target, h_draft)]  # [nb, bn, D]
    stats, jac = lax.map(row_block, blocks)
    stats = _Stats(*(x.reshape(-1)[:n] for x in stats))
    return stats, None if jac is None else jac.reshape(-1, d)[:n]


def _chunked_grad_vocab(h_draft, h_target, w_vocab, stats, g, temperature, block_sizes):
    """d (sum_n g_n alpha_n) / d w_vocab [V, D] f32: vocab blocks outside, row blocks inside.

    h_draft, h_target: [N, D]; w_vocab: [V, D]; stats: _Stats of [N]; g: [N] cotangent.
    """
    d = h_draft.shape[1]
    v = w_vocab.shape[0]
    bn, bv, n_vb, w_pad = _chunked_geometry(h_draft, w_vocab, block_sizes)
    h_t_blocks, h_d_blocks = (_pad_rows(x, bn).reshape(-1, bn, d) for x in (h_target, h_draft))
    per_row = jnp.stack([stats.lse_p, stats.lse_q, stats.sq, stats.sp, g.astype(F32)], axis=1)
    per_row = _pad_rows(per_row, bn).reshape(-1, bn, 5)  # [nb, bn, 5]; padded rows get g = 0

    def vocab_block(j, dw):
        w = lax.dynamic_slice_in_dim(w_pad, j * bv, bv)  # [bv, D]

        def row_step(i, acc):
            h_t, h_d = h_t_blocks[i], h_d_blocks[i]  # [bn, D] each
            lse_p, lse_q, sq, sp, g_i = jnp.split(per_row[i], 5, axis=1)  # [bn, 1] each
            p, q = _tile_probs(h_t, h_d, w, lse_p, lse_q, j * bv, v, temperature)  # [bn, bv]
            g_pq = jnp.concatenate([g_i * _dalpha_dlogits(p, q, sp, temperature),
                                    g_i * _dalpha_dlogits(q, p, sq, temperature)])  # [2bn, bv]
            h2 = jnp.concatenate([h_t, h_d])  # [2bn, D]
            return acc + lax.dot_general(g_pq.astype(h2.dtype), h2, (((0,), (0,)), ((), ())),
                                         preferred_element_type=F32)  # [bv, D]

        acc = lax.fori_loop(0, per_row.shape[0], row_step, jnp.zeros((bv, d), F32))
        return lax.dynamic_update_slice_in_dim(dw, acc, j * bv, axis=0)

    return lax.fori_loop(0, n_vb, vocab_block, jnp.zeros(w_pad.shape, F32))[:v]


# ----------------------------------------------------------------------------- Pallas (TPU)


def _lse_kernel(ht_ref, hd_ref, w_ref, lse_p_ref, lse_q_ref, m_p, l_p, m_q, l_q, *,
                vocab_size, temperature):
    """Pass 1 on one (row block i, vocab block j) tile: online logsumexp of p and q."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for m, l in ((m_p, l_p), (m_q, l_q)):
            m[...] = jnp.full(m.shape, -jnp.inf, F32)
            l[...] = jnp.zeros(l.shape, F32)

    col0 = j * w_ref.shape[0]
    for h_ref, m, l in ((ht_ref, m_p, l_p), (hd_ref, m_q, l_q)):
        z = _tile_logits(h_ref[...], w_ref[...], col0, vocab_size, temperature)  # [bn, bv]
        m_old = m[...]  # [bn, LANES]
        m_new = jnp.maximum(m_old, z.max(-1, keepdims=True))  # [bn, LANES]
        l[...] = l[...] * jnp.exp(m_old - m_new) + jnp.exp(z - m_new[:, :1]).sum(-1, keepdims=True)
        m[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_p_ref[...] = m_p[...] + jnp.log(l_p[...])
        lse_q_ref[...] = m_q[...] + jnp.log(l_q[...])


def _stats_kernel(ht_ref, hd_ref, w_ref, lse_p_ref, lse_q_ref, alpha_ref, sq_ref, sp_ref, *,
                  vocab_size, temperature):
    """Pass 2: alpha, <s, q>, <-s, p> accumulated in the resident f32 output blocks [bn, LANES]."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for ref in (alpha_ref, sq_ref, sp_ref):
            ref[...] = jnp.zeros(ref.shape, F32)

    p, q = _tile_probs(ht_ref[...], hd_ref[...], w_ref[...], lse_p_ref[:, :1], lse_q_ref[:, :1],
                       j * w_ref.shape[0], vocab_size, temperature)  # [bn, bv] each
    s = jnp.sign(q - p)  # [bn, bv]
    alpha_ref[...] += jnp.minimum(p, q).sum(-1, keepdims=True)
    sq_ref[...] += (s * q).sum(-1, keepdims=True)
    sp_ref[...] -= (s * p).sum(-1, keepdims=True)


def _grad_h_kernel(ht_ref, hd_ref, w_ref, lse_p_ref, lse_q_ref, sq_ref, jac_ref, *,
                   vocab_size, temperature):
    """Pass 3: d alpha / d h_draft [bn, D] += G_q @ W_j in the resident f32 output block."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        jac_ref[...] = jnp.zeros(jac_ref.shape, F32)

    w = w_ref[...]  # [bv, D]
    p, q = _tile_probs(ht_ref[...], hd_ref[...], w, lse_p_ref[:, :1], lse_q_ref[:, :1],
                       j * w.shape[0], vocab_size, temperature)  # [bn, bv] each
    g_q = _dalpha_dlogits(q, p, sq_ref[:, :1], temperature)  # [bn, bv]
    jac_ref[...] += jnp.dot(g_q.astype(w.dtype), w, preferred_element_type=F32)


def _grad_w_kernel(ht_ref, hd_ref, w_ref, lse_p_ref, lse_q_ref, sq_ref, sp_ref, g_ref, dw_ref, *,
                   vocab_size, temperature):
    """Backward pass on grid (vocab block j, row block i): dW_j [bv, D] += G_q^T h_d + G_p^T h_t."""
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

    h_t, h_d = ht_ref[...], hd_ref[...]  # [bn, D] each
    p, q = _tile_probs(h_t, h_d, w_ref[...], lse_p_ref[:, :1], lse_q_ref[:, :1],
                       pl.program_id(0) * w_ref.shape[0], vocab_size, temperature)  # [bn, bv]
    g = g_ref[:, :1]  # [bn, 1]
    g_p = g * _dalpha_dlogits(p, q, sp_ref[:, :1], temperature)  # [bn, bv]
    g_q = g * _dalpha_dlogits(q, p, sq_ref[:, :1], temperature)  # [bn, bv]
    dims = (((0,), (0,)), ((), ()))
    dw_ref[...] += (lax.dot_general(g_p.astype(h_t.dtype), h_t, dims, preferred_element_type=F32)
                    + lax.dot_general(g_q.astype(h_d.dtype), h_d, dims, preferred_element_type=F32))


def _pallas_geometry(h_draft, w_vocab, block_sizes):
    """Tile sizes clamped to the (8 / 128-rounded) axes."""
    bn = min(block_sizes.block_n, pl.cdiv(h_draft.shape[0], 8) * 8)
    bv = min(block_sizes.block_v, pl.cdiv(w_vocab.shape[0], LANES) * LANES)
    return bn, bv


def _lanes(x, bn):
    """[N] -> zero-padded, lane-replicated [Np, LANES] f32."""
    x = _pad_rows(x.astype(F32), bn)  # [Np]
    return jnp.broadcast_to(x[:, None], (x.shape[0], LANES))


def _pallas_forward(h_draft, h_target, w_vocab, temperature, block_sizes, with_grad, interpret):
    """Passes 1-3 as three pallas_calls; same contract as `_chunked_forward`."""
    n, d = h_draft.shape
    v = w_vocab.shape[0]
    bn, bv = _pallas_geometry(h_draft, w_vocab, block_sizes)
    h_d, h_t, w = _pad_rows(h_draft, bn), _pad_rows(h_target, bn), _pad_rows(w_vocab, bv)
    row = pl.BlockSpec((bn, d), lambda i, j: (i, 0))
    vocab = pl.BlockSpec((bv, d), lambda i, j: (j, 0))
    stat = pl.BlockSpec((bn, LANES), lambda i, j: (i, 0))
    stat_shape = jax.ShapeDtypeStruct((h_d.shape[0], LANES), F32)
    call = functools.partial(
        pl.pallas_call, grid=(h_d.shape[0] // bn, w.shape[0] // bv), interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")))
    kw = dict(vocab_size=v, temperature=temperature)

    lse_p, lse_q = call(
        functools.partial(_lse_kernel, **kw), out_shape=[stat_shape] * 2,
        in_specs=[row, row, vocab], out_specs=[stat] * 2,
        scratch_shapes=[pltpu.VMEM((bn, LANES), F32)] * 4)(h_t, h_d, w)  # [Np, LANES] each
    alpha, sq, sp = call(
        functools.partial(_stats_kernel, **kw), out_shape=[stat_shape] * 3,
        in_specs=[row, row, vocab, stat, stat], out_specs=[stat] * 3)(h_t, h_d, w, lse_p, lse_q)
    stats = _Stats(*(x[:n, 0] for x in (lse_p, lse_q, alpha, sq, sp)))
    if not with_grad:
        return stats, None
    jac = call(
        functools.partial(_grad_h_kernel, **kw), out_shape=jax.ShapeDtypeStruct(h_d.shape, F32),
        in_specs=[row, row, vocab, stat, stat, stat], out_specs=row)(h_t, h_d, w, lse_p, lse_q, sq)
    return stats, jac[:n]  # [N, D]


def _pallas_grad_vocab(h_draft, h_target, w_vocab, stats, g, temperature, block_sizes, interpret):
    """d (sum_n g_n alpha_n) / d w_vocab [V, D] f32 as one pallas_call, grid (vocab, rows)."""
    d = h_draft.shape[1]
    v = w_vocab.shape[0]
    bn, bv = _pallas_geometry(h_draft, w_vocab, block_sizes)
    h_d, h_t, w = _pad_rows(h_draft, bn), _pad_rows(h_target, bn), _pad_rows(w_vocab, bv)
    row = pl.BlockSpec((bn, d), lambda j, i: (i, 0))
    stat = pl.BlockSpec((bn, LANES), lambda j, i: (i, 0))
    vocab = pl.BlockSpec((bv, d), lambda j, i: (j, 0))
    dw = pl.pallas_call(
        functools.partial(_grad_w_kernel, vocab_size=v, temperature=temperature),
        out_shape=jax.ShapeDtypeStruct(w.shape, F32), grid=(w.shape[0] // bv, h_d.shape[0] // bn),
        in_specs=[row, row, vocab] + [stat] * 5, out_specs=vocab, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    )(h_t, h_d, w, *(_lanes(x, bn) for x in (stats.lse_p, stats.lse_q, stats.sq, stats.sp, g)))
    return dw[:v]  # [V, D]


# ----------------------------------------------------------------------------- custom VJP


def _forward(h_draft, h_target, w_vocab, cfg, with_grad):
    """Dispatches passes 1-3 to the configured implementation."""
    args = (h_draft, h_target, w_vocab, cfg.temperature, cfg.block_sizes, with_grad)
    if cfg.implementation == "chunked":
        return _chunked_forward(*args)
    return _pallas_forward(*args, interpret=cfg.implementation == "pallas_interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _acceptance(h_draft, h_target, w_vocab, cfg):
    """alpha [N] f32 of h_draft, h_target [N, D] and w_vocab [V, D] (one common dtype)."""
    return _forward(h_draft, h_target, w_vocab, cfg, with_grad=False)[0].alpha


def _acceptance_fwd(h_draft, h_target, w_vocab, cfg):
    stats, jac = _forward(h_draft, h_target, w_vocab, cfg, with_grad=True)
    return stats.alpha, (h_draft, h_target, w_vocab, stats, jac)


def _acceptance_bwd(cfg, residuals, g):
    h_draft, h_target, w_vocab, stats, jac = residuals
    g = g.astype(F32)  # [N]
    d_draft = (g[:, None] * jac).astype(h_draft.dtype)  # [N, D]
    if not cfg.grad_wrt_vocab:
        return d_draft, jnp.zeros_like(h_target), jnp.zeros_like(w_vocab)
    args = (h_draft, h_target, w_vocab, stats, g, cfg.temperature, cfg.block_sizes)
    if cfg.implementation == "chunked":
        d_vocab = _chunked_grad_vocab(*args)
    else:
        d_vocab = _pallas_grad_vocab(*args, interpret=cfg.implementation == "pallas_interpret")
    return d_draft, jnp.zeros_like(h_target), d_vocab.astype(w_vocab.dtype)


_acceptance.defvjp(_acceptance_fwd, _acceptance_bwd)


# ----------------------------------------------------------------------------- public entry


def _check_inputs(h_draft, h_target, w_vocab, temperature, mask, block_sizes, implementation):
    """Raises ValueError / TypeError naming the offending argument."""
    for name, x in (("h_draft", h_draft), ("h_target", h_target), ("w_vocab", w_vocab)):
        if jnp.ndim(x) != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name} must be a 2-D float array, got {x.dtype}{list(jnp.shape(x))}")
    if h_target.shape != h_draft.shape:
        raise ValueError(f"h_target must have h_draft's shape [N, D] = {list(h_draft.shape)}, "
                         f"got {list(h_target.shape)}")
    if w_vocab.shape[1] != h_draft.shape[1]:
        raise ValueError(f"w_vocab must be [V, D] with D = {h_draft.shape[1]} (h_draft's last "
                         f"axis), got {list(w_vocab.shape)}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(
            f"temperature must be a positive finite Python number, got {temperature!r}")
    if mask is not None and (jnp.shape(mask) != h_draft.shape[:1] or mask.dtype != jnp.bool_):
        raise ValueError(f"mask must be a bool array of shape [N] = [{h_draft.shape[0]}], got "
                         f"{mask.dtype}{list(jnp.shape(mask))}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")


def fused_acceptance(h_draft, h_target, w_vocab, *, temperature=1.0, mask=None, block_sizes=None,
                     grad_wrt_vocab=False, implementation=None):
    """alpha[N] = sum_v min(p, q) with p = softmax(W h_target / T), q = softmax(W h_draft / T).

    Args:
      h_draft: [N, D] draft hidden states; gradients flow into it.
      h_target: [N, D] target hidden states; its gradient is always zero (stopped).
      w_vocab: [V, D] shared LM head W; gradient zero unless `grad_wrt_vocab`, then both the p and
        the q path.
      temperature: positive Python float T.
      mask: [N] bool or None; masked rows give alpha 0 and zero gradient (their inputs may hold
        anything, NaN included).
      block_sizes: BlockSizes or None for the implementation's default.
      grad_wrt_vocab: differentiate through w_vocab as well.
      implementation: None (TPU -> "pallas", else "chunked"), "reference", "chunked", "pallas",
        "pallas_interpret" (the TPU kernels run by the Pallas interpreter, for CPU tests).

    Returns:
      alpha [N] f32, in [0, 1] up to rounding. Inputs of mixed dtypes are promoted to one; all
      arithmetic past the matmuls is f32.
    """
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "tpu" else "chunked"
    mask = None if mask is None else jnp.asarray(mask)
    _check_inputs(h_draft, h_target, w_vocab, temperature, mask, block_sizes, implementation)
    if implementation == "reference":
        return fused_acceptance_reference(h_draft, h_target, w_vocab, temperature=temperature,
                                          mask=mask, grad_wrt_vocab=grad_wrt_vocab)
    if block_sizes is None:
        block_sizes = CHUNKED_BLOCK_SIZES if implementation == "chunked" else PALLAS_BLOCK_SIZES
    if implementation != "chunked":
        block_sizes.check_tpu()
    dtype = jnp.result_type(h_draft, h_target, w_vocab)
    h_d, h_t, w = (x.astype(dtype) for x in (h_draft, h_target, w_vocab))
    if mask is not None:  # zeroed rows keep masked garbage out of the kernels and the gradient
        h_d = jnp.where(mask[:, None], h_d, 0)  # [N, D]
        h_t = jnp.where(mask[:, None], h_t, 0)  # [N, D]
    cfg = _Config(float(temperature), block_sizes, implementation, bool(grad_wrt_vocab))
    alpha = _acceptance(h_d, h_t, w, cfg)  # [N]
    return alpha if mask is None else jnp.where(mask, alpha, 0.0)
