"""Training data of the draft heads: prompt sources, self-distilled token shards, corpora, grain pipelines.

A sequence is (tokens, prompt_length): the prompt, then the completion. Only completion tokens are
targets of the draft losses (a corpus document has prompt_length 0). Two sources:
  - self-distillation: prompts (the built-in math generator, or a JSONL file of {"prompt": str} or
    {"messages": [...]}) completed by the policy at the rollout temperature (`sample_shards`), stored
    as token shards `{dir}/{split}/shard_00000.npz` (tokens flat, lengths, prompt_lengths);
  - a plain corpus: a .txt file (documents separated by blank lines) or a JSONL file of {"text": str}.
Sequences are laid out once into fixed rows [R, T] (`layout_rows`: one sequence per row, or packed
first-fit), with positions, segment ids (0 = padding) and a completion mask, so that the trunk's hidden
states of a row can be cached once. Padding is marked by segment id 0, never inferred from a pad id
(SmolLM2's pad id is its EOS, which occurs inside every chat prompt). `row_iterator` is the grain
pipeline: shuffle (a new order each epoch) -> repeat -> batch (on a mesh: each process's rows of every
global batch), with `get_state`/`set_state`.
Left out on purpose: on-the-fly packing after shuffling (rows must be fixed for the hidden cache).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bebop_jax import distributed
from bebop_jax.sharding import Rules


@dataclasses.dataclass
class Sequences:
    """Token sequences with the length of each one's prompt."""

    tokens: list[np.ndarray]  # each int32 [L]
    prompt_lengths: np.ndarray  # [n] int32

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------
# Prompt sources and self-distillation


PROMPT_SOURCES = ("math", "math:easy", "math:grade", "tool", "code", "chat")


def _source_prompts(source: str, num: int, rng: np.random.Generator) -> list[list[dict]]:
    """`num` first-turn prompts of a source: an RL environment's exactly as the actor sees them
    (`Task.messages`), or general instructions (`chat`, `bebop_jax.chat_prompts`)."""
    from bebop_jax.rl.environments import make_environment

    if source == "chat":
        from bebop_jax.chat_prompts import make_prompt

        return [[{"role": "user", "content": make_prompt(rng)}] for _ in range(num)]
    name, _, level = source.partition(":")
    env = make_environment(name, **({"level": level or "grade"} if name == "math" else {}))
    return [list(task.messages) for task in env.sample_tasks(rng, num)]


