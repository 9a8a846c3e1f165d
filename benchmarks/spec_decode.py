"""Plain vs speculative decoding on SmolLM2-135M-Instruct with trained MTP heads, side by side.

    python benchmarks/spec_decode.py --mtp runs/pretrain-mtp-e2e_tv [--batch 1 8 32] [--temperature 1 0]
        [--num-draft 1 2 3 4] [--mode rejection] [--draft-vocab 0 4096] [--max-new-tokens 64]
        [--min-sequences 8] [--prompts math|chat] [--out FILE]

Prompts are the built-in math problems (the RL environment's) or, with `--prompts chat`, the built-in general
instructions (`bebop_jax.chat_prompts`, as `bebop generate` meets them), in the chat template, all of one padded
width (one compiled program per setting). Every setting runs the same engine (`mode=none` is plain
decoding) on the same prompts; a setting covers at least `--min-sequences` sequences, as
ceil(min_sequences / batch) batches of different prompts and keys, so batch 1 is not one sample.
Runs alternate plain / speculative; each time is the median over `--repeats` (summed over the
batches) after a compile-and-warm-up call, and the acceptance pools every batch. EOS is
disabled so every sequence emits exactly `--max-new-tokens` tokens and tokens/s compare like for
like. K larger than the heads' trained steps reuses their layers cyclically (as serving engines do).
Heads trained on a draft sub-vocabulary (`pretrain.draft_vocab`) always draft from their own ids.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.batching import pad_prompts
from bebop_jax.chat_prompts import make_prompt
from bebop_jax.math_prompts import make_problem
from bebop_jax.model import load_model
from bebop_jax.speculative import combine_rollouts, frequent_tokens, speculative_generate
from timing import median_seconds, write_result


PROMPTS = {"math": lambda rng: make_problem(rng)[0], "chat": make_prompt}


def same_width_prompts(tokenizer, rng, n: int, source: str = "math") -> list[list[int]]:
    """`n` chat-template prompts of `source` (PROMPTS) that all pad to one width (the commonest among 4n drawn)."""
    pool = [tokenizer.encode_prompt(PROMPTS[source](rng), chat=True) for _ in range(4 * n)]
    widths = np.array([pad_prompts([p])[0].shape[1] for p in pool])
    common = np.bincount(widths).argmax()
    chosen = [p for p, w in zip(pool, widths) if w == common][:n]
    if len(chosen) < n:
        raise RuntimeError(f"only {len(chosen)} of {4 * n} prompts pad to width {common}; need {n}")
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--mtp", required=True, help="MTP heads: pretrain-mtp run dir or HF dir")
    ap.add_argument("--mode", default="rejection", choices=["rejection", "greedy_draft", "block"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.0])
    ap.add_argument("--num-draft", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--draft-vocab", type=int, nargs="+", default=[0],
                    help="draft sub-vocabulary sizes to try (0 = full vocabulary)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-sequences", type=int, default=8, help="sequences per setting (batches of different prompts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default="math", choices=sorted(PROMPTS), help="built-in prompt source")
    ap.add_argument("--out", default="benchmarks/results/spec_decode.json")
    args = ap.parse_args()

    model = load_model(args.model)
    mtp_cfg, mtp_params, head_ids = load_mtp_heads(args.mtp, model.cfg)
    # heads trained on a draft sub-vocabulary draft from it, whatever --draft-vocab says
    vocab_sizes = [len(head_ids)] if head_ids is not None else args.draft_vocab
    rng = np.random.default_rng(args.seed)
    sets = {b: -(-args.min_sequences // b) for b in args.batch}  # batches of distinct prompts per setting
    prompts = same_width_prompts(model.tokenizer, rng, max(b * n for b, n in sets.items()), args.prompts)
    # frequency ranking for the draft sub-vocabulary: the policy's own greedy answers to other problems
    calib = None
    if head_ids is None and any(vocab_sizes):
        calib = speculative_generate(model.params, model.cfg,
                                     [model.tokenizer.encode_prompt(make_problem(rng)[0], chat=True) for _ in range(16)],
                                     jax.random.key(1), mode="none", max_new_tokens=96, temperature=1.0)
    rows = []
    for temperature in args.temperature:
        for batch in args.batch:
            batches = [(prompts[i * batch:(i + 1) * batch], jax.random.key(args.seed + i)) for i in range(sets[batch])]
            common = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, eos_ids=())
            plain = lambda p, key: speculative_generate(model.params, model.cfg, p, key, mode="none",  # noqa: E731
                                                        **common)
            plain(*batches[0])
            for k in args.num_draft:
                for vocab in vocab_sizes:
                    ids = head_ids if head_ids is not None else None if vocab == 0 else frequent_tokens(
                        [calib.tokens] + prompts, model.cfg.vocab_size, vocab, always=model.tokenizer.eos_token_ids)
                    heads = dataclasses.replace(mtp_cfg, num_steps=k)
                    spec = lambda p, key: speculative_generate(  # noqa: E731
                        model.params, model.cfg, p, key, mtp_params=mtp_params, mtp_cfg=heads,
                        mode=args.mode, num_draft=k, draft_ids=ids, **common)
                    # compile; the metrics of the setting (the same keys: the same tokens every repeat)
                    rollout = combine_rollouts([spec(*b) for b in batches])
                    plain_times, spec_times = [], []
                    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both
                        plain_times.append(sum(median_seconds(lambda: plain(*b), 1, warmup=False) for b in batches))
                        spec_times.append(sum(median_seconds(lambda: spec(*b), 1, warmup=False) for b in batches))
                    plain_s, spec_s = float(np.median(plain_times)), float(np.median(spec_times))
                    tokens = batch * len(batches) * args.max_new_tokens
                    m = rollout.metrics(k)
                    rows.append(dict(temperature=temperature, batch=batch, sequences=batch * len(batches),
                                     num_draft=k, draft_vocab=vocab, mode=args.mode,
                                     plain_tokens_per_s=tokens / plain_s, spec_tokens_per_s=tokens / spec_s,
                                     speedup=plain_s / spec_s, **m))
                    r = rows[-1]
                    print(f"T={temperature:<4} B={batch:<3} K={k} Vd={vocab or 'all':<6} plain {r['plain_tokens_per_s']:7.1f} "
                          f"tok/s  spec {r['spec_tokens_per_s']:7.1f} tok/s  x{r['speedup']:.2f}  "
                          f"accept {r['draft_acceptance_rate']:.3f}  len {r['draft_mean_acceptance_length']:.2f}",
                          flush=True)
    write_result(args.out, model=args.model, mtp=args.mtp, prompts=args.prompts, rows=rows)


if __name__ == "__main__":
    main()
