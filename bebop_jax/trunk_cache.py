"""The frozen trunk's caches for draft-head training (`bebop pretrain-mtp`), keyed by a fingerprint.

The trunk never changes while the heads train, so over fixed rows [R, T] (`data.layout_rows`) two things
are computed once and stored in `{pretrain.cache_dir}`:
  - `hidden_{fingerprint}.npy`: the trunk's final hidden states [R, T, D], bf16 (`hidden_cache`);
  - `logz_{fingerprint}_t{tau}.npy`: with a draft sub-vocabulary, the full-vocabulary log-normaliser
    of p at the loss temperature, [R, T] f32 (`target_logz_cache`; `losses` docstring).
The fingerprint hashes the trunk (architecture and weights) and the row layout, so runs on the same
rows share the files and a changed model or data never reads stale ones. Rows run in batches of similar
filled length cut to it (on the SmolLM2 mix 73% of the full [R, T] work). Files are written to a
temporary name of the writing process and renamed when complete; the hidden states' computation
resumes where an interrupted one stopped. With several processes on a shared cache directory each
computes a share of both caches, which process 0 gathers (`load`).
"""

from __future__ import annotations

import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bebop_jax import data as data_lib
from bebop_jax.distributed import barrier, processes_seeing
from bebop_jax.model import LoadedModel
from bebop_jax.model.transformer import Transformer, TransformerConfig, vocab_logits


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


def filled_lengths(rows: data_lib.Rows) -> np.ndarray:
    """[R] int: one past each row's last non-padding position (segment id 0 is padding)."""
    filled = rows.segment_ids > 0
    return np.where(filled.any(1), rows.tokens.shape[1] - np.argmax(filled[:, ::-1], axis=1), 0)


