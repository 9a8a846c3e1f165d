"""The frozen trunk's caches for draft-head training (`bebop pretrain-mtp`), keyed by a fingerprint.

The trunk never changes while the heads train, so over fixed rows [R, T] (`data.layout_rows`) two things
are computed once and stored in `{pretrain.cache_dir}`:
  - `hidden_{fingerprint}.npy`: the trunk's final hidden states [R, T, D], bf16 (`hidden_cache`);
  - `logz_{fingerprint}_t{tau}.npy`: with a draft sub-vocabulary, the full-vocabulary log-normaliser
    of p at the loss temperature, [R, T] f32 (`target_logz_cache`; `losses` docstring).
The fingerprint hashes the trunk (architecture and weights) and the row layout, so runs on the same
rows share the files and a changed model or data never reads stale ones. Files are written to a
temporary name of the writing process and renamed when complete. With several processes, process 0
computes what is missing while the others wait (`load`).
"""

from __future__ import annotations

import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from bebop_jax import data as data_lib
from bebop_jax.model import LoadedModel
from bebop_jax.model.transformer import Transformer, TransformerConfig




@functools.partial(jax.jit, static_argnames=("cfg",))
def trunk_hidden(params, tokens, positions, segment_ids, *, cfg: TransformerConfig):
    """The trunk's final (normed) hidden states [B,T,D] of packed rows, rounded to bf16."""
    hidden, _ = Transformer(cfg).apply({"params": params}, tokens, positions, None, segment_ids)
    return hidden.astype(jnp.bfloat16)


def rows_fingerprint(model: LoadedModel, rows: data_lib.Rows) -> str:
    """A hash of the trunk (architecture and weights) and of the row layout: the cache's identity."""
    h = hashlib.sha1(f"{model.source}|{model.cfg}".encode())
    for a in jax.tree.leaves(model.params) + [rows.tokens, rows.positions, rows.segment_ids]:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def hidden_cache(model: LoadedModel, rows: data_lib.Rows, cache_dir: str, batch_size: int = 8,
                 progress: bool = False, fingerprint: str | None = None) -> np.ndarray:
    """The trunk's hidden states of every row, [R,T,D] bf16, from `cache_dir` or computed once and stored
    there (written to a temporary file of this process, renamed when complete)."""
    path = os.path.join(cache_dir, f"hidden_{fingerprint or rows_fingerprint(model, rows)}.npy")
    if not os.path.isfile(path):
        from tqdm import tqdm

        os.makedirs(cache_dir, exist_ok=True)
        R, T = rows.tokens.shape
        tmp = f"{path}.{jax.process_index()}.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(R, T, model.cfg.hidden_size))
        for start in tqdm(range(0, R, batch_size), desc="trunk hidden cache", disable=not progress):
            idx = np.minimum(np.arange(start, start + batch_size), R - 1)  # the last batch repeats a row
            h = trunk_hidden(model.params, rows.tokens[idx], rows.positions[idx], rows.segment_ids[idx], cfg=model.cfg)
            n = min(batch_size, R - start)
            out[start:start + n] = np.asarray(h)[:n].view(np.uint16)
        out.flush()
        del out
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r").view(ml_dtypes.bfloat16)


@functools.partial(jax.jit, static_argnames=("temperature",))
def full_logz(hidden, w_vocab, *, temperature: float):
    """log sum_v exp(W_v h / tau) [B,T] f32 of hidden states [B,T,D] (any float dtype), W [V,D]."""
    logits = jnp.einsum("BTD,VD->BTV", hidden.astype(jnp.float32), w_vocab, preferred_element_type=jnp.float32)
    return jax.nn.logsumexp(logits / temperature, axis=-1)


def target_logz_cache(hidden: np.ndarray, w_vocab, temperature: float, path: str, batch_size: int = 4,
                      progress: bool = False) -> np.ndarray:
    """`full_logz` of every cached row, [R,T] f32, read from `path` or computed once and stored there."""
    if not os.path.isfile(path):
        from tqdm import tqdm

        out = np.empty(hidden.shape[:2], np.float32)
        for start in tqdm(range(0, len(hidden), batch_size), desc="target log-normalisers", disable=not progress):
            out[start:start + batch_size] = full_logz(np.asarray(hidden[start:start + batch_size]), w_vocab,
                                                      temperature=temperature)
        tmp = f"{path}.{jax.process_index()}.tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, path)
    return np.load(path)


def load(model: LoadedModel, rows: data_lib.Rows, w_vocab, pc, progress: bool):
    """(hidden [R,T,D] bf16, target_logz [R,T] f32 or None without a draft sub-vocabulary (w_vocab None)),
    read from `pc.cache_dir` or computed and stored there.

    With several processes, process 0 computes what is missing while the others wait; they then read
    its files, or, where cache_dir is a disk of their own (not shared with process 0), compute their own.
    """
    fingerprint = rows_fingerprint(model, rows)

    def load():
        hidden = hidden_cache(model, rows, pc.cache_dir, progress=progress, fingerprint=fingerprint)
        if w_vocab is None:
            return hidden, None
        return hidden, target_logz_cache(hidden, w_vocab, pc.temperature, progress=progress, path=os.path.join(
            pc.cache_dir, f"logz_{fingerprint}_t{pc.temperature:g}.npy"))

    first = jax.process_index() == 0
    caches = load() if first else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("pretrain-mtp caches")
    return caches if first else load()
