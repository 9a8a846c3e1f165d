"""Held-out accuracy of an RL run's saved policies: the initial model and every kept checkpoint.

    python benchmarks/rl_heldout.py --run-dir runs/rl/smollm2-math [--config configs/smollm2-135m-rl.yaml]
        [--tasks 64] [key=value ...]

The same evaluation as `rl.eval_tasks` during a run (`bebop_jax.rl.records.held_out_eval`: fixed problems
of the math environment's test split, one plain sample each at the run's temperature, the same key for
every policy), applied afterwards to the checkpoints a run kept. Prints a table, writes JSON beside
the run (RUN/heldout.json), adds the evaluations to RUN/eval.jsonl (as a run with rl.eval_tasks
writes them) and redraws the run's curves PNG with them.
"""

from __future__ import annotations

import argparse
import os

import jax

from bebop_jax.checkpoint import RunCheckpoints
from bebop_jax.config import load_config
from bebop_jax.model import load_model
from bebop_jax.rl.records import append_evals, held_out_eval, summarise_run
from timing import write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", default="configs/smollm2-135m-rl.yaml")
    ap.add_argument("--tasks", type=int, default=64, help="held-out problems")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"rl.eval_tasks={args.tasks}"])
    ckpt = RunCheckpoints(args.run_dir)
    steps = sorted(ckpt.manager.all_steps())
    if not steps:
        raise SystemExit(f"{args.run_dir}: no checkpoints")
    model = load_model(cfg.model.source, cfg.model.dtype)
    evaluate = held_out_eval(cfg, model)
    rows = []
    for step in [0, *steps]:  # step 0: the initial policy
        params = model.params if step == 0 else jax.tree.map(
            jax.numpy.asarray, ckpt.restore_raw(step)[0]["learner"]["params"])
        rows.append(dict(step=step, **evaluate(params)))
        print(f"step {step}: accuracy {rows[-1]['accuracy']:.3f}, response length {rows[-1]['response_length']:.1f}",
              flush=True)
    ckpt.close()
    write_result(os.path.join(args.run_dir, "heldout.json"), config=args.config, tasks=args.tasks, rows=rows)
    append_evals(args.run_dir, rows)
    print(f"curves: {summarise_run(args.run_dir)['curves']}")


if __name__ == "__main__":
    main()
