"""End-to-end RL wall time: (a) sync + plain decoding, (b) sync + speculative, (c) async + speculative,
(d) async + plain (what speculation adds to the async loop), (e) async + speculative drafting only once a
batch is down to 4 rows (`speculative.max_rows=4`), and (a0) sync + plain with the learner over whole rows
(`rl.share_prefix=false`, the learner before session 18).

    python benchmarks/rl_speedup.py --config configs/smollm2-135m-rl.yaml [--steps 6] [--variants a c e] [--out FILE]

Same config, seed and number of learner steps for every variant; MTP heads from the config's
`speculative.mtp_checkpoint`, frozen. Wall time per step excludes the first step (compilation).
Prints a table with the ratios against (a), the acceptance through each run and the reward curves,
and writes JSON. Targets to compare with: the paper's 1.8x end to end; 1.5x for (c) over (a) here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import numpy as np

from bebop_jax.config import load_config
from bebop_jax.model import load_model
from bebop_jax.rl.loop import train_rl
from bebop_jax.rl.records import read_history


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-135m-rl.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--run-dir", default="runs/rl_speedup")
    ap.add_argument("--out", default="benchmarks/results/rl_speedup.json")
    letters = ["a", "b", "c", "d", "e", "a0"]
    ap.add_argument("--variants", nargs="+", default=letters, choices=letters,
                    help="which variants to run (give config overrides before this option); (a) always runs: "
                         "the ratios are against it")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    model = load_model(cfg.model.source, cfg.model.dtype)
    spec = cfg.speculative.mode if cfg.speculative.mode != "none" else "rejection"
    variants = {"a_sync_plain": ("sync", "none", True), "b_sync_spec": ("sync", spec, True),
                "c_async_spec": ("async", spec, True), "d_async_plain": ("async", "none", True),
                "e_async_spec_rows4": ("async", spec, True), "a0_whole_rows": ("sync", "none", False)}
    max_rows_of = {"e_async_spec_rows4": 4}  # the others keep the config's speculative.max_rows
    rows = {}
    for name, (loop, mode, share) in variants.items():
        if name.split("_")[0] not in {"a", *args.variants}:
            continue
        max_rows = max_rows_of.get(name, cfg.speculative.max_rows)
        run = os.path.join(args.run_dir, name)
        shutil.rmtree(run, ignore_errors=True)
        c = dataclasses.replace(cfg, speculative=dataclasses.replace(cfg.speculative, mode=mode, max_rows=max_rows),
                                rl=dataclasses.replace(cfg.rl, loop=loop, steps=args.steps, run_dir=run,
                                                       checkpoint_every=args.steps, share_prefix=share))
        train_rl(c, model=model, progress=True)
        hist = read_history(run)
        walls = np.diff([0.0] + [h["wall_s"] for h in hist])
        rows[name] = {"loop": loop, "mode": mode, "share_prefix": share, "max_rows": max_rows,
                      "wall_s_per_step": float(np.mean(walls[1:])),
                      "learner_s_per_step": float(np.mean([h["learner_step_s"] for h in hist[1:]])),
                      "first_step_s": float(walls[0]), "reward": [h["reward"] for h in hist],
                      "acceptance": [h.get("draft_acceptance_rate") for h in hist],
                      "rollout_tokens_per_s": float(np.mean([h["rollout_tokens_per_s"] for h in hist[1:]]))}
    base = rows["a_sync_plain"]["wall_s_per_step"]
    print(f"{'variant':<18} {'s/step':>8} {'speed-up':>9} {'learner s':>10} {'rollout tok/s':>14} {'acceptance':>11}")
    for name, r in rows.items():
        r["speedup_vs_a"] = base / r["wall_s_per_step"]
        acc = np.mean([a for a in r["acceptance"] if a is not None]) if r["mode"] != "none" else float("nan")
        print(f"{name:<18} {r['wall_s_per_step']:>8.1f} {r['speedup_vs_a']:>8.2f}x {r['learner_s_per_step']:>10.1f} "
              f"{r['rollout_tokens_per_s']:>14.1f} "
              f"{acc:>11.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "steps": args.steps, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
