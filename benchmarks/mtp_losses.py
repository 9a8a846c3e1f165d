"""The draft losses (`losses.LOSSES`: CE, KL, TV, e2e TV and the two LK losses) compared on SmolLM2-135M-Instruct
for the same budget (the MTP issue's table).

The paper's setting: MTP heads exist before the TV stage (trained with CE), and the draft losses are
compared as what those heads are trained with next. So every loss continues from one shared CE warm
start (`--warm-steps` of CE from the trunk-copied init; 0 = all start from that init) for `--steps`
more steps on the same batches, then `bebop eval-acceptance` scores each on the held-out samples.

    python benchmarks/mtp_losses.py --warm-steps 150 --steps 150 [--losses ce,e2e_tv] [config overrides ...]

Writes {out}/{warm,<loss>...}/ (resumable: finished runs and evaluations are kept) and a JSON
result with, per loss at each temperature: alpha_1..K, the expected accepted length, the entropy slope
of alpha_1 (per nat) and the training seconds; prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bebop_jax import eval_acceptance, pretrain_mtp  # noqa: E402
from bebop_jax.config import load_config  # noqa: E402
from bebop_jax.losses import LOSSES  # noqa: E402
from bebop_jax.model import load_model  # noqa: E402



def _train(cfg, model, run_dir: str, **changes) -> dict:
    """Trains (or resumes) one run; returns its summary.json."""
    c = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, run_dir=run_dir, **changes))
    summary_file = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_file):
        with open(summary_file) as f:
            done = json.load(f)
        if done["steps"] == c.pretrain.steps and done["resumed_from"] == 0:
            return done
    print(f"--- {run_dir}: {c.pretrain.loss}, {c.pretrain.steps} steps from {c.pretrain.init}", flush=True)
    pretrain_mtp.train(c, model)
    with open(summary_file) as f:
        return json.load(f)


def _evaluate(cfg, model, run_dir: str) -> dict:
    out = os.path.join(run_dir, "acceptance.json")
    if not os.path.isfile(out):
        eval_acceptance.run(cfg, run_dir, out, model=model)
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2-135m-mtp.yaml")
    parser.add_argument("--warm-steps", type=int, default=150, help="shared CE warm start (0: none)")
    parser.add_argument("--steps", type=int, default=150, help="steps of each loss after the warm start")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    parser.add_argument("--out-dir", default="runs/mtp-compare")
    parser.add_argument("--result", default="benchmarks/results/mtp_losses_smollm2.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    losses = args.losses.split(",")
    if unknown := [x for x in losses if x not in LOSSES]:
        parser.error(f"--losses: unknown {', '.join(unknown)}; choose from {', '.join(LOSSES)}")
    cfg = load_config(args.config, args.overrides)
    model = load_model(cfg.model.source, cfg.model.dtype)

    init, warm = cfg.pretrain.init, None
    if args.warm_steps:
        warm = _train(cfg, model, os.path.join(args.out_dir, "warm"), loss="ce", steps=args.warm_steps)
        init = os.path.join(args.out_dir, "warm")
    rows = {}
    for loss in losses:
        run = os.path.join(args.out_dir, loss)
        # the warm start's schedule ended at 10% of the peak; each loss gets a fresh warm-up and decay
        summary = _train(cfg, model, run, loss=loss, steps=args.steps, init=init)
        report = _evaluate(cfg, model, run)
        rows[loss] = {"train_seconds": summary["train_seconds"], "results": [
            {"temperature": r["temperature"], "alpha": r["alpha"], "expected_length": r["expected_length"],
             "slope_alpha_1": r["heads"][0]["fit"]["slope"], "r2_alpha_1": r["heads"][0]["fit"]["r2"]}
            for r in report["results"]]}
    result = {"config": args.config, "overrides": args.overrides, "warm_steps": args.warm_steps,
              "warm_train_seconds": warm["train_seconds"] if warm else 0.0, "steps": args.steps,
              "batch_size": cfg.pretrain.batch_size, "draft_vocab": cfg.pretrain.draft_vocab,
              "data": cfg.data.dir, "losses": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.warm_steps} CE warm-start steps, then {args.steps} steps of each loss "
          f"(batch {cfg.pretrain.batch_size}, draft vocabulary {cfg.pretrain.draft_vocab or 'full'}); held out:")
    print("| loss | T | alpha_1..K | E[accepted length] | slope alpha_1 / nat | train s |")
    print("|---|---|---|---|---|---|")
    for loss, row in rows.items():
        for r in row["results"]:
            print(f"| {loss} | {r['temperature']:g} | {', '.join(f'{a:.3f}' for a in r['alpha'])} | "
                  f"{r['expected_length']:.3f} | {r['slope_alpha_1']:+.4f} | {row['train_seconds']:.0f} |")
    return result


if __name__ == "__main__":
    main()
