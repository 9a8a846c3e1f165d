"""`generate`: plain sampling, the speculative engine's `mode='none'` (one loop for both).

Prompt batching (padding, cache lengths, length checks) lives in `bebop_jax.batching`.
"""

from __future__ import annotations

import jax
import numpy as np

from bebop_jax.model.transformer import TransformerConfig
from bebop_jax.speculative import speculative_generate


def generate(params, cfg: TransformerConfig, prompts: list[list[int]], key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (),
             max_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain sampling: token lists -> (tokens [B, max_new_tokens] with -1 after each end, num_tokens [B]).

    The speculative engine's `mode='none'` (one loop for plain and speculative decoding).
    """
    out = speculative_generate(params, cfg, prompts, key, mode="none", max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, eos_ids=eos_ids, max_seq_len=max_seq_len)
    return out.tokens, out.num_tokens
