"""The paper's RL claims on SmolLM2: GRPO runs with frozen e2e-TV heads, frozen CE heads, online-TV heads,
greedy-draft verification, and plain decoding; then the claims table and figure of `bebop analyze`.

    python benchmarks/rl_claims.py [--config configs/smollm2-135m-rl.yaml] [--steps 40] [--out runs/claims]

Every run is its own `bebop rl` process (OUT/rl/NAME, names and overrides from `bebop_jax.claims.VARIANTS`)
on the same config, seed and tasks (the learner at the full length and finished rows kept in the rollout batch,
`rl.length_buckets=1 speculative.compact=false`, as the runs kept from session 15 ran, so that every run's wall
time compares); an interrupted run resumes from its last checkpoint and a finished one
is not rerun, so the script can be started again after a stop. Each finished run's per-step metrics are kept
beside the results (RESULTS_runs/NAME/metrics.jsonl, committed): a run found there with enough steps is
restored into OUT instead of rerun (`--fresh` reruns it), so the table can be completed over several
sittings. The CE heads are trained first (OUT/mtp/ce:
`bebop pretrain-mtp --loss ce` from the trunk-copied initialisation on the shipped heads' three
self-distilled sets). Runs one after another: their wall times are compared, so nothing else should run.
Writes OUT/report/report.md (`bebop analyze --run OUT`), and copies the claims and per-run tables and the
figure to benchmarks/results/rl_claims.{json,png}. On the project's 2-core CPU: ~15 min per RL run,
~35 min for the CE heads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from bebop_jax.analyze import analyze
from bebop_jax.claims import CE_HEADS, VARIANTS, claims, run_stats
from bebop_jax.rl.records import read_history

CE_DATA = "data.extra_dirs=[data/smollm2-rl-mix-s1,data/smollm2-chat]"


def _bebop(*args: str, log: str) -> None:
    """Runs `bebop ARGS` in a fresh process, its output in `log`; raises with the log's tail on failure."""
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, "-m", "bebop_jax.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"bebop {' '.join(args)} failed (exit {done.returncode}); see {log}:\n"
                         + "".join(open(log).readlines()[-20:]))


def _keep(run: str, saved: str) -> None:
    """Copies a finished run's per-step metrics (RUN/metrics.jsonl) into `saved`, the committed copy."""
    os.makedirs(saved, exist_ok=True)
    shutil.copy(os.path.join(run, "metrics.jsonl"), saved)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-135m-rl.yaml")
    ap.add_argument("--steps", type=int, default=40, help="learner steps per RL run")
    ap.add_argument("--ce-steps", type=int, default=500, help="pretrain-mtp steps of the CE heads")
    ap.add_argument("--out", default="runs/claims")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS), help="runs to make")
    ap.add_argument("--results", default="benchmarks/results/rl_claims")
    ap.add_argument("--fresh", action="store_true", help="rerun runs whose metrics are kept under RESULTS_runs/")
    args = ap.parse_args()
    kept = args.results + "_runs"

    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    runs = {name: os.path.join(args.out, "rl", name) for name in args.only}
    for name, run in runs.items():
        saved = os.path.join(kept, name)
        if not args.fresh and len(read_history(run)) < args.steps <= len(read_history(saved)):
            os.makedirs(run, exist_ok=True)
            shutil.copy(os.path.join(saved, "metrics.jsonl"), run)
            print(f"{name}: restored {args.steps}+ steps from {saved}", flush=True)
    todo = [name for name, run in runs.items() if len(read_history(run)) < args.steps]
    for name in runs.keys() - set(todo):  # finished before this call (an earlier sitting may not have kept it)
        _keep(runs[name], os.path.join(kept, name))
    ce_heads = os.path.join(args.out, "mtp", "ce")
    if "ce-frozen" in todo and not os.path.isfile(os.path.join(ce_heads, "summary.json")):
        print(f"CE heads: {args.ce_steps} steps -> {ce_heads}", flush=True)
        _bebop("pretrain-mtp", "--config", "configs/smollm2-135m-mtp.yaml", "--loss", "ce", "--run-dir", ce_heads,
               f"pretrain.steps={args.ce_steps}", "pretrain.draft_vocab=4096", CE_DATA, "pretrain.cache_hidden=false",
               "pretrain.checkpoint_every=25", log=os.path.join(logs, "ce_heads.log"))
    for name in todo:
        print(f"{name} ({VARIANTS[name][1]}) -> {runs[name]}", flush=True)
        overrides = [o.replace(CE_HEADS, ce_heads) for o in VARIANTS[name][0]]
        _bebop("rl", "--config", args.config, "--run-dir", runs[name], f"rl.steps={args.steps}", *overrides,
               "rl.length_buckets=1", "speculative.compact=false", log=os.path.join(logs, f"{name}.log"))
        _keep(runs[name], os.path.join(kept, name))

    report = analyze(args.out)
    histories = {name: read_history(os.path.join(args.out, "rl", name)) for name in VARIANTS}
    stats = {name: run_stats(h) for name, h in histories.items() if h}
    rows = claims(stats)
    print(f"\n{'claim':<68} {'holds':<12} ours")
    for r in rows:
        print(f"{r['claim']:<68} {r['holds'][:12]:<12} {r['ours']}")
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    summary = {name: {"steps": s["steps"], "s_per_step": s["s_per_step"],
                      "acceptance": None if "acceptance" not in s else s["acceptance"].tolist(),
                      "per_position": s.get("per_position"), "entropy": s["entropy"].tolist(),
                      "reward": s["reward"].tolist(), "fit": s.get("fit")} for name, s in stats.items()}
    with open(args.results + ".json", "w") as f:
        json.dump({"config": args.config, "steps": args.steps, "runs": summary, "claims": rows}, f, indent=2)
    shutil.copy(os.path.join(os.path.dirname(report), "rl_acceptance.png"), args.results + ".png")
    print(f"report: {report}; wrote {args.results}.json and .png")


if __name__ == "__main__":
    main()
