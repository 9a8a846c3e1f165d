"""Plain batched generation: a jitted prefill, then one `lax.while_loop` of decode steps.

Prompts of different lengths share a right-padded [B, P] array with explicit `prompt_lengths[B]`
(never inferred from pad ids: SmolLM2's pad id is its EOS and sits inside every chat prompt). Each
sequence has its own position; its first new token is sampled from the hidden state at
`length - 1`, and decode writes its KV slots from `length` on, overwriting the prompt padding.
Shapes are static per (batch, padded prompt length, cache length, max_new_tokens), so there is no
recompilation per token, and prompt lengths are bucketed by `pad_prompts` so there is little per prompt.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import sampling
from bebop_jax.model.transformer import Transformer, TransformerConfig, init_cache


@flax.struct.dataclass
class DecodeState:
    """The carry of the decode loop. Token arrays are [B, N], N = max_new_tokens."""

    step: jax.Array  # [] int32: decode steps taken (tokens[:, :step] are written)
    tokens: jax.Array  # [B, N] int32, -1 after a sequence's end
    num_tokens: jax.Array  # [B] int32 tokens emitted, EOS included
    position: jax.Array  # [B] int32 position of the newest token (its KV is not cached yet)
    done: jax.Array  # [B] bool: emitted EOS or reached N
    cache: tuple  # per-layer KVCache, [B, S, K, H] each
    key: jax.Array


def pad_prompts(prompts: list[list[int]], bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, P] right-padded with 0, lengths [B]); P rounded up to `bucket`."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(-(-lengths.max() // bucket) * bucket)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


def cache_length_for(prompt_width: int, max_new_tokens: int, extra: int = 0, multiple: int = 64) -> int:
    """KV slots needed for a padded prompt plus `max_new_tokens` (+ `extra` scratch), rounded up."""
    need = prompt_width + max_new_tokens + extra
    return int(-(-need // multiple) * multiple)


def check_lengths(lengths: np.ndarray, max_new_tokens: int, max_seq_len: int) -> None:
    """Raises a clear error for prompts that leave no room for `max_new_tokens` in the context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, n in enumerate(np.asarray(lengths)):
        if n + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt {i} has {int(n)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{int(n) + max_new_tokens} positions but the context holds {max_seq_len} "
                "(shorten the prompt, lower --max-new-tokens or raise model.max_seq_len)"
            )


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache_len", "temperature", "top_p", "eos_ids"))
def prefill(params, tokens, lengths, key, *, cfg: TransformerConfig, max_new_tokens: int, cache_len: int,
            temperature: float, top_p: float, eos_ids: tuple[int, ...]) -> DecodeState:
    """Runs the prompts [B, P] (lengths [B]) and samples each sequence's first new token."""
    model = Transformer(cfg)
    B, P = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    hidden, cache = model.apply({"params": params}, tokens, positions, init_cache(cfg, B, cache_len))
    last_hidden = hidden[jnp.arange(B), lengths - 1]  # [B, D]
    logits = model.apply({"params": params}, last_hidden, method=Transformer.logits)  # [B, V]
    key, sub = jax.random.split(key)
    first = sampling.sample(sub, logits, temperature, top_p)  # [B]
    out = jnp.full((B, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    done = sampling.is_eos(first, eos_ids) | (max_new_tokens == 1)
    return DecodeState(jnp.int32(1), out, jnp.ones((B,), jnp.int32), lengths.astype(jnp.int32), done, cache, key)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_p", "eos_ids"), donate_argnums=(1,))
def decode(params, state: DecodeState, *, cfg: TransformerConfig, temperature: float, top_p: float,
           eos_ids: tuple[int, ...]) -> DecodeState:
    """Decodes until every sequence is done, one token per sequence per step."""
    model = Transformer(cfg)
    max_new = state.tokens.shape[1]

    def cond(s: DecodeState):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: DecodeState):
        last = jnp.maximum(s.tokens[:, s.step - 1], 0)  # [B]; finished rows (-1) run a dummy token
        hidden, cache = model.apply({"params": params}, last[:, None], s.position[:, None], s.cache)
        logits = model.apply({"params": params}, hidden[:, 0], method=Transformer.logits)  # [B, V]
        key, sub = jax.random.split(s.key)
        token = jnp.where(s.done, -1, sampling.sample(sub, logits, temperature, top_p))
        done = s.done | sampling.is_eos(token, eos_ids) | (s.step + 1 >= max_new)
        return DecodeState(s.step + 1, s.tokens.at[:, s.step].set(token), s.num_tokens + (~s.done).astype(jnp.int32),
                           s.position + 1, done, cache, key)

    return jax.lax.while_loop(cond, body, state)


def generate(params, cfg: TransformerConfig, prompts: list[list[int]], key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (),
             max_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, max_new_tokens] with -1 after each end, num_tokens [B])."""
    tokens, lengths = pad_prompts(prompts)
    check_lengths(lengths, max_new_tokens, max_seq_len or cfg.max_position_embeddings)
    kw = dict(cfg=cfg, temperature=float(temperature), top_p=float(top_p), eos_ids=tuple(eos_ids))
    state = prefill(params, tokens, lengths, key, max_new_tokens=max_new_tokens,
                    cache_len=cache_length_for(tokens.shape[1], max_new_tokens), **kw)
    state = decode(params, state, **kw)
    return np.asarray(state.tokens), np.asarray(state.num_tokens)
