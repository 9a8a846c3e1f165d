"""RL rollouts with and without dropping finished rows (`speculative.compact`), plain and speculative, and
speculative only once the batch is small (`speculative.max_rows`).

    python benchmarks/rollout_compaction.py [--config configs/smollm2-135m-rl.yaml] [--batches 5] [--out FILE]

The RL config's actor (prompts_per_step x group_size episodes of its environment, EOS on, its max_new_tokens,
temperature, K and MTP heads, the initial policy) rolls out the same `--batches` task batches six ways:
plain or speculative, each with finished rows kept in the batch or dropped, and speculative with rows dropped
drafting only on batches of at most 4 or 2 rows (plain steps above). A first pass over every batch
compiles (dropping rows compiles one program per batch size met); the timed pass follows, the four ways
interleaved batch by batch. Each way's sequences are compared with its counterpart's: every sequence has its own
key, but XLA's f32 products round differently at another batch size, which can flip a near-tied sample.
Prints generated tokens/s per way, what dropping finished rows gains for each decoding, and speculative over
plain with and without it. Writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.config import load_config
from bebop_jax.model import load_model
from bebop_jax.rl.actor import Actor
from bebop_jax.rl.environments import env_options, make_environment
from timing import write_result

WAYS = {"plain": ("none", False, 0), "plain_compact": ("none", True, 0), "spec": ("rejection", False, 0),
        "spec_compact": ("rejection", True, 0), "spec_rows4": ("rejection", True, 4),
        "spec_rows2": ("rejection", True, 2)}  # name: (speculative.mode, .compact, .max_rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-135m-rl.yaml")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/rollout_compaction.json")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    rl, spec = cfg.rl, cfg.speculative
    model = load_model(cfg.model.source, cfg.model.dtype)
    env = make_environment(rl.environment, **env_options(rl, None))
    mtp_cfg, mtp_params, draft_ids = load_mtp_heads(spec.mtp_checkpoint, model.cfg)
    actors = {name: Actor.from_config(
        dataclasses.replace(cfg, speculative=dataclasses.replace(spec, mode=mode, compact=compact, max_rows=rows)),
        model, env, mtp_cfg, mtp_params, draft_ids) for name, (mode, compact, rows) in WAYS.items()}
    batches = [(env.sample_tasks(np.random.default_rng([rl.seed, i]), rl.prompts_per_step),
                jax.random.fold_in(jax.random.key(rl.seed), i)) for i in range(args.batches)]
    for name, actor in actors.items():  # compile every batch size each way meets
        for tasks, key in batches:
            actor.rollout(model.params, 0, key, tasks)
    seconds = {name: 0.0 for name in WAYS}
    tokens = {name: 0 for name in WAYS}
    rows = {name: [] for name in WAYS}
    acceptance = []
    for tasks, key in batches:
        for name, actor in actors.items():
            t0 = time.perf_counter()
            traj, metrics = actor.rollout(model.params, 0, key, tasks)
            seconds[name] += time.perf_counter() - t0
            tokens[name] += int(np.sum(traj.loss_mask))
            rows[name].append(traj.tokens)
            if name == "spec_compact":
                acceptance.append(metrics["draft_acceptance_rate"])
    identical = {}
    for name, twin in (("plain_compact", "plain"), ("spec_compact", "spec")):
        same = np.concatenate([np.all(a == b, axis=1) for a, b in zip(rows[name], rows[twin])])
        identical[name] = float(same.mean())
        print(f"{name}: {same.sum()} of {same.size} sequences token for token those of {twin}")
    rate = {name: tokens[name] / seconds[name] for name in WAYS}
    B = rl.prompts_per_step * rl.group_size
    print(f"{args.batches} batches of {B} rollouts, {tokens['plain'] / args.batches / B:.1f} tokens per answer "
          f"(max {rl.max_new_tokens}), K={spec.num_draft}, acceptance {np.mean(acceptance):.3f}")
    for name in WAYS:
        print(f"  {name:<14} {rate[name]:6.1f} tokens/s")
    gains = {"plain": rate["plain_compact"] / rate["plain"], "spec": rate["spec_compact"] / rate["spec"],
             "spec_over_plain": rate["spec"] / rate["plain"],
             "spec_over_plain_compact": rate["spec_compact"] / rate["plain_compact"],
             "spec_compact_over_plain": rate["spec_compact"] / rate["plain"],
             **{f"{name}_over_plain_compact": rate[name] / rate["plain_compact"] for name in ("spec_rows4", "spec_rows2")}}
    print(f"dropping finished rows: plain x{gains['plain']:.2f}, speculative x{gains['spec']:.2f}")
    print(f"speculative / plain: x{gains['spec_over_plain']:.2f} keeping rows, x{gains['spec_over_plain_compact']:.2f} "
          f"dropping them (x{gains['spec_compact_over_plain']:.2f} over plain as it was); drafting only at <= 4 rows "
          f"x{gains['spec_rows4_over_plain_compact']:.2f}, <= 2 rows x{gains['spec_rows2_over_plain_compact']:.2f}")
    write_result(args.out, config=args.config, batches=args.batches, rollouts_per_batch=B, tokens=tokens,
                 seconds=seconds, tokens_per_s=rate, ratios=gains, acceptance=float(np.mean(acceptance)),
                 identical_sequences=identical)


if __name__ == "__main__":
    main()