def load_prompts(spec: str, num: int, seed: int) -> list[list[dict]]:
    """`num` prompts as chat messages: built-in RL prompt sources, or a JSONL file.

    `spec` is one of PROMPT_SOURCES ("math" = "math:grade"; "chat": general instructions), a comma-separated mix of them
    (e.g. "math:easy,math:grade,tool,code": the prompts go round-robin over the sources, each with its
    own generator), or a JSONL file of {"prompt": str} or {"messages": [{"role", "content"}, ...]}
    records; trailing assistant turns are dropped (the policy writes its own). A file with fewer
    than `num` records is an error.
    """
    sources = [s.strip() for s in spec.split(",")]
    if all(s in PROMPT_SOURCES for s in sources):
        share = [len(range(i, num, len(sources))) for i in range(len(sources))]
        drawn = [_source_prompts(s, n, np.random.default_rng([seed, i])) if len(sources) > 1
                 else _source_prompts(s, n, np.random.default_rng(seed))
                 for i, (s, n) in enumerate(zip(sources, share))]
        return [drawn[i % len(sources)][i // len(sources)] for i in range(num)]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"data.prompts: '{spec}' is neither a built-in source ({', '.join(PROMPT_SOURCES)}, "
                                "or a comma-separated mix of them) nor an existing JSONL file")
    prompts = []
    with open(spec) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "messages" in record:
                messages = list(record["messages"])
                while messages and messages[-1].get("role") == "assistant":
                    messages.pop()
            elif "prompt" in record:
                messages = [{"role": "user", "content": record["prompt"]}]
            else:
                raise ValueError(f"{spec}:{line_no}: expected a 'prompt' or 'messages' field, got {sorted(record)}")
            if not messages:
                raise ValueError(f"{spec}:{line_no}: no prompt left after dropping assistant turns")
            prompts.append(messages)
    if len(prompts) < num:
        raise ValueError(f"{spec} holds {len(prompts)} prompts; {num} were asked for")
    return prompts[:num]


def encode_prompts(tokenizer, prompts: list[list[dict]], chat: bool) -> list[list[int]]:
    """Chat messages -> token ids: with `chat` through the model's template, else the user texts joined."""
    if chat:
        return [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in prompts]
    return [tokenizer.encode("\n".join(turn["content"] for turn in m)) for m in prompts]


def write_shard(path: str, seqs: Sequences) -> None:
    """One .npz shard: tokens (flat int32), lengths, prompt_lengths; written atomically."""
    lengths = np.array([len(t) for t in seqs.tokens], np.int32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=np.concatenate(seqs.tokens).astype(np.int32), lengths=lengths,
             prompt_lengths=np.asarray(seqs.prompt_lengths, np.int32))
    os.replace(tmp, path)


def read_shards(directory: str) -> Sequences:
    """Every sequence of `{directory}/shard_*.npz`, in shard order."""
    files = sorted(glob.glob(os.path.join(directory, "shard_*.npz")))
    if not files:
        raise FileNotFoundError(f"no token shards (shard_*.npz) in '{directory}'; run `bebop sample-data` first")
    tokens, prompt_lengths = [], []
    for file in files:
        with np.load(file) as shard:
            offsets = np.concatenate([[0], np.cumsum(shard["lengths"])])
            tokens += [shard["tokens"][a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            prompt_lengths.append(shard["prompt_lengths"])
    return Sequences(tokens, np.concatenate(prompt_lengths).astype(np.int32))


def read_split(data_cfg, split: str) -> Sequences:
    """The `split` ("train" or "heldout") of `data.dir` and of each of `data.extra_dirs`, in that order."""
    parts = [read_shards(os.path.join(d, split)) for d in data_cfg.dirs]
    return Sequences([t for p in parts for t in p.tokens], np.concatenate([p.prompt_lengths for p in parts]))


def sample_shards(model, prompts: list[list[int]], directory: str, key: jax.Array, *, temperature: float,
                  max_new_tokens: int, batch_size: int, max_seq_len: int, eos_ids: tuple[int, ...],
                  progress=None) -> Sequences:
    """Completes `prompts` with the policy, `batch_size` at a time, one shard per batch.

    Batches take the prompts in order of length (stable), so a batch pads to its own width, not the
    longest prompt's (a mix of 56- and 133-token prompts otherwise pads every prefill to 192). Batch i
    samples with `fold_in(key, i)`; a shard already on disk is kept, so an interrupted run resumes
    where it stopped. The last batch is padded with repeats to keep one compiled shape. On several
    processes process p samples batches p, p + count, ... (the same shards as one process, written
    once each), then all wait for all (`distributed.barrier`) and read them.
    """
    from bebop_jax.generate import generate

    os.makedirs(directory, exist_ok=True)
    by_length = [prompts[i] for i in np.argsort([len(p) for p in prompts], kind="stable")]
    for i, start in enumerate(range(0, len(by_length), batch_size)):
        if i % jax.process_count() != jax.process_index():
            continue  # on several processes each samples (and writes) every count-th shard
        path = os.path.join(directory, f"shard_{i:05d}.npz")
        batch = by_length[start:start + batch_size]
        if not os.path.exists(path):
            padded = batch + [batch[0]] * (batch_size - len(batch))
            out, counts = generate(model.params, model.cfg, padded, jax.random.fold_in(key, i),
                                   max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos_ids,
                                   max_seq_len=max_seq_len)
            seqs = [np.array(p + out[j, :counts[j]].tolist(), np.int32) for j, p in enumerate(batch)]
            write_shard(path, Sequences(seqs, np.array([len(p) for p in batch], np.int32)))
        if progress is not None:
            progress(len(batch))
    distributed.barrier(f"sample-data {directory}")  # every shard written before any process reads them
    return read_shards(directory)


def self_distill(cfg, model, progress=None) -> dict[str, Sequences]:
    """`bebop sample-data`: the policy's own completions of the configured prompts, as token shards.

    The first `data.heldout_prompts` prompts go to `{data.dir}/heldout`, the next `data.num_prompts`
    to `{data.dir}/train`: held-out completions are never trained on (sources with a small prompt space,
    `math:easy` and the five built-in `code` problems, repeat prompt texts in both splits, as RL does); `{data.dir}/meta.json` records the settings, and a directory sampled with
    other settings is refused rather than mixed.
    """
    from bebop_jax.batching import check_lengths

    d = cfg.data
    meta = {"model": cfg.model.source, "prompts": d.prompts, "num_prompts": d.num_prompts,
            "heldout_prompts": d.heldout_prompts, "chat": d.chat, "temperature": d.temperature,
            "max_new_tokens": d.max_new_tokens, "seed": d.seed}
    meta_file = os.path.join(d.dir, "meta.json")
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            old = json.load(f)
        changed = sorted(k for k in meta if old.get(k) != meta[k])
        if changed:
            raise ValueError(f"data.dir '{d.dir}' holds samples made with other settings ({', '.join(changed)}); "
                             "choose another data.dir")
    prompts = encode_prompts(model.tokenizer, load_prompts(d.prompts, d.heldout_prompts + d.num_prompts, d.seed), d.chat)
    max_len = min(cfg.model.max_seq_len, model.cfg.max_position_embeddings)
    check_lengths(np.array([len(p) for p in prompts]), d.max_new_tokens, max_len)
    os.makedirs(d.dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(meta_file, "w") as f:
            json.dump(meta, f, indent=2)
    key = jax.random.key(d.seed)
    splits = {"heldout": prompts[:d.heldout_prompts], "train": prompts[d.heldout_prompts:]}
    return {name: sample_shards(model, split, os.path.join(d.dir, name), jax.random.fold_in(key, i),
                                temperature=d.temperature, max_new_tokens=d.max_new_tokens,
                                batch_size=d.sample_batch, max_seq_len=max_len,
                                eos_ids=model.tokenizer.eos_token_ids, progress=progress)
            for i, (name, split) in enumerate(splits.items()) if split}


def read_corpus(path: str, tokenizer, max_len: int) -> Sequences:
    """A .txt (documents split at blank lines) or .jsonl ({"text"}) corpus; each document + EOS,
    cut into pieces of at most `max_len` tokens, all of them targets (prompt length 0)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.corpus: '{path}' does not exist")
    with open(path) as f:
        if path.endswith(".jsonl"):
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        elif path.endswith(".txt"):
            docs = [d.strip("\n") for d in re.split(r"\n\s*\n", f.read()) if d.strip()]
        else:
            raise ValueError(f"data.corpus: '{path}' must be a .txt or .jsonl file")
    eos = list(tokenizer.eos_token_ids[:1])
    pieces = []
    for doc in docs:
        ids = np.array(tokenizer.encode(doc) + eos, np.int32)
        pieces += [ids[i:i + max_len] for i in range(0, len(ids), max_len) if len(ids) - i > 1]
    if not pieces:
        raise ValueError(f"data.corpus: '{path}' holds no text")
    return Sequences(pieces, np.zeros(len(pieces), np.int32))


# ---------------------------------------------------------------------------------------------
# Rows, masks and the grain pipeline


@dataclasses.dataclass
class Rows:
    """Sequences laid into fixed rows, each array [R, T]; segment id 0 marks padding."""

    tokens: np.ndarray  # int32
    positions: np.ndarray  # int32, restarting at 0 in each segment
    segment_ids: np.ndarray  # int32, 1.. per sequence in the row, 0 = padding
    completion: np.ndarray  # bool: a completion token (a loss target)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def layout_rows(seqs: Sequences, seq_len: int, pack: bool) -> Rows:
    """One sequence per row (padded), or first-fit-decreasing packing of several per row.

    Sequences longer than `seq_len` are cut to it; one left with no completion token is dropped.
    """
    items = [(t[:seq_len], int(p)) for t, p in zip(seqs.tokens, seqs.prompt_lengths) if int(p) < min(len(t), seq_len)]
    if not items:
        raise ValueError(f"no sequence has a completion token within seq_len={seq_len}")
    if pack:
        bins: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(items)), key=lambda i: -len(items[i][0])):
            n = len(items[i][0])
            row = next((r for r, space in enumerate(free) if space >= n), None)
            if row is None:
                bins.append([])
                free.append(seq_len)
                row = len(bins) - 1
            bins[row].append(i)
            free[row] -= n
    else:
        bins = [[i] for i in range(len(items))]
    shape = (len(bins), seq_len)
    rows = Rows(np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                np.zeros(shape, bool))
    for r, members in enumerate(bins):
        col = 0
        for seg, i in enumerate(members, 1):
            toks, prompt_len = items[i]
            n = len(toks)
            rows.tokens[r, col:col + n] = toks
            rows.positions[r, col:col + n] = np.arange(n)
            rows.segment_ids[r, col:col + n] = seg
            rows.completion[r, col + prompt_len:col + n] = True
            col += n
    return rows


def loss_masks(completion, segment_ids, num_steps: int) -> jax.Array:
    """masks [K, B, T]: origin t counts for draft step k when x_{t+k+1} is a completion token of the
    same sequence (so it exists: not past the row, not padding, not prompt). completion, segment_ids [B, T]."""
    completion, segment_ids = jnp.asarray(completion, bool), jnp.asarray(segment_ids)
    masks = []
    for k in range(1, num_steps + 1):
        pad = ((0, 0), (0, k + 1))
        next_seg = jnp.pad(segment_ids[:, k + 1:], pad)  # [B, T]: segment of x_{t+k+1}, 0 past the row
        next_completion = jnp.pad(completion[:, k + 1:], pad)  # [B, T]
        masks.append(next_completion & (next_seg == segment_ids) & (segment_ids != 0))
    return jnp.stack(masks)


def max_loss_origins(rows: Rows, num_steps: int, multiple: int = 8) -> int:
    """The most origins of one row that count for some draft step, rounded up to `multiple`."""
    counts = np.asarray(jnp.any(loss_masks(rows.completion, rows.segment_ids, num_steps), axis=0).sum(-1))
    return int(-(-max(int(counts.max()), 1) // multiple) * multiple)


class RowSource:
    """grain random-access source over rows; adds each row's cached trunk hidden states [T,D] and
    target log-normalisers [T] (`trunk_cache.full_logz`) when given."""

    def __init__(self, rows: Rows, hidden: np.ndarray | None = None, target_logz: np.ndarray | None = None):
        if hidden is not None and hidden.shape[:2] != rows.tokens.shape:
            raise ValueError(f"hidden cache has shape {hidden.shape}, expected [{len(rows)}, {rows.tokens.shape[1]}, D]")
        if target_logz is not None and target_logz.shape != rows.tokens.shape:
            raise ValueError(f"target_logz has shape {target_logz.shape}, expected {rows.tokens.shape}")
        self.rows, self.hidden, self.target_logz = rows, hidden, target_logz

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows
        example = {"tokens": r.tokens[i], "positions": r.positions[i], "segment_ids": r.segment_ids[i],
                   "completion": r.completion[i]}
        if self.hidden is not None:
            example["hidden"] = np.asarray(self.hidden[i])
        if self.target_logz is not None:
            example["target_logz"] = self.target_logz[i]
        return example


def row_iterator(source: RowSource, batch_size: int, seed: int, mesh: Mesh | None = None,
                 rules: Rules = ()) -> grain.DatasetIterator:
    """Endless batches [B, ...] of shuffled rows (reshuffled each epoch); a checkpointable iterator.

    With a mesh, this process's rows of every global batch of `batch_size` (`distributed.process_batches`),
    for `distributed.to_global`: a global batch holds the rows of the one-process batch, in another order.
    """
    if len(source) < batch_size:
        raise ValueError(f"pretrain.batch_size={batch_size} is larger than the {len(source)} rows of data")
    rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    batches = (rows.batch(batch_size, drop_remainder=True) if mesh is None
               else distributed.process_batches(rows, batch_size, mesh, rules))
    return iter(batches.to_iter_dataset())
