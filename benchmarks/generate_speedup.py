"""`bebop generate` with and without `--speculative`, one prompt at a time, on prompts no data set was drawn from.

    python benchmarks/generate_speedup.py [--mtp smollm2-135m-instruct-e2e-tv] [--num-draft 3] [--repeats 3]
        [--max-new-tokens 128] [--samples 1] [--prompts-file FILE] [--out FILE]

What a user (or a check of its own) sees: batch 1, the chat template, T=1, EOS on, the engine exactly as
`bebop generate` calls it (`speculative_generate`, finished rows dropped). The built-in prompts below are
written by hand across math, code, explanation, advice, writing and rewriting, and none comes from a prompt
template of the self-distillation sets (`bebop_jax.math_prompts`, `bebop_jax.chat_prompts`); `--prompts-file`
takes one prompt per line instead. Per prompt and sample (`--samples` keys per prompt: one sample's
tokens per step vary by +-0.3), plain and speculative decoding share the key, each compiled and warmed up
first, then timed alternately (median of `--repeats`); a prompt's tokens and seconds sum over its samples.
Speculative tokens are samples of the same distribution, not the same tokens, so each way's tokens/s is its
own tokens over its own time.
Prints a table per prompt and the pooled speed-up (all tokens over all time, each way); writes JSON.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.model import load_model
from bebop_jax.speculative import combine_rollouts, speculative_generate
from timing import write_result

PROMPTS = (
    "A bakery sells muffins for $3 each and cookies for $1.50 each. Maya buys 4 muffins and 6 cookies. "
    "How much does she spend?",
    "Write a Python function that returns the second largest number in a list.",
    "Why does ice float on water?",
    "Give me three tips for sleeping better when I travel across time zones.",
    "Write a four-line poem about a train crossing a snowy plain.",
    "Summarize the plot of Cinderella in two sentences.",
    "What is the difference between a noun and a verb? Give two examples of each.",
    "Rewrite this sentence to sound more polite: Send me the report now.",
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--mtp", default="smollm2-135m-instruct-e2e-tv")
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1, help="keys per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-file", help="one prompt per line (default: the built-in prompts)")
    ap.add_argument("--out", default="benchmarks/results/generate_speedup.json")
    args = ap.parse_args()
    prompts = PROMPTS
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = tuple(line.strip() for line in f if line.strip())
        if not prompts:
            raise SystemExit(f"error: {args.prompts_file} holds no prompt")

    model = load_model(args.model)
    tok = model.tokenizer
    mtp_cfg, mtp_params, draft_ids = load_mtp_heads(args.mtp, model.cfg)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, eos_ids=tok.eos_token_ids)
    ways = {"plain": dict(mode="none"),
            "spec": dict(mode="rejection", mtp_params=mtp_params, mtp_cfg=mtp_cfg, num_draft=args.num_draft,
                         draft_ids=draft_ids)}
    rows = []
    for i, text in enumerate(prompts):
        ids = [tok.encode_prompt(text, True)]
        row = {"prompt": text, **{name: {"tokens": 0, "seconds": 0.0} for name in ways}}
        spec_outs = []
        for sample in range(args.samples):
            key = jax.random.fold_in(jax.random.key(args.seed), i * args.samples + sample)
            run = {name: (lambda kw=kw: speculative_generate(model.params, model.cfg, ids, key, **common, **kw))
                   for name, kw in ways.items()}
            outs = {name: fn() for name, fn in run.items()}  # compile and warm up; the timed runs repeat these
            times = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, fn in run.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            for name, out in outs.items():
                row[name]["tokens"] += int(out.num_tokens[0])
                row[name]["seconds"] += float(np.median(times[name]))
            spec_outs.append(outs["spec"])
        for name in ways:
            row[name]["tokens_per_s"] = row[name]["tokens"] / row[name]["seconds"]
        row["spec"]["tokens_per_step"] = combine_rollouts(spec_outs).metrics(args.num_draft)["tokens_per_step"]
        row["speedup"] = row["spec"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        rows.append(row)
        print(f"{row['plain']['tokens_per_s']:6.1f} -> {row['spec']['tokens_per_s']:6.1f} tok/s  x{row['speedup']:.2f}  "
              f"{row['spec']['tokens_per_step']:.2f} tokens/step  {text[:60]}", flush=True)
    pooled = {name: sum(r[name]["tokens"] for r in rows) / sum(r[name]["seconds"] for r in rows) for name in ways}
    speedup = pooled["spec"] / pooled["plain"]
    print(f"pooled over {len(rows)} prompts: plain {pooled['plain']:.1f} tok/s, speculative {pooled['spec']:.1f} "
          f"tok/s: x{speedup:.2f} (median per prompt x{np.median([r['speedup'] for r in rows]):.2f})")
    write_result(args.out, model=args.model, mtp=args.mtp, num_draft=args.num_draft, temperature=args.temperature,
                 samples=args.samples, repeats=args.repeats,
                 max_new_tokens=args.max_new_tokens, rows=rows, pooled_tokens_per_s=pooled, speedup=speedup)


if __name__ == "__main__":
    main()
