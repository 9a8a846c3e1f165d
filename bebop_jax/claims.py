"""The paper's claims about RL with speculative rollouts, checked on a set of `bebop rl` runs.

`VARIANTS` names the runs and the config overrides that make each one (`benchmarks/rl_claims.py` runs them
under OUT/rl/NAME; `bebop analyze --run OUT` reads them back). `run_stats` reduces one run's per-step
metrics (RUN/metrics.jsonl) to what the claims use; `claims` returns the claims table's rows.

Acceptance is `draft_acceptance_rate` of each learner step's rollouts: accepted drafts / (verify steps x K),
pooled over the step's 16-odd sequences, so one step's value carries ~+-0.03 of sampling noise; the claims
therefore compare fitted lines and means over steps, with two standard errors, rather than single steps; runs
are compared at the same policy entropy, since each RL run drifts to its own.
"""

from __future__ import annotations

import numpy as np

CE_HEADS = "{ce_heads}"  # stands for the CE heads' run directory in VARIANTS' overrides

# name -> (config overrides on the RL config, what the run is)
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "e2e-tv-frozen": ((), "frozen e2e-TV heads, rejection sampling"),
    "plain": (("speculative.mode=none",), "plain decoding"),
    "greedy-draft": (("speculative.mode=greedy_draft",), "frozen e2e-TV heads, greedy-draft verification"),
    "ce-frozen": ((f"speculative.mtp_checkpoint={CE_HEADS}",), "frozen CE heads, rejection sampling"),
    "online-tv": (("rl.mtp_strategy=online-tv",), "e2e-TV heads updated online (TV), rejection sampling"),
}
STABLE_POINTS = 0.05  # "keeps its acceptance": no 5-step mean more than 5 points below the first step's value
WINDOW = 5


