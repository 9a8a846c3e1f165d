"""The decode engine against the memory floor, on SmolLM2-135M-Instruct: the ratios issue 16 targets.

    python benchmarks/decode_floor.py [--batch 1 8] [--num-draft 3] [--draft-vocab 4096] [--out FILE]

Measured side by side in one process (medians, f32, T=1, EOS off so every row runs every step):
  floor          one jitted pass that reads every weight once (a 1-row product with each matrix)
  plain step     an engine step of `mode='none'`: (prefill + decode of N tokens - prefill) / (N - 1)
  spec step      an engine verify step at K drafts from a `--draft-vocab`-id sub-vocabulary, with random
                 MTP heads (so ~1 token per step: the cost of a step, not the speed-up)
and prints plain_b1 / floor, plain_bB / plain_b1 and spec / plain per batch. Writes JSON.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.batching import cache_length_for
from bebop_jax.model import load_model
from bebop_jax.model.mtp import MTPConfig, init_mtp_params
from bebop_jax.speculative import RULES, decode, prefill
from timing import median_seconds, write_result


def floor_seconds(params, repeats: int) -> float:
    """Median time of one pass over every parameter (each matrix against one row, vectors summed)."""
    def one_pass(params):
        total = jnp.float32(0)
        for w in jax.tree.leaves(params):
            m = w.reshape(w.shape[0], -1)
            total += jnp.sum(jnp.ones((1, m.shape[0]), m.dtype) @ m)
        return total
    fn = jax.jit(one_pass)
    return median_seconds(lambda: fn(params), repeats)


def step_seconds(model, batch: int, new_tokens: int, repeats: int, num_draft: int = 0, mtp=None,
                 heads=None, draft_ids=None) -> tuple[float, float]:
    """(seconds per engine step, tokens per step) of `decode` at `batch` over `new_tokens` tokens."""
    tokens = np.random.RandomState(0).randint(100, 20000, size=(batch, 64)).astype(np.int32)
    lengths = np.full((batch,), 64, np.int32)
    kw = dict(cfg=model.cfg, mtp_cfg=mtp, num_draft=num_draft, greedy=False, top_p=1.0, eos_ids=())
    cache_len = cache_length_for(64, new_tokens, extra=num_draft + 2)
    t = jnp.float32(1.0)
    start = lambda: prefill(model.params, heads, tokens, lengths, jax.random.key(0), t,  # noqa: E731
                            max_new_tokens=new_tokens, cache_len=cache_len, **kw)
    prefill_s = median_seconds(lambda: start().tokens, repeats)
    rule = jnp.int32(RULES.index("rejection"))
    ids = None if draft_ids is None else jnp.asarray(draft_ids)
    state = decode(model.params, heads, start(), t, ids, rule, **kw)
    steps = int(state.step)
    total_s = median_seconds(lambda: decode(model.params, heads, start(), t, ids, rule, **kw).tokens, repeats)
    return (total_s - prefill_s) / steps, float(np.mean(np.asarray(state.num_tokens) - 1) / steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/decode_floor.json")
    args = ap.parse_args()

    model = load_model(args.model)
    mtp = MTPConfig(num_steps=args.num_draft, num_layers=1)
    heads = init_mtp_params(model.cfg, mtp, jax.random.key(1))
    draft_ids = np.arange(args.draft_vocab, dtype=np.int32)  # BPE ids are merge-ordered: a frequency proxy
    floor = floor_seconds(model.params, args.repeats)
    rows = []
    for batch in args.batch:
        plain, _ = step_seconds(model, batch, args.new_tokens, args.repeats)
        spec, per_step = step_seconds(model, batch, args.new_tokens, args.repeats, args.num_draft, mtp, heads, draft_ids)
        rows.append(dict(batch=batch, plain_ms=1e3 * plain, spec_ms=1e3 * spec, spec_tokens_per_step=per_step,
                         spec_over_plain=spec / plain))
    b1 = next((r for r in rows if r["batch"] == 1), rows[0])
    print(f"weights floor (one pass over every weight): {1e3 * floor:.1f} ms")
    print(f"{'batch':>5} {'plain ms':>9} {'x floor':>8} {'x batch-1':>10} {'spec K=' + str(args.num_draft) + ' ms':>12} "
          f"{'spec/plain':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['plain_ms']:>9.1f} {r['plain_ms'] / (1e3 * floor):>8.2f} "
              f"{r['plain_ms'] / b1['plain_ms']:>10.2f} {r['spec_ms']:>12.1f} {r['spec_over_plain']:>11.2f}")
    write_result(args.out, model=args.model, floor_ms=1e3 * floor, num_draft=args.num_draft,
                 draft_vocab=args.draft_vocab, rows=rows)


if __name__ == "__main__":
    main()
