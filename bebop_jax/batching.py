"""Batching prompts for generation: right-padded prompt arrays, cache lengths, length checks.

Prompts of different lengths share a right-padded [B, P] array with explicit `prompt_lengths[B]`
(never inferred from pad ids: SmolLM2's pad id is its EOS and sits inside every chat prompt). Each
sequence has its own position; its first new token is sampled from the hidden state at
`length - 1`, and decode writes its KV slots from `length` on, overwriting the prompt padding.
Prompt widths are bucketed by `pad_prompts` and cache lengths by `cache_length_for`, so a compiled
rollout serves many prompts; nothing recompiles per token. Below both `generate` and `speculative`.
"""

from __future__ import annotations

import numpy as np


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
