"""Verification of K speculative drafts against the target: exactly lossless rejection sampling.

Implements DESIGN.md "Speculative rollout". One verify step of sequence b has drafts d_1..d_K, the draft
distributions q_1..q_K they were sampled from (q_k conditioned on d_<k) and the target distributions
p_1..p_{K+1} of one forward over [last token, d_1..d_K] (p_k conditioned on d_<k). Three rules, all
emitting 1..K+1 tokens distributed exactly as sampling sequentially from p:

- `rejection` (Leviathan et al. 2023): accept d_k while `u_k <= min(1, p_k(d_k) / q_k(d_k))` (tested
  as `u_k q_k(d_k) <= p_k(d_k)`, no division); at the first rejection emit a token from
  norm(max(p_k - q_k, 0)), after K acceptances a bonus from p_{K+1}.
- `greedy_draft`: the caller drafted argmax q_k, so verification takes q_k one-hot at d_k: accept with
  probability p_k(d_k); the residual is p_k with d_k removed (lossless for any draft chosen without
  the verifier's noise). draft_probs is only validated.
- `block` (Sun et al., "Block Verification Accelerates Speculative Decoding", ICLR 2025, Algorithm 2):
  with w_0 = 1 and w_i = min(w_{i-1} p_i(d_i) / q_i(d_i), 1), the residual after i accepted drafts is
  res_i = max(w_i p_{i+1} - q_{i+1}, 0) with mass Z_i, and h_i = Z_i / (Z_i + 1 - w_i) for i < K,
  h_K = w_K. The number accepted is the largest i with u_i <= h_i (0 if none); then a token from
  norm(res_i), or the bonus from p_{K+1} when i = K. Never fewer accepted drafts in expectation than
  `rejection`, and the same decisions at temperature 0.

Sampling never normalises: a token from norm(r) is argmax(r / E) with E ~ Exp(1) i.i.d. per entry (the
exponential race). Where r is all zero (p == q numerically), the token comes from p instead. All
randomness is drawn in the wrapper from `key`, identically for both implementations, so the jnp
reference and the Pallas kernel return identical tokens: u[B,K] ~ U[tiny, 1) (never 0, so an accept
test `u <= 0` fails and temperature 0 is exact greedy) and E = -log U[tiny, 1) in (0, 87.4]. rejection
and greedy_draft decide from u and the drafts' probabilities alone, so only the one position where a
sequence stops races (E[B,1,V]); block's rule needs the residual mass of every position, so all K+1 race.

The O(B*K) decisions are shared jnp code; the vocabulary-wide work (residual masses and races, one
pass over V) is `_residual_race_reference` (jnp) or `_residual_race_pallas` (kernel: grid over batch
rows x vocab blocks, with a `pl.CostEstimate`). Under a `placement.Partition` the kernel runs per shard
inside `shard_map`, rows over the row axes; where the vocabulary is split, each shard races its own
slice and the shards combine: the residual masses by psum, the winners by an all-gather of each
shard's best (score, token) [B, R] and an argmax over shards (the lowest shard wins ties, so the
lowest vocabulary index does, as unsharded). That moves 2 x B x R numbers where gathering the
probabilities would move 3 x B x R x V. The noise is drawn on the global arrays before the shard_map,
so a sharded call emits exactly the tokens of an unsharded one. Left out on purpose: gradients (sampling is not differentiable, so no
custom_vjp), top-k / top-p (callers pass already filtered probabilities), several sequences per grid
step (one row per step keeps the kernel simple; a TPU tuning knob for later).

Shape letters: B batch, K drafts, R = K+1 target positions, V vocab, Vp padded vocab, Vb vocab block.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from kernels_pallas import placement

MODES = ("rejection", "greedy_draft", "block")
IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_interpret")
PROB_TOLERANCE = 1e-3
_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Pallas kernel: `block_v` vocabulary entries per grid step, a multiple of 128 (the
    TPU lane width). A vocabulary that is not a multiple is padded with zero probabilities."""

    block_v: int = 2048

    def __post_init__(self):
        if not isinstance(self.block_v, int) or self.block_v <= 0 or self.block_v % _LANES:
            raise ValueError(
                f"BlockSizes.block_v: expected a positive multiple of {_LANES}, found {self.block_v!r}")