def _fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares line y = a + b x: slope, intercept, the slope's standard error, R^2, and what `_level`
    needs (n, mean of x, its sum of squares, the residuals' standard deviation); nan where undetermined."""
    n = len(x)
    sxx = float(np.sum((x - x.mean()) ** 2))
    if n < 3 or sxx == 0.0:
        return dict.fromkeys(("slope", "intercept", "slope_se", "r2"), float("nan"))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    syy = float(np.sum((y - y.mean()) ** 2))
    sigma = float(np.sqrt(np.sum(residual ** 2) / (n - 2)))
    return {"slope": float(slope), "intercept": float(intercept), "slope_se": sigma / np.sqrt(sxx),
            "r2": 1.0 - float(np.sum(residual ** 2)) / syy if syy > 0 else float("nan"),
            "n": n, "x_mean": float(x.mean()), "sxx": sxx, "sigma": sigma}


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _level(s: dict, entropy: float) -> tuple[float, float]:
    """A run's acceptance at policy entropy `entropy` from its fitted line, with the standard error (its
    mean and standard error over steps where the line is undetermined)."""
    f = s["fit"]
    if not np.isfinite(f["slope"]):
        return _mean_se(s["acceptance"])
    se = f["sigma"] * np.sqrt(1.0 / f["n"] + (entropy - f["x_mean"]) ** 2 / f["sxx"])
    return f["intercept"] + f["slope"] * entropy, float(se)


def run_stats(history: list[dict]) -> dict:
    """One run's per-step metrics -> steps, seconds per step (median after the first, which compiles),
    per-step acceptance / entropy / reward arrays, acceptance per draft position, and the line fitted to
    acceptance against policy entropy across steps. Runs with plain decoding have no acceptance."""
    walls = np.diff([0.0] + [h["wall_s"] for h in history])
    out = {"steps": len(history), "s_per_step": float(np.median(walls[1:] if len(walls) > 1 else walls)),
           "entropy": np.array([h["policy_entropy"] for h in history]),
           "reward": np.array([h["reward"] for h in history]),
           "wall_s": np.array([h["wall_s"] for h in history])}
    if "draft_acceptance_rate" in history[0]:
        acc = np.array([h["draft_acceptance_rate"] for h in history])
        positions = sorted(k for k in history[0] if k.startswith("draft_acceptance_rate_pos_"))
        moving = np.convolve(acc, np.ones(WINDOW) / WINDOW, mode="valid") if len(acc) >= WINDOW else acc[None].mean(1)
        out.update(acceptance=acc, per_position=[float(np.mean([h[k] for h in history])) for k in positions],
                   moving=moving, fit=_fit(out["entropy"], acc))
    return out


def claims(stats: dict[str, dict]) -> list[dict]:
    """Rows {claim, paper, ours, holds} from the `run_stats` of the runs named as in VARIANTS; a claim whose
    runs are missing says which."""
    rows = []

    def row(claim, paper, needs, judge):
        missing = [n for n in needs if n not in stats or "acceptance" not in stats[n] and n != "plain"]
        if missing:
            rows.append({"claim": claim, "paper": paper, "ours": f"not run ({', '.join(missing)})", "holds": "-"})
        else:
            ours, holds = judge(*(stats[n] for n in needs))
            rows.append({"claim": claim, "paper": paper, "ours": ours, "holds": holds})

    def linear(s):
        f = s["fit"]
        ours = (f"slope {f['slope']:+.3f} +- {2 * f['slope_se']:.3f} per nat, R^2 {f['r2']:.2f}, over entropies "
                f"{s['entropy'].min():.2f}-{s['entropy'].max():.2f} nats ({s['steps']} steps)")
        if f["slope"] + 2 * f["slope_se"] < 0:
            return ours, "yes"
        return ours, "no" if f["slope"] - 2 * f["slope_se"] > 0 else "not resolved (slope within noise of 0)"

    def sensitivity(rej, greedy):
        a, b = rej["fit"], greedy["fit"]
        ours = (f"rejection {a['slope']:+.3f} +- {2 * a['slope_se']:.3f}, greedy draft {b['slope']:+.3f} +- "
                f"{2 * b['slope_se']:.3f} per nat; acceptance {rej['acceptance'].mean():.3f} vs "
                f"{greedy['acceptance'].mean():.3f}")
        margin = 2 * np.hypot(a["slope_se"], b["slope_se"])
        gap = abs(b["slope"]) - abs(a["slope"])
        return ours, "yes" if gap > margin else "no" if gap < -margin else "not resolved (slopes within noise)"

    def compare(a, b, names):
        """Acceptance of run a minus run b at the same policy entropy (the mean over both runs' steps): two
        RL runs drift to different entropies, and acceptance follows entropy."""
        h = float(np.mean(np.concatenate([a["entropy"], b["entropy"]])))
        (la, sa), (lb, sb) = _level(a, h), _level(b, h)
        diff, margin = la - lb, 2 * np.hypot(sa, sb)
        ours = (f"{names[0]} {a['acceptance'].mean():.3f} vs {names[1]} {b['acceptance'].mean():.3f} over the runs; at "
                f"the same entropy ({h:.2f} nats) {la:.3f} vs {lb:.3f}: {100 * diff:+.1f} +- {100 * margin:.1f} points")
        return ours, diff, margin

    def tv_vs_ce(tv, ce):
        ours, diff, margin = compare(tv, ce, ("e2e-TV", "CE"))
        return ours, "yes" if diff > margin else "no"

    def stable(s):
        first, moving = s["acceptance"][0], s["moving"]
        low = float(moving.min()) - first  # the claim is about losing acceptance: the lowest 5-step mean
        ours = (f"step 1 {first:.3f}; {WINDOW}-step means {moving.min():.3f}-{moving.max():.3f}, last "
                f"{moving[-1]:.3f} ({100 * (moving[-1] - first):+.1f} points) while the policy entropy went "
                f"{s['entropy'][0]:.2f} -> {s['entropy'][-WINDOW:].mean():.2f} nats")
        return ours, "yes" if low >= -STABLE_POINTS else f"no (fell {100 * low:.1f} points)"

    def online(frozen, upd):
        ours, diff, margin = compare(upd, frozen, ("online", "frozen"))
        ours += f"; {upd['s_per_step']:.1f} vs {frozen['s_per_step']:.1f} s/step"
        return ours, "yes" if diff < STABLE_POINTS else "no"

    def speedup(spec, plain):
        ratio = plain["s_per_step"] / spec["s_per_step"]
        ours = f"x{ratio:.2f} ({plain['s_per_step']:.1f} s/step plain, {spec['s_per_step']:.1f} speculative)"
        return ours, "yes" if ratio >= 1.5 else "partly (faster, below 1.5x)" if ratio > 1.0 else "no"

    row("Draft acceptance falls linearly with policy entropy (within RL)", "linear decrease", ["e2e-tv-frozen"], linear)
    row("Rejection sampling is less entropy-sensitive than greedy drafting", "flatter slope for rejection",
        ["e2e-tv-frozen", "greedy-draft"], sensitivity)
    row("e2e-TV heads accept more than CE heads", "~+10 points", ["e2e-tv-frozen", "ce-frozen"], tv_vs_ce)
    row("Frozen e2e-TV heads keep their acceptance through RL", f"stable (ours: never {100 * STABLE_POINTS:.0f} points below step 1)",
        ["e2e-tv-frozen"], stable)
    row("Online head updates are unnecessary", f"no gain (ours: < {100 * STABLE_POINTS:.0f} points)",
        ["e2e-tv-frozen", "online-tv"], online)
    row("Speculative rollouts speed up RL end to end", "up to 1.8x (ours: >= 1.5x)", ["e2e-tv-frozen", "plain"], speedup)
    return rows