def length_batches(rows: data_lib.Rows, batch_size: int, multiple: int = 32):
    """Rows in order of filled length, in batches: [(row ids [batch_size], columns L)], L the batch's
    longest filled length rounded up to `multiple` (at most T: few distinct shapes to compile). The trunk
    is causal, so states at positions < L do not depend on the columns cut; the last batch repeats a row."""
    R, T = rows.tokens.shape
    lengths = filled_lengths(rows)
    order = np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, R, batch_size):
        idx = order[np.minimum(np.arange(start, start + batch_size), R - 1)]
        out.append((idx, int(min(T, -(-max(int(lengths[idx].max()), 1) // multiple) * multiple))))
    return out


_RESUME_EVERY = 16  # batches between the hidden cache's resume points


def _fill_hidden(model: LoadedModel, rows: data_lib.Rows, tmp: str, batches: list, progress: bool) -> None:
    """Writes the trunk's states of `batches` (`length_batches`) into the [R,T,D] bf16 file `tmp`, with a
    count of the batches done beside it (every `_RESUME_EVERY`), so an interrupted run resumes there."""
    from tqdm import tqdm

    R, T = rows.tokens.shape
    done_file = f"{tmp}.done"
    done = int(open(done_file).read()) if os.path.isfile(tmp) and os.path.isfile(done_file) else 0
    out = np.lib.format.open_memmap(tmp, mode="r+" if done else "w+", dtype=np.uint16,
                                    shape=(R, T, model.cfg.hidden_size))
    for b in tqdm(range(done, len(batches)), initial=done, total=len(batches), desc="trunk hidden cache",
                  disable=not progress):
        idx, L = batches[b]
        h = trunk_hidden(model.params, rows.tokens[idx, :L], rows.positions[idx, :L],
                         rows.segment_ids[idx, :L], cfg=model.cfg)
        out[idx, :L] = np.where(rows.segment_ids[idx, :L, None] > 0, np.asarray(h).view(np.uint16), 0)
        if (b + 1) % _RESUME_EVERY == 0:  # the states first, then the count that vouches for them
            out.flush()
            with open(done_file, "w") as f:
                f.write(str(b + 1))
    out.flush()
    if os.path.isfile(done_file):
        os.remove(done_file)


def _read(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r").view(ml_dtypes.bfloat16)


def hidden_cache(model: LoadedModel, rows: data_lib.Rows, cache_dir: str, batch_size: int = 8,
                 progress: bool = False, fingerprint: str | None = None, multiple: int = 32,
                 part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The trunk's hidden states of every row, [R,T,D] bf16 (zero past a row's filled length), from
    `cache_dir` or computed once and stored there.

    Rows run in batches of similar filled length, cut to it (`length_batches`, columns a multiple of
    `multiple`), into a temporary file of the computing process (resumable, `_fill_hidden`), renamed when
    complete. `part` = (i, n), with every process of a shared `cache_dir` calling: process i computes
    every n-th batch, and process 0 gathers the parts into the one file.
    """
    path = os.path.join(cache_dir, f"hidden_{fingerprint or rows_fingerprint(model, rows)}.npy")
    if os.path.isfile(path):
        return _read(path)
    os.makedirs(cache_dir, exist_ok=True)
    (i, n), batches = part, length_batches(rows, batch_size, multiple)
    tmp = lambda j: f"{path}.{j}.tmp"  # noqa: E731
    _fill_hidden(model, rows, tmp(jax.process_index()), batches[i::n], progress)
    _gather_parts(path, tmp, batches, part, "hidden cache")
    return _read(path)


def _gather_parts(path: str, tmp, batches: list, part: tuple[int, int], name: str) -> None:
    """Makes `path` of the parts that processes 0..n-1 of `part` = (i, n) wrote into the .npy files `tmp(j)`
    (process j its batches[j::n] of `length_batches`): process 0 copies the others' batches into its own
    file and renames it; every process waits for that (bounded barriers, named by `name`). With n = 1
    (a cache_dir of each process's own) every process renames its own file `tmp(process index)`."""
    i, n = part
    own = tmp(jax.process_index())
    if n > 1:
        barrier(f"pretrain-mtp {name} parts", timeout_s=24 * 3600.0)
        if i == 0:
            out = np.load(own, mmap_mode="r+")
            for j in range(1, n):
                src = np.load(tmp(j), mmap_mode="r")
                for idx, L in batches[j::n]:
                    out[idx, :L] = src[idx, :L]
                del src
                os.remove(tmp(j))
            out.flush()
            del out
    if i == 0:
        os.replace(own, path)
    if n > 1:
        barrier(f"pretrain-mtp {name}", timeout_s=3600.0)


@functools.partial(jax.jit, static_argnames=("temperature",))
def full_logz(hidden, w_vocab, *, temperature: float):
    """log sum_v exp(W_v h / tau) [B,T] f32 of hidden states [B,T,D] (any float dtype), W [V,D]."""
    logits = vocab_logits(hidden.astype(jnp.float32), w_vocab, w_vocab.dtype)  # [B,T,V]
    return jax.nn.logsumexp(logits / temperature, axis=-1)


def target_logz_cache(hidden: np.ndarray, rows: data_lib.Rows, w_vocab, temperature: float, path: str,
                      batch_size: int = 8, progress: bool = False, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """`full_logz` of every cached row, [R,T] f32 (zero past a row's filled length), read from `path` or
    computed once (in `length_batches`) and stored there. `part` = (i, n) as in `hidden_cache`: process i
    computes every n-th batch and process 0 gathers the parts into the one file."""
    if os.path.isfile(path):
        return np.load(path)
    from tqdm import tqdm

    (i, n), batches = part, length_batches(rows, batch_size)
    out = np.zeros(hidden.shape[:2], np.float32)
    for idx, L in tqdm(batches[i::n], desc="target log-normalisers", disable=not progress):
        out[idx, :L] = full_logz(np.asarray(hidden[idx, :L]), w_vocab, temperature=temperature)
    tmp = lambda j: f"{path}.{j}.tmp.npy"  # noqa: E731
    np.save(tmp(jax.process_index()), out)
    _gather_parts(path, tmp, batches, part, "log-normalisers")
    return np.load(path)


def load(model: LoadedModel, rows: data_lib.Rows, w_vocab, pc, progress: bool):
    """(hidden [R,T,D] bf16, target_logz [R,T] f32 or None without a draft sub-vocabulary (w_vocab None)),
    read from `pc.cache_dir` or computed and stored there.

    With several processes on a shared cache_dir, each computes its share of both caches and process 0
    gathers the parts; where cache_dir is a disk of each process's own, each computes its own caches.
    """
    fingerprint = rows_fingerprint(model, rows)
    shared = all(processes_seeing(pc.cache_dir, "pretrain.cache_dir"))
    part = (jax.process_index(), jax.process_count()) if shared else (0, 1)
    hidden = hidden_cache(model, rows, pc.cache_dir, progress=progress, fingerprint=fingerprint, part=part)
    if w_vocab is None:
        return hidden, None
    path = os.path.join(pc.cache_dir, f"logz_{fingerprint}_t{pc.temperature:g}.npy")
    return hidden, target_logz_cache(hidden, rows, w_vocab, pc.temperature, path, progress=progress, part=part)