def row_uniform(key, shape, minval=0.0):
    """Uniforms in [minval, 1) of `shape` from one key [], or from one key per row [B] (shape[0] == B):
    then row b's values depend on its key only, not on the batch it is in."""
    if key.ndim == 0:
        return jax.random.uniform(key, shape, jnp.float32, minval=minval)
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:], jnp.float32, minval=minval))(key)


def _accept_noise(key, batch, num_drafts):
    """Uniforms u[B,K] in [tiny, 1) for the accept tests and the key of the races' exponentials.
    key: [] or one per row [B]."""
    key_u, key_e = jax.random.split(key) if key.ndim == 0 else jax.vmap(jax.random.split)(key).T
    return row_uniform(key_u, (batch, num_drafts), jnp.finfo(jnp.float32).tiny), key_e


def _exponentials(key_e, batch, rows, vocab):
    """E[B,rows,V] ~ Exp(1) in (0, 87.4] for `rows` races per sequence."""
    return -jnp.log(row_uniform(key_e, (batch, rows, vocab), jnp.finfo(jnp.float32).tiny))


def _prefix_weights(mode, p_draft, q_draft):
    """w[B,R]: block's w_0 = 1, w_i = min(w_{i-1} p_i(d_i) / q_i(d_i), 1); all ones in the other modes."""
    if mode != "block":
        return jnp.ones((p_draft.shape[0], p_draft.shape[1] + 1), jnp.float32)

    def step(w, pq):  # w[B]
        p, q = pq
        w_p = w * p
        w = jnp.where(w_p >= q, 1.0, w_p / jnp.where(q > 0, q, 1.0))
        return w, w

    w0 = jnp.ones(p_draft.shape[:1], jnp.float32)
    _, ws = jax.lax.scan(step, w0, (p_draft.T, q_draft.T))  # [K,B]
    return jnp.concatenate([w0[:, None], ws.T], axis=1)  # [B,R]


def _draft_rows(draft_tokens, draft_probs, at=None):
    """(d[B,R'], q[B,R',V]): the draft and the row the race subtracts at each racing position, -1 and 0 at
    the bonus position. All R = K+1 positions, or at[B] one position per sequence (R' = 1)."""
    batch, num_drafts, vocab = draft_probs.shape
    if at is None:
        return (jnp.pad(draft_tokens, ((0, 0), (0, 1)), constant_values=-1),
                jnp.concatenate([draft_probs, jnp.zeros((batch, 1, vocab), draft_probs.dtype)], axis=1))
    k = jnp.minimum(at, num_drafts - 1)[:, None]  # [B,1]
    bonus = (at == num_drafts)[:, None]  # [B,1]
    d = jnp.where(bonus, -1, jnp.take_along_axis(draft_tokens, k, axis=1))  # [B,1]
    q = jnp.where(bonus[..., None], 0.0, jnp.take_along_axis(draft_probs, k[..., None], axis=1))  # [B,1,V]
    return d, q


def _residual_race_reference(mode, draft_col, scale, q_rows, target_probs, expo):
    """Vocabulary pass, jnp, over R' racing positions. res[B,R',V] = max(scale * p - q, 0), with q the
    rows `q_rows` (one-hot at the draft `draft_col`[B,R'] in greedy_draft, where q_rows is None).

    Returns z[B,R'] = sum_v res and token[B,R'] = argmax(res / E), or argmax(p / E) where z == 0.
    """
    if mode == "greedy_draft":
        q_rows = jax.nn.one_hot(draft_col, target_probs.shape[-1], dtype=jnp.float32)  # -1 -> all zero
    res = jnp.maximum(scale[..., None] * target_probs - q_rows, 0.0)
    z = jnp.sum(res, axis=-1)  # [B,R']
    token = jnp.where(z > 0, jnp.argmax(res / expo, axis=-1), jnp.argmax(target_probs / expo, axis=-1))
    return z, token.astype(jnp.int32)


