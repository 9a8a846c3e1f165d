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

On a TPU the tiles come from the chip (`tpu_block_sizes`): the largest row block, then vocab block,
whose double-buffered tiles and f32 temporaries fit the TensorCore's VMEM at this D and dtype (the
kernels' scoped VMEM limit is raised to match); D is never split, since a 128-row vocab block of
D = 8192 in f32 still fits. Each `pallas_call` carries a `pl.CostEstimate` so XLA's cost analysis
counts it.

Sharded: with a `placement.Partition` every pass runs per shard inside `shard_map`, rows over the
partition's row axes; where the vocabulary is split too, each shard computes its vocab slice's partial
log-normalisers, statistics and gradient, and the shards combine them with collectives between the
passes (logsumexp of the lse's by pmax + psum, psum of alpha, <s, q>, <-s, p> and of d alpha / d h_d);
d alpha / d W stays vocab-sharded and is summed over the row axes. That moves O(N) numbers per pass
where gathering W would move V x D per step (1.2 GB of Qwen3-8B's bf16 head per device).

With `target_logz` [N] (the log-normaliser of p over a larger vocabulary, `w_vocab` holding the rows of
a draft sub-vocabulary) p is exp(W h_t / T - target_logz) on those rows only (not renormalised) and q a
softmax over them; alpha's gradient in h_draft has the same form, since the softmax Jacobian annihilates
the constant that sum_v p != 1 adds.

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
from jax.sharding import PartitionSpec as P

from kernels_pallas import placement

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
PALLAS_BLOCK_SIZES = BlockSizes()  # interpret mode, and the ceiling of `tpu_block_sizes`


def _vmem_footprint(bn, bv, d, itemsize):
    """Bytes of VMEM the largest pass holds at tiles (bn, bv): double-buffered h tiles [bn, D] x 2, a W
    tile [bv, D], the resident f32 gradient block ([bn, D] in pass 3, [bv, D] in the W backward) and
    the per-row statistics, plus ~8 f32 [bn, bv] temporaries (logits, p, q, signs, gradients) and the
    W backward's two f32 [bv, D] products before they are summed into its block."""
    buffers = 2 * bn * d * itemsize + bv * d * itemsize + max(bn, bv) * d * 4 + 8 * bn * LANES * 4
    return 2 * buffers + 8 * bn * bv * 4 + 2 * max(bn, bv) * d * 4


def tpu_block_sizes(n, v, d, itemsize, vmem_bytes) -> BlockSizes:
    """The largest block_n, then block_v (powers of two from PALLAS_BLOCK_SIZES down to 8 / 128) whose
    footprint at width d and `itemsize`-byte operands fits `vmem_bytes`; blocks never exceed the padded
    axes. Raises ValueError if not even (8, 128) fits."""
    n_cap = pl.cdiv(n, 8) * 8
    v_cap = pl.cdiv(v, LANES) * LANES
    bn = PALLAS_BLOCK_SIZES.block_n
    while bn >= 8:
        bv = PALLAS_BLOCK_SIZES.block_v
        while bv >= LANES:
            block_n, block_v = min(bn, n_cap), min(bv, v_cap)
            if _vmem_footprint(block_n, block_v, d, itemsize) <= vmem_bytes:
                return BlockSizes(block_n, block_v)
            bv //= 2
        bn //= 2
    raise ValueError(f"fused_acceptance: no TPU tiles fit {vmem_bytes / 2**20:.0f} MiB of VMEM at D={d} "
                     f"with {itemsize}-byte operands")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) arguments of the custom VJP."""

    temperature: float
    block_sizes: BlockSizes
    implementation: str
    grad_wrt_vocab: bool
    partition: placement.Partition | None
    vmem_limit: int | None  # the Pallas calls' scoped VMEM limit (bytes), None: Mosaic's default


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
                               grad_wrt_vocab=False, target_logz=None):
    """The definition, holding both [N, V] logits in f32; arguments and gradients as the fused one.

    h_draft, h_target: [N, D]; w_vocab: [V, D]; mask: [N] bool or None; target_logz: [N] or None.
    Returns alpha [N] f32.
    """
    w = w_vocab.astype(F32)  # [V, D]
    if not grad_wrt_vocab:
        w = lax.stop_gradient(w)
    h_t = lax.stop_gradient(h_target.astype(F32))  # [N, D]
    q = jax.nn.softmax(h_draft.astype(F32) @ w.T / temperature, axis=-1)  # [N, V]
    if target_logz is None:
        p = jax.nn.softmax(h_t @ w.T / temperature, axis=-1)  # [N, V]
    else:
        p = jnp.exp(h_t @ w.T / temperature - lax.stop_gradient(target_logz.astype(F32))[:, None])  # [N, V]
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


def _chunked_forward(h_draft, h_target, w_vocab, target_logz, temperature, block_sizes, with_grad):
    """Passes 1-3 in jnp. h_draft, h_target: [N, D]; w_vocab: [V, D]; target_logz: [N] f32 or None.

    Returns (_Stats, d alpha / d h_draft [N, D] f32, or None without `with_grad`).
    """
    n, d = h_draft.shape
    v = w_vocab.shape[0]
    bn, bv, n_vb, w_pad = _chunked_geometry(h_draft, w_vocab, block_sizes)

    def row_block(hs):
        h_t, h_d, logz = hs  # [bn, D] each, [bn] (zeros without target_logz)
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
        if target_logz is not None:
            lse_p = logz[:, None]
            lse = jnp.concatenate([lse_p, lse_q])

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
    logz = jnp.zeros((n,), F32) if target_logz is None else target_logz.astype(F32)
    stats, jac = lax.map(row_block, blocks + [_pad_rows(logz, bn).reshape(-1, bn)])
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


def _cost(n, v, d, itemsize, bn, bv, dots, transcendentals, w_major=False):
    """pl.CostEstimate of one pass over [n, v] tiles with `dots` [n, D] x [D, v]-sized matmuls: W is
    re-read once per row block (per vocab block, the h tiles, when `w_major`)."""
    h_bytes, w_bytes = 2 * n * d * itemsize, v * d * itemsize
    streamed = (v // bv) * h_bytes + w_bytes * 5 if w_major else (n // bn) * w_bytes + h_bytes
    return pl.CostEstimate(flops=2 * dots * n * v * d, transcendentals=transcendentals * n * v,
                           bytes_accessed=int(streamed + 8 * n * LANES * 4))


def _combine_lse(lse, axis):
    """The log-normaliser over all vocab shards of `axis` from each shard's partial lse [Np, LANES]."""
    m = lax.pmax(lse, axis)
    return m + jnp.log(lax.psum(jnp.exp(lse - m), axis))


def _pallas_forward(h_draft, h_target, w_vocab, target_logz, temperature, block_sizes, with_grad, interpret,
                    vmem_limit=None, vocab_axis=None):
    """Passes 1-3 as three pallas_calls; same contract as `_chunked_forward`. With `vocab_axis` (inside
    shard_map) w_vocab is this shard's slice of the vocabulary and the shards' partial results are combined."""
    n, d = h_draft.shape
    v = w_vocab.shape[0]
    bn, bv = _pallas_geometry(h_draft, w_vocab, block_sizes)
    h_d, h_t, w = _pad_rows(h_draft, bn), _pad_rows(h_target, bn), _pad_rows(w_vocab, bv)
    n_p, v_p, isz = h_d.shape[0], w.shape[0], h_d.dtype.itemsize
    row = pl.BlockSpec((bn, d), lambda i, j: (i, 0))
    vocab = pl.BlockSpec((bv, d), lambda i, j: (j, 0))
    stat = pl.BlockSpec((bn, LANES), lambda i, j: (i, 0))
    stat_shape = jax.ShapeDtypeStruct((n_p, LANES), F32)
    call = functools.partial(
        pl.pallas_call, grid=(n_p // bn, v_p // bv), interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit))
    cost = functools.partial(_cost, n_p, v_p, d, isz, bn, bv)
    kw = dict(vocab_size=v, temperature=temperature)

    lse_p, lse_q = call(
        functools.partial(_lse_kernel, **kw), out_shape=[stat_shape] * 2,
        in_specs=[row, row, vocab], out_specs=[stat] * 2, cost_estimate=cost(2, 2),
        scratch_shapes=[pltpu.VMEM((bn, LANES), F32)] * 4)(h_t, h_d, w)  # [Np, LANES] each
    if vocab_axis is not None:
        lse_p, lse_q = _combine_lse(lse_p, vocab_axis), _combine_lse(lse_q, vocab_axis)
    if target_logz is not None:
        lse_p = _lanes(target_logz, bn)
    alpha, sq, sp = call(
        functools.partial(_stats_kernel, **kw), out_shape=[stat_shape] * 3,
        in_specs=[row, row, vocab, stat, stat], out_specs=[stat] * 3,
        cost_estimate=cost(2, 2))(h_t, h_d, w, lse_p, lse_q)
    if vocab_axis is not None:
        alpha, sq, sp = (lax.psum(x, vocab_axis) for x in (alpha, sq, sp))
    stats = _Stats(*(x[:n, 0] for x in (lse_p, lse_q, alpha, sq, sp)))
    if not with_grad:
        return stats, None
    jac = call(
        functools.partial(_grad_h_kernel, **kw), out_shape=jax.ShapeDtypeStruct(h_d.shape, F32),
        in_specs=[row, row, vocab, stat, stat, stat], out_specs=row,
        cost_estimate=cost(3, 2))(h_t, h_d, w, lse_p, lse_q, sq)
    if vocab_axis is not None:
        jac = lax.psum(jac, vocab_axis)
    return stats, jac[:n]  # [N, D]


def _pallas_grad_vocab(h_draft, h_target, w_vocab, stats, g, temperature, block_sizes, interpret,
                       vmem_limit=None, row_axes=()):
    """d (sum_n g_n alpha_n) / d w_vocab [V, D] f32 as one pallas_call, grid (vocab, rows); with `row_axes`
    (inside shard_map) summed over the row shards."""
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
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=_cost(h_d.shape[0], w.shape[0], d, h_d.dtype.itemsize, bn, bv, 4, 2, w_major=True),
    )(h_t, h_d, w, *(_lanes(x, bn) for x in (stats.lse_p, stats.lse_q, stats.sq, stats.sp, g)))
    return lax.psum(dw[:v], row_axes) if row_axes else dw[:v]  # [V, D]


# ----------------------------------------------------------------------------- custom VJP


def _local_forward(h_draft, h_target, w_vocab, target_logz, cfg, with_grad):
    """Passes 1-3 on one shard (or the whole arrays) by the configured implementation."""
    args = (h_draft, h_target, w_vocab, target_logz, cfg.temperature, cfg.block_sizes, with_grad)
    if cfg.implementation == "chunked":
        return _chunked_forward(*args)
    vocab_axis = cfg.partition.vocab_axis if cfg.partition else None
    return _pallas_forward(*args, interpret=cfg.implementation == "pallas_interpret", vmem_limit=cfg.vmem_limit,
                           vocab_axis=vocab_axis)


def _forward(h_draft, h_target, w_vocab, target_logz, cfg, with_grad):
    """(_Stats of [N], d alpha / d h_draft [N, D] or None), per shard inside shard_map under a partition."""
    part = cfg.partition
    if part is None:
        return _local_forward(h_draft, h_target, w_vocab, target_logz, cfg, with_grad)
    n = h_draft.shape[0]
    rows = [_pad_rows(x, part.row_shards) for x in (h_draft, h_target)]
    specs = [part.rows(2), part.rows(2), P(part.vocab_axis, None)]
    if target_logz is not None:
        rows.append(_pad_rows(target_logz, part.row_shards))
        specs.append(part.rows(1))

    def local(h_d, h_t, w, *logz):
        stats, jac = _local_forward(h_d, h_t, w, logz[0] if logz else None, cfg, with_grad)
        return (stats, jac) if with_grad else stats

    stats_spec = _Stats(*(part.rows(1),) * 5)
    out = part.shard_map(local, tuple(specs), (stats_spec, part.rows(2)) if with_grad else stats_spec)(
        rows[0], rows[1], w_vocab, *rows[2:])
    stats, jac = out if with_grad else (out, None)
    stats = _Stats(*(x[:n] for x in stats))
    return stats, None if jac is None else jac[:n]


def _grad_vocab(h_draft, h_target, w_vocab, stats, g, cfg):
    """d (sum_n g_n alpha_n) / d w_vocab [V, D] f32, per shard (vocab-sharded, summed over rows) under a partition."""
    if cfg.implementation == "chunked":
        return _chunked_grad_vocab(h_draft, h_target, w_vocab, stats, g, cfg.temperature, cfg.block_sizes)
    part = cfg.partition
    kw = dict(temperature=cfg.temperature, block_sizes=cfg.block_sizes, vmem_limit=cfg.vmem_limit,
              interpret=cfg.implementation == "pallas_interpret")
    if part is None:
        return _pallas_grad_vocab(h_draft, h_target, w_vocab, stats, g, **kw)
    pad = functools.partial(_pad_rows, multiple=part.row_shards)  # padded rows get g = 0
    local = functools.partial(_pallas_grad_vocab, row_axes=part.row_axes, **kw)
    return part.shard_map(local, (part.rows(2), part.rows(2), P(part.vocab_axis, None), _Stats(*(part.rows(1),) * 5),
                                  part.rows(1)), P(part.vocab_axis, None))(
        pad(h_draft), pad(h_target), w_vocab, _Stats(*(pad(x) for x in stats)), pad(g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _acceptance(h_draft, h_target, w_vocab, target_logz, cfg):
    """alpha [N] f32 of h_draft, h_target [N, D], w_vocab [V, D] (one common dtype), target_logz [N] or None."""
    return _forward(h_draft, h_target, w_vocab, target_logz, cfg, with_grad=False)[0].alpha


def _acceptance_fwd(h_draft, h_target, w_vocab, target_logz, cfg):
    stats, jac = _forward(h_draft, h_target, w_vocab, target_logz, cfg, with_grad=True)
    return stats.alpha, (h_draft, h_target, w_vocab, target_logz, stats, jac)


def _acceptance_bwd(cfg, residuals, g):
    h_draft, h_target, w_vocab, target_logz, stats, jac = residuals
    g = g.astype(F32)  # [N]
    d_draft = (g[:, None] * jac).astype(h_draft.dtype)  # [N, D]
    d_logz = None if target_logz is None else jnp.zeros_like(target_logz)
    if not cfg.grad_wrt_vocab:
        return d_draft, jnp.zeros_like(h_target), jnp.zeros_like(w_vocab), d_logz
    d_vocab = _grad_vocab(h_draft, h_target, w_vocab, stats, g, cfg)
    return d_draft, jnp.zeros_like(h_target), d_vocab.astype(w_vocab.dtype), d_logz


_acceptance.defvjp(_acceptance_fwd, _acceptance_bwd)


# ----------------------------------------------------------------------------- public entry


def _check_inputs(h_draft, h_target, w_vocab, temperature, mask, block_sizes, implementation, target_logz,
                  grad_wrt_vocab, partition):
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
    if target_logz is not None:
        if jnp.shape(target_logz) != h_draft.shape[:1]:
            raise ValueError(f"target_logz must be [N] = [{h_draft.shape[0]}], got {list(jnp.shape(target_logz))}")
        if grad_wrt_vocab:
            raise ValueError("grad_wrt_vocab needs p normalised over w_vocab: not available with target_logz")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if partition is not None:
        if implementation not in ("pallas", "pallas_interpret"):
            raise ValueError(f"partition is for the Pallas kernels (XLA partitions the {implementation!r} path "
                             "itself); pass partition=None")
        if w_vocab.shape[0] % partition.vocab_shards:
            raise ValueError(f"w_vocab's {w_vocab.shape[0]} rows do not split over the {partition.vocab_shards} "
                             f"shards of mesh axis '{partition.vocab_axis}'")


def fused_acceptance(h_draft, h_target, w_vocab, *, temperature=1.0, mask=None, block_sizes=None,
                     grad_wrt_vocab=False, implementation=None, target_logz=None, partition=None):
    """alpha[N] = sum_v min(p, q) with p = softmax(W h_target / T), q = softmax(W h_draft / T).

    Args:
      h_draft: [N, D] draft hidden states; gradients flow into it.
      h_target: [N, D] target hidden states; its gradient is always zero (stopped).
      w_vocab: [V, D] shared LM head W; gradient zero unless `grad_wrt_vocab`, then both the p and
        the q path.
      temperature: positive Python float T.
      mask: [N] bool or None; masked rows give alpha 0 and zero gradient (their inputs may hold
        anything, NaN included).
      block_sizes: BlockSizes or None for the implementation's default (on a TPU: `tpu_block_sizes`).
      grad_wrt_vocab: differentiate through w_vocab as well.
      implementation: None (TPU -> "pallas", else "chunked", by `placement.platform()`), "reference",
        "chunked", "pallas", "pallas_interpret" (the TPU kernels run by the Pallas interpreter, for CPU tests).
      target_logz: [N] f32 or None: p's log-normaliser over the full vocabulary when w_vocab holds the
        rows of a draft sub-vocabulary (module docstring); no gradient.
      partition: placement.Partition or None: how the operands are laid out over a mesh (Pallas only;
        required under a jit over several TPU devices).

    Returns:
      alpha [N] f32, in [0, 1] up to rounding. Inputs of mixed dtypes are promoted to one; all
      arithmetic past the matmuls is f32.
    """
    if implementation is None:
        implementation = "pallas" if placement.platform() == "tpu" else "chunked"
    mask = None if mask is None else jnp.asarray(mask)
    _check_inputs(h_draft, h_target, w_vocab, temperature, mask, block_sizes, implementation, target_logz,
                  grad_wrt_vocab, partition)
    if implementation == "reference":
        return fused_acceptance_reference(h_draft, h_target, w_vocab, temperature=temperature,
                                          mask=mask, grad_wrt_vocab=grad_wrt_vocab, target_logz=target_logz)
    dtype = jnp.result_type(h_draft, h_target, w_vocab)
    vmem_limit = None
    if block_sizes is None and implementation == "pallas":
        n_local = pl.cdiv(h_draft.shape[0], partition.row_shards) if partition else h_draft.shape[0]
        v_local = w_vocab.shape[0] // (partition.vocab_shards if partition else 1)
        budget = placement.vmem_budget()
        vmem_limit = int(budget / placement.VMEM_SHARE * 0.9)  # 90% of the TensorCore's VMEM
        block_sizes = tpu_block_sizes(n_local, v_local, h_draft.shape[1], jnp.dtype(dtype).itemsize, budget)
    if block_sizes is None:
        block_sizes = CHUNKED_BLOCK_SIZES if implementation == "chunked" else PALLAS_BLOCK_SIZES
    if implementation != "chunked":
        block_sizes.check_tpu()
    h_d, h_t, w = (x.astype(dtype) for x in (h_draft, h_target, w_vocab))
    logz = None if target_logz is None else jnp.asarray(target_logz, F32)
    if mask is not None:  # zeroed rows keep masked garbage out of the kernels and the gradient
        h_d = jnp.where(mask[:, None], h_d, 0)  # [N, D]
        h_t = jnp.where(mask[:, None], h_t, 0)  # [N, D]
        logz = None if logz is None else jnp.where(mask, logz, 0.0)
    cfg = _Config(float(temperature), block_sizes, implementation, bool(grad_wrt_vocab), partition, vmem_limit)
    alpha = _acceptance(h_d, h_t, w, logz, cfg)  # [N]
    return alpha if mask is None else jnp.where(mask, alpha, 0.0)
