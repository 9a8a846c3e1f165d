"""Plain vs speculative decoding on SmolLM2-135M-Instruct with trained MTP heads, side by side.

    python benchmarks/spec_decode.py --mtp runs/pretrain-mtp-e2e_tv [--batch 1 8 32] [--temperature 1 0]
        [--num-draft 1 2 3 4] [--mode rejection] [--draft-vocab 0 4096] [--max-new-tokens 64] [--out FILE]

Prompts are the built-in math problems (the RL environment's), in the chat template. Every setting
runs the same engine (`mode=none` is plain decoding) on the same prompts; runs alternate plain /
speculative and each time is the median over `--repeats` after a compile-and-warm-up call. EOS is
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
from bebop_jax.math_prompts import make_problem
from bebop_jax.model import load_model
from bebop_jax.speculative import frequent_tokens, speculative_generate
from timing import median_seconds, write_result


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/spec_decode.json")
    args = ap.parse_args()

    model = load_model(args.model)
    mtp_cfg, mtp_params, head_ids = load_mtp_heads(args.mtp)
    # heads trained on a draft sub-vocabulary draft from it, whatever --draft-vocab says
    vocab_sizes = [len(head_ids)] if head_ids is not None else args.draft_vocab
    rng = np.random.default_rng(args.seed)
    questions = [make_problem(rng)[0] for _ in range(max(args.batch))]
    prompts = [model.tokenizer.encode_prompt(q, chat=True) for q in questions]
    # frequency ranking for the draft sub-vocabulary: the policy's own greedy answers to other problems
    calib = None
    if head_ids is None and any(vocab_sizes):
        calib = speculative_generate(model.params, model.cfg,
                                     [model.tokenizer.encode_prompt(make_problem(rng)[0], chat=True) for _ in range(16)],
                                     jax.random.key(1), mode="none", max_new_tokens=96, temperature=1.0)
    rows = []
    for temperature in args.temperature:
        for batch in args.batch:
            batch_prompts = prompts[:batch]
            common = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, eos_ids=())
            key = jax.random.key(args.seed)
            plain = lambda: speculative_generate(model.params, model.cfg, batch_prompts, key, mode="none",  # noqa: E731
                                                 **common)
            plain()
            for k in args.num_draft:
                for vocab in vocab_sizes:
                    ids = head_ids if head_ids is not None else None if vocab == 0 else frequent_tokens(
                        [calib.tokens] + batch_prompts, model.cfg.vocab_size, vocab, always=model.tokenizer.eos_token_ids)
                    heads = dataclasses.replace(mtp_cfg, num_steps=k)
                    spec = lambda: speculative_generate(  # noqa: E731
                        model.params, model.cfg, batch_prompts, key, mtp_params=mtp_params, mtp_cfg=heads,
                        mode=args.mode, num_draft=k, draft_ids=ids, **common)
                    rollout = spec()  # compile; the metrics of a run (the same key: the same tokens each time)
                    plain_times, spec_times = [], []
                    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both
                        plain_times.append(median_seconds(plain, 1, warmup=False))
                        spec_times.append(median_seconds(spec, 1, warmup=False))
                    plain_s, spec_s = float(np.median(plain_times)), float(np.median(spec_times))
                    tokens = batch * args.max_new_tokens
                    m = rollout.metrics(k)
                    rows.append(dict(temperature=temperature, batch=batch, num_draft=k, draft_vocab=vocab,
                                     mode=args.mode, plain_tokens_per_s=tokens / plain_s,
                                     spec_tokens_per_s=tokens / spec_s, speedup=plain_s / spec_s, **m))
                    r = rows[-1]
                    print(f"T={temperature:<4} B={batch:<3} K={k} Vd={vocab or 'all':<6} plain {r['plain_tokens_per_s']:7.1f} "
                          f"tok/s  spec {r['spec_tokens_per_s']:7.1f} tok/s  x{r['speedup']:.2f}  "
                          f"accept {r['draft_acceptance_rate']:.3f}  len {r['draft_mean_acceptance_length']:.2f}",
                          flush=True)
    write_result(args.out, model=args.model, mtp=args.mtp, rows=rows)


if __name__ == "__main__":
    main()
