"""Token distributions from logits: temperature, top-p, sampling, and per-token statistics.

`probs_from_logits` is the one definition of "the policy's distribution" used everywhere: plain
sampling draws from it, speculative verification compares against it, RL records its log-probs.
Temperature 0 means greedy: a one-hot distribution at the argmax. The temperature may be a Python
float or a traced scalar (so one compiled rollout serves every temperature); greedy decoding is
chosen by a Python 0.0 only, since it changes the program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.rejection_sampling import row_uniform


def sequence_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per row [B]: fold_in(key, b). A row then draws the same noise in any batch that gives it
    the same key (pass fold_in(key, sequence id) for each row to make a run batch-invariant)."""
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def split_rows(keys: jax.Array, num: int) -> tuple[jax.Array, ...]:
    """`num` new keys per row of keys [B]: a tuple of num arrays [B]."""
    out = jax.vmap(lambda k: jax.random.split(k, num))(keys)  # [B, num]
    return tuple(out[:, i] for i in range(num))


def is_greedy(temperature) -> bool:
    """True for a Python (static) temperature of 0; a traced temperature is taken as > 0."""
    return isinstance(temperature, (int, float)) and temperature == 0.0


def probs_from_logits(logits: jax.Array, temperature, top_p: float = 1.0) -> jax.Array:
    """logits [..., V] -> probabilities [..., V] (float32) at `temperature` within the top-p nucleus."""
    logits = logits.astype(jnp.float32)
    if is_greedy(temperature):
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    if top_p < 1.0:
        probs = _top_p_filter(probs, top_p)
    return probs


def _top_p_filter(probs: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    sorted_probs = -jnp.sort(-probs, axis=-1)  # [..., V] descending
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.where(mass_before < top_p, sorted_probs, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # smallest kept probability
    filtered = jnp.where(probs >= threshold, probs, 0.0)
    return filtered / jnp.sum(filtered, axis=-1, keepdims=True)


def sample(key: jax.Array, logits: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """One token per row: logits [..., V] -> int32 [...]. key: one key, or one per row of the leading
    axis (`categorical`)."""
    if is_greedy(temperature):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_p < 1.0:
        return categorical(key, probs_from_logits(logits, temperature, top_p))
    z = logits.astype(jnp.float32) / temperature
    return categorical(key, jnp.exp(z - jnp.max(z, axis=-1, keepdims=True)))


def _last_positive(w: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis of w [..., n]."""
    return w.shape[-1] - 1 - jnp.argmax(jnp.flip(w > 0, axis=-1), axis=-1)


def categorical(key: jax.Array, weights: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from unnormalised weights [..., V] >= 0 (not all 0) -> int32 [...].

    key: one key [], or one key per entry of the leading axis [B] (weights [B, ..., V]), each row's draw
    then depending on its own key only.

    Inverse CDF with one uniform per row, searched in two levels (block sums, then one block of
    `block` entries), so a draw costs a pass over the weights instead of the V Gumbel draws of
    `jax.random.categorical` (1.0 against 29 ms for [32, 49152] f32 on this 2-core CPU). Entries of
    weight 0 are never drawn, float rounding included.
    """
    *lead, V = weights.shape
    w = weights.reshape(-1, V).astype(jnp.float32)
    w = jnp.pad(w, ((0, 0), (0, -V % block))).reshape(w.shape[0], -1, block)  # [R, nb, block]
    block_sums = jnp.sum(w, axis=-1)  # [R, nb]
    cum_blocks = jnp.cumsum(block_sums, axis=-1)
    u = (1.0 - row_uniform(key, tuple(lead)).reshape(-1)) * cum_blocks[:, -1]  # in (0, total]
    b = jnp.minimum(jnp.sum(cum_blocks < u[:, None], axis=-1), _last_positive(block_sums))  # [R]
    before = jnp.take_along_axis(cum_blocks - block_sums, b[:, None], axis=-1)[:, 0]
    row = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]  # [R, block]
    j = jnp.minimum(jnp.sum(before[:, None] + jnp.cumsum(row, axis=-1) < u[:, None], axis=-1), _last_positive(row))
    return (b * block + j).astype(jnp.int32).reshape(lead)


def token_logprob_and_entropy(logits: jax.Array, tokens: jax.Array, temperature: float,
                              top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """log p(token) and the entropy of p (nats), p = the sampling distribution (`probs_from_logits`:
    softmax(logits / T) within the top-p nucleus); logits [..., V], tokens [...].

    At temperature 0 both are taken at T=1 (the greedy policy's own distribution is one-hot).
    """
    t = 1.0 if is_greedy(temperature) else temperature
    if top_p < 1.0:
        p = probs_from_logits(logits, t, top_p)
        logp = jnp.log(p)  # -inf outside the nucleus, where p = 0 contributes 0 to the entropy
        entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    else:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    token_logp = jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[..., None], axis=-1)[..., 0]
    return token_logp, entropy


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """tokens [...] -> bool [...]: equal to one of the (static) end-of-sequence ids."""
    out = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        out = out | (tokens == e)
    return out