def _race_step(scores, cols, offset, best_ref, token_ref):
    """Fold one block's scores[R,Vb] into the running maximum; ties keep the lowest vocabulary index."""
    best = jnp.max(scores, axis=-1, keepdims=True)  # [R,1]
    first = jnp.min(jnp.where(scores == best, cols, scores.shape[-1]), axis=-1, keepdims=True)  # [R,1]
    better = best > best_ref[0]
    best_ref[0] = jnp.where(better, best, best_ref[0])
    token_ref[0] = jnp.where(better, first + offset, token_ref[0])


def _race_kernel(draft_ref, scale_ref, p_ref, e_ref, *refs, greedy, block_v):
    """Grid (b, j): rows [1,R,Vb] of sequence b, vocabulary block j. The outputs [1,R,1] stay resident
    over j and accumulate: residual mass, best residual score and its token, best p / E and its token."""
    q_ref, (z_ref, best_res_ref, token_res_ref, best_p_ref, token_p_ref) = (
        (None, refs) if greedy else (refs[0], refs[1:]))
    j = pl.program_id(1)
    p = p_ref[0]  # [R,Vb]
    expo = e_ref[0]  # [R,Vb]
    cols = jax.lax.broadcasted_iota(jnp.int32, p.shape, 1)  # [R,Vb]
    q = (cols + j * block_v == draft_ref[0]).astype(jnp.float32) if greedy else q_ref[0]  # [R,Vb]
    res = jnp.maximum(scale_ref[0] * p - q, 0.0)  # [R,Vb]

    @pl.when(j == 0)
    def _init():
        z_ref[0] = jnp.zeros(z_ref.shape[1:], jnp.float32)
        best_res_ref[0] = jnp.full(best_res_ref.shape[1:], -1.0, jnp.float32)
        best_p_ref[0] = jnp.full(best_p_ref.shape[1:], -1.0, jnp.float32)
        token_res_ref[0] = jnp.zeros(token_res_ref.shape[1:], jnp.int32)
        token_p_ref[0] = jnp.zeros(token_p_ref.shape[1:], jnp.int32)

    z_ref[0] += jnp.sum(res, axis=-1, keepdims=True)
    _race_step(res / expo, cols, j * block_v, best_res_ref, token_res_ref)
    _race_step(p / expo, cols, j * block_v, best_p_ref, token_p_ref)


def _race_pallas_local(mode, draft_col, scale, q_rows, target_probs, expo, *, block_sizes, interpret):
    """The kernel on (a shard of) the rows and vocabulary: z[B,R'] and each race's (best score, token)[B,R']."""
    batch, rows, vocab = target_probs.shape
    block_v = min(block_sizes.block_v, pl.cdiv(vocab, _LANES) * _LANES)
    pad = pl.cdiv(vocab, block_v) * block_v - vocab
    pad_v = ((0, 0), (0, 0), (0, pad))
    greedy = mode == "greedy_draft"
    vocab_inputs = [jnp.pad(target_probs, pad_v), jnp.pad(expo, pad_v, constant_values=1.0)]  # [B,R',Vp]
    if not greedy:
        vocab_inputs.append(jnp.pad(q_rows, pad_v))
    row_spec = pl.BlockSpec((1, rows, 1), lambda b, j: (b, 0, 0))
    vocab_spec = pl.BlockSpec((1, rows, block_v), lambda b, j: (b, 0, j))
    row_f32 = jax.ShapeDtypeStruct((batch, rows, 1), jnp.float32)
    row_i32 = jax.ShapeDtypeStruct((batch, rows, 1), jnp.int32)
    elements = batch * rows * (vocab + pad)
    outs = pl.pallas_call(
        functools.partial(_race_kernel, greedy=greedy, block_v=block_v),
        out_shape=(row_f32, row_f32, row_i32, row_f32, row_i32),
        grid=(batch, (vocab + pad) // block_v),
        in_specs=[row_spec, row_spec] + [vocab_spec] * len(vocab_inputs),
        out_specs=(row_spec,) * 5,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=12 * elements, transcendentals=0,
                                      bytes_accessed=4 * elements * len(vocab_inputs)),
        interpret=interpret,
    )(draft_col[..., None], scale[..., None], *vocab_inputs)  # outputs [B,R',1]
    return tuple(x[..., 0] for x in outs)  # z, best_res, token_res, best_p, token_p: [B,R'] each


