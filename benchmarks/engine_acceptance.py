"""The heads in the engine against the heads under teacher forcing, per prompt source, on held-out prompts.

    python benchmarks/engine_acceptance.py [--heads smollm2-135m-instruct-e2e-tv] [--per-source 16]

For each prompt source of the self-distillation mix (`data.prompts` of --config, e.g. math:easy,
math:grade, tool, code) and its held-out rows ({data.dir}/heldout, labelled by re-drawing the prompt
list): `bebop eval-acceptance`'s teacher-forced alpha_1..K and E[accepted length] on the recorded
answers, and the speculative engine (rejection sampling, T=1, K drafts) run on the same prompts: the
rate at which a verify step accepts its first draft (comparable to alpha_1: both are the mean of
1 - TV(p, q_1) over states of the policy's own text) and the tokens per verify step (comparable to
E[accepted length]). Equal within noise means the engine drafts what training saw. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import data as data_lib
from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.config import load_config
from bebop_jax.eval_acceptance import evaluate
from bebop_jax.model import load_model
from bebop_jax.speculative import speculative_generate
from timing import write_result


def heldout_sources(data_dir: str, tokenizer, seqs: data_lib.Sequences) -> list[str]:
    """The prompt source of every held-out row, from the data set's meta.json (the prompts re-drawn)."""
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    sources = [s.strip() for s in meta["prompts"].split(",")]
    drawn = data_lib.load_prompts(meta["prompts"], meta["heldout_prompts"] + meta["num_prompts"], meta["seed"])
    encoded = data_lib.encode_prompts(tokenizer, drawn[:meta["heldout_prompts"]], meta["chat"])
    source_of = {tuple(p): sources[i % len(sources)] for i, p in enumerate(encoded)}
    return [source_of[tuple(int(t) for t in seq[:n])] for seq, n in zip(seqs.tokens, seqs.prompt_lengths)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-135m-mtp.yaml")
    ap.add_argument("--heads", default="smollm2-135m-instruct-e2e-tv")
    ap.add_argument("--per-source", type=int, default=16, help="held-out prompts per source")
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/engine_acceptance.json")
    args = ap.parse_args()

    cfg = load_config(args.config, [])
    model = load_model(cfg.model.source, cfg.model.dtype)
    heads = load_mtp_heads(args.heads, model.cfg)
    seqs = data_lib.read_shards(os.path.join(cfg.data.dir, "heldout"))
    labels = heldout_sources(cfg.data.dir, model.tokenizer, seqs)
    mtp_params = jax.tree.map(jnp.asarray, heads.params)
    rows = []
    print(f"{'source':<12} {'n':>3} {'alpha_1 tf':>10} {'engine 1st':>10} {'E[len] tf':>9} {'engine tok/step':>15}")
    for i, source in enumerate(dict.fromkeys(labels)):
        idx = [j for j, s in enumerate(labels) if s == source][:args.per_source]
        sub = data_lib.Sequences([seqs.tokens[j] for j in idx], seqs.prompt_lengths[idx])
        tf = evaluate(model, heads.cfg, heads.params, sub, (1.0,), 4, cfg.eval.batch_size, heads.draft_ids)
        tf = tf["results"][0]
        prompts = [[int(t) for t in seqs.tokens[j][:seqs.prompt_lengths[j]]] for j in idx]
        run = speculative_generate(model.params, model.cfg, prompts, jax.random.key(args.seed + i),
                                   mtp_params=mtp_params, mtp_cfg=heads.cfg, mode="rejection",
                                   num_draft=args.num_draft, max_new_tokens=args.max_new_tokens, temperature=1.0,
                                   eos_ids=model.tokenizer.eos_token_ids, draft_ids=heads.draft_ids)
        m = run.metrics(args.num_draft)
        rows.append(dict(source=source, prompts=len(idx), teacher_forced_alpha=tf["alpha"],
                         teacher_forced_expected_length=tf["expected_length"],
                         engine_first_draft=m["draft_acceptance_rate_pos_0"],
                         engine_accepted_at=[m[f"draft_acceptance_rate_pos_{k}"] for k in range(args.num_draft)],
                         engine_tokens_per_step=m["tokens_per_step"], engine_verify_steps=int(run.verify_steps.sum())))
        r = rows[-1]
        print(f"{source:<12} {len(idx):>3} {r['teacher_forced_alpha'][0]:>10.3f} {r['engine_first_draft']:>10.3f} "
              f"{r['teacher_forced_expected_length']:>9.3f} {r['engine_tokens_per_step']:>15.3f}", flush=True)
    write_result(args.out, heads=args.heads, num_draft=args.num_draft, temperature=1.0,
                 max_new_tokens=args.max_new_tokens, rows=rows)


if __name__ == "__main__":
    main()