def _best_over_shards(best, token, axis, shard_vocab):
    """The winner over the vocab shards of `axis`: the highest score, the lowest shard on ties; global ids."""
    token = token + jax.lax.axis_index(axis) * shard_vocab
    bests, tokens = jax.lax.all_gather(best, axis), jax.lax.all_gather(token, axis)  # [S,B,R]
    winner = jnp.argmax(bests, axis=0)[None]  # [1,B,R]
    return jnp.take_along_axis(tokens, winner, axis=0)[0]


def _residual_race_pallas(mode, draft_col, scale, q_rows, target_probs, expo, *, block_sizes, interpret,
                          partition=None):
    """Same contract as `_residual_race_reference`, as a Pallas kernel over (batch row, vocab block), per
    shard of `partition` when given (module docstring)."""
    local = functools.partial(_race_pallas_local, mode, block_sizes=block_sizes, interpret=interpret)
    greedy = mode == "greedy_draft"
    if partition is None:
        z, _, token_res, _, token_p = local(draft_col, scale, q_rows, target_probs, expo)
        return z, jnp.where(z > 0, token_res, token_p)
    batch, vocab_axis = draft_col.shape[0], partition.vocab_axis
    shard_vocab = target_probs.shape[-1] // partition.vocab_shards

    def sharded(draft_col, scale, target_probs, expo, *q_rows):
        if vocab_axis is not None and greedy:  # the kernel compares drafts with local ids
            draft_col = draft_col - jax.lax.axis_index(vocab_axis) * shard_vocab
        z, best_res, token_res, best_p, token_p = local(draft_col, scale, q_rows[0] if q_rows else None,
                                                        target_probs, expo)
        if vocab_axis is not None:
            z = jax.lax.psum(z, vocab_axis)
            token_res = _best_over_shards(best_res, token_res, vocab_axis, shard_vocab)
            token_p = _best_over_shards(best_p, token_p, vocab_axis, shard_vocab)
        return z, jnp.where(z > 0, token_res, token_p)

    pad = lambda x: jnp.pad(x, ((0, -batch % partition.row_shards),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
    rows, vocab = partition.rows(2), P(partition.row_axes or None, None, vocab_axis)
    inputs = [draft_col, scale, target_probs, expo] + ([] if greedy else [q_rows])
    z, token = partition.shard_map(sharded, (rows, rows) + (vocab,) * (len(inputs) - 2), (rows, rows))(
        *map(pad, inputs))
    return z[:batch], token[:batch]


def _num_accepted(mode, p_draft, q_draft, w, z, u):
    """How many drafts each sequence accepts, [B] in 0..K (block: from every position's residual mass z)."""
    num_drafts = p_draft.shape[1]
    if mode == "block":
        z_mid, w_mid = z[:, 1:num_drafts], w[:, 1:num_drafts]  # [B,K-1]
        denom = z_mid + 1.0 - w_mid  # 0 only where z = 0 and w = 1: then h = 1 (the limit Z / Z)
        h_mid = jnp.where(denom > 0, z_mid / jnp.where(denom > 0, denom, 1.0), 1.0)
        h = jnp.concatenate([h_mid, w[:, num_drafts:]], axis=1)  # [B,K]
        return jnp.max(jnp.where(u <= h, jnp.arange(1, num_drafts + 1), 0), axis=1)
    accept = u * q_draft <= p_draft if mode == "rejection" else u <= p_draft  # [B,K]
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)


def _sample(draft_tokens, draft_probs, target_probs, key, mode, race):
    """Noise, prefix weights, decisions and the vocabulary pass `race`: the path both implementations share.

    rejection and greedy_draft decide from the drafts' own probabilities, so only the position where a
    sequence stops (its first rejected draft, or the bonus) races: one row of noise and one residual per
    sequence. block's rule needs every position's residual mass, so every position races there.
    Returns tokens[B,R] (-1 after the emitted ones) and num_emitted[B].
    """
    draft_tokens = jnp.asarray(draft_tokens, jnp.int32)
    draft_probs = jnp.asarray(draft_probs, jnp.float32)
    target_probs = jnp.asarray(target_probs, jnp.float32)
    batch, num_drafts = draft_tokens.shape
    vocab = target_probs.shape[-1]
    u, key_e = _accept_noise(key, batch, num_drafts)
    index = draft_tokens[..., None]  # [B,K,1]
    p_draft = jnp.take_along_axis(target_probs[:, :num_drafts], index, axis=-1)[..., 0]  # [B,K]
    q_draft = jnp.take_along_axis(draft_probs, index, axis=-1)[..., 0]  # [B,K]
    w = _prefix_weights(mode, p_draft, q_draft)  # [B,R]
    scale = w.at[:, num_drafts].set(1.0)  # the bonus position races plain p_{K+1}
    if mode == "block":
        draft_col, q_rows = _draft_rows(draft_tokens, draft_probs)
        expo = _exponentials(key_e, batch, num_drafts + 1, vocab)
        z, race_token = race(mode, draft_col, scale, q_rows, target_probs, expo)  # [B,R] each
        n = _num_accepted(mode, p_draft, q_draft, w, z, u)
        correction = jnp.take_along_axis(race_token, n[:, None], axis=1)  # [B,1]
    else:
        n = _num_accepted(mode, p_draft, q_draft, w, None, u)
        draft_col, q_rows = _draft_rows(draft_tokens, draft_probs, at=n)  # [B,1], [B,1,V]
        p_at = jnp.take_along_axis(target_probs, n[:, None, None], axis=1)  # [B,1,V]
        _, correction = race(mode, draft_col, jnp.ones((batch, 1), jnp.float32), None if mode == "greedy_draft"
                             else q_rows, p_at, _exponentials(key_e, batch, 1, vocab))  # [B,1]
    pos = jnp.arange(num_drafts + 1)[None, :]  # [1,R]
    drafts = jnp.pad(draft_tokens, ((0, 0), (0, 1)))  # [B,R]
    tokens = jnp.where(pos < n[:, None], drafts, jnp.where(pos == n[:, None], correction, -1))
    return tokens.astype(jnp.int32), (n + 1).astype(jnp.int32)


def rejection_sample_reference(draft_tokens, draft_probs, target_probs, key, *, mode="rejection"):
    """The definition in pure jnp; arguments and results as `rejection_sample`, no validation."""
    return _sample(draft_tokens, draft_probs, target_probs, key, mode, _residual_race_reference)


def _rejection_sample_pallas(draft_tokens, draft_probs, target_probs, key, *, mode="rejection",
                             block_sizes=BlockSizes(), interpret: bool = False, partition=None):
    """`rejection_sample` with the vocabulary pass as a Pallas kernel (interpret=True runs it on CPU)."""
    race = functools.partial(_residual_race_pallas, block_sizes=block_sizes, interpret=interpret,
                             partition=partition)
    return _sample(draft_tokens, draft_probs, target_probs, key, mode, race)


@functools.partial(jax.jit, static_argnames=("mode", "implementation", "partition"))
def _rejection_sample_jit(draft_tokens, draft_probs, target_probs, key, mode, implementation, partition):
    """The compiled call behind `rejection_sample`; implementation is resolved (never None) here."""
    if implementation == "reference":
        return rejection_sample_reference(draft_tokens, draft_probs, target_probs, key, mode=mode)
    return _rejection_sample_pallas(draft_tokens, draft_probs, target_probs, key, mode=mode,
                                    interpret=implementation == "pallas_interpret", partition=partition)


def _validate(draft_tokens, draft_probs, target_probs, mode, implementation, check_values):
    """Raise ValueError naming the bad argument. Modes, shapes and dtypes always; with check_values,
    also ids and probabilities, on concrete (untraced) arrays only."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, found {mode!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, found {implementation!r}")
    if jnp.ndim(draft_tokens) != 2 or jnp.shape(draft_tokens)[1] < 1:
        raise ValueError(f"draft_tokens: expected shape [B, K] with K >= 1, found {jnp.shape(draft_tokens)}")
    if not jnp.issubdtype(jnp.result_type(draft_tokens), jnp.integer):
        raise ValueError(f"draft_tokens: expected an integer dtype, found {jnp.result_type(draft_tokens)}")
    batch, num_drafts = jnp.shape(draft_tokens)
    if jnp.ndim(target_probs) != 3 or jnp.shape(target_probs)[:2] != (batch, num_drafts + 1):
        raise ValueError(f"target_probs: expected shape [B, K+1, V] = ({batch}, {num_drafts + 1}, V) "
                         f"(B, K from draft_tokens), found {jnp.shape(target_probs)}")
    vocab = jnp.shape(target_probs)[2]
    if jnp.shape(draft_probs) != (batch, num_drafts, vocab):
        raise ValueError(f"draft_probs: expected shape [B, K, V] = {(batch, num_drafts, vocab)} "
                         f"(B, K from draft_tokens, V from target_probs), found {jnp.shape(draft_probs)}")
    for name, probs in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        if not jnp.issubdtype(jnp.result_type(probs), jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, found {jnp.result_type(probs)}")
    if not check_values or any(isinstance(x, jax.core.Tracer) for x in (draft_tokens, draft_probs, target_probs)):
        return
    low, high = int(jnp.min(draft_tokens)), int(jnp.max(draft_tokens))
    if low < 0 or high >= vocab:
        raise ValueError(f"draft_tokens: expected ids in [0, {vocab}), found ids in [{low}, {high}]")
    for name, probs in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        smallest = float(jnp.min(probs))
        if smallest < 0:
            raise ValueError(f"{name}: expected non-negative probabilities, found minimum {smallest:g}")
        sums = jnp.sum(jnp.asarray(probs, jnp.float32), axis=-1)
        lo, hi = float(jnp.min(sums)), float(jnp.max(sums))
        if lo < 1 - PROB_TOLERANCE or hi > 1 + PROB_TOLERANCE:
            raise ValueError(f"{name}: expected probabilities summing to 1 (tolerance {PROB_TOLERANCE:g}) "
                             f"over V, found sums in [{lo:.6g}, {hi:.6g}]")


def rejection_sample(draft_tokens, draft_probs, target_probs, key, *, mode="rejection", implementation=None,
                     validate=True, partition=None):
    """Verify K drafts per sequence; the emitted tokens are distributed exactly as sampling from p.

    draft_tokens[B,K] int, draft_probs[B,K,V] float (q_k, the distribution d_k was sampled from),
    target_probs[B,K+1,V] float (p_1..p_{K+1} from the verify forward), key: a jax PRNG key, or one per
    sequence [B] (each row's noise then depends on its own key only).
    mode: "rejection" | "greedy_draft" | "block" (see the module docstring); implementation: None
    (Pallas kernel on TPU, jnp reference elsewhere, by `placement.platform()`), "reference", "pallas",
    "pallas_interpret"; partition: a `placement.Partition` of the rows and vocabulary (the Pallas kernel
    under a jit over several devices), None for none.
    Returns tokens[B,K+1] int32 (the accepted drafts, then the correction or bonus token, then -1)
    and num_emitted[B] int32 in 1..K+1. Jittable with mode, implementation and validate static.
    Bad modes, shapes and dtypes always raise ValueError; validate=True also checks, on concrete
    inputs (not under jit), ids in [0, V) and probabilities >= 0 summing to 1 within PROB_TOLERANCE.
    """
    _validate(draft_tokens, draft_probs, target_probs, mode, implementation, check_values=validate)
    if implementation is None:
        implementation = "pallas" if placement.platform() == "tpu" else "reference"
    if partition is not None:
        if implementation == "reference":
            raise ValueError("partition is for the Pallas kernel (XLA partitions the reference itself); "
                             "pass partition=None")
        if jnp.shape(target_probs)[-1] % partition.vocab_shards:
            raise ValueError(f"target_probs: the vocabulary {jnp.shape(target_probs)[-1]} does not split over the "
                             f"{partition.vocab_shards} shards of mesh axis '{partition.vocab_axis}'")
    return _rejection_sample_jit(draft_tokens, draft_probs, target_probs, key, mode, implementation, partition)
