"""`bebop analyze --run DIR`: a Markdown report with figures from the runs under DIR.

It reads what the stages wrote and computes only fits and means of it:
  - `**/acceptance.json` (eval-acceptance, one per trained heads): acceptance against policy entropy
    per loss, bucket means and the fitted line, and a table of slopes, alpha_k and expected length;
  - `modes.json` (`verify_modes`): acceptance of rejection / greedy-draft / block verification across
    temperatures, measured by the speculative engine;
  - `rl/*/metrics.jsonl` (bebop rl): draft acceptance, policy entropy and wall time per learner step, per run,
    and the paper's claims checked on runs named as in `claims.VARIANTS`;
  - `speed.json`: plain vs speculative rollout throughput.
Writes DIR/report/report.md and PNGs, and logs the figures to tensorboardX (DIR/report/tb).
A missing input leaves its section out with a note, so partial runs still get a report.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from bebop_jax.claims import VARIANTS, claims, run_stats
from bebop_jax.rl.records import read_history


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(path: str, run_dir: str) -> str:
    return os.path.relpath(os.path.dirname(path), run_dir)


def _entropy_figure(reports: dict[str, dict], out: str) -> list[str]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = ["| heads | T | alpha_1..K | E[accepted length] | slope alpha_1 / nat | R^2 |", "|---|---|---|---|---|---|"]
    for name, report in reports.items():
        res = next((r for r in report["results"] if r["temperature"] == 1.0), report["results"][0])
        head = res["heads"][0]
        xs = np.array([b["entropy_mean"] for b in head["buckets"]])
        line = ax.plot(xs, [b["alpha_mean"] for b in head["buckets"]], "o", label=name)[0]
        grid = np.linspace(xs.min(), xs.max(), 20)
        ax.plot(grid, head["fit"]["intercept"] + head["fit"]["slope"] * grid, "--", color=line.get_color())
        for r in report["results"]:
            h = r["heads"][0]
            lines.append(f"| {name} | {r['temperature']:g} | {', '.join(f'{a:.3f}' for a in r['alpha'])} | "
                         f"{r['expected_length']:.3f} | {h['fit']['slope']:+.4f} | {h['fit']['r2']:.3f} |")
    ax.set(xlabel="policy entropy H(p) [nats]", ylabel="alpha_1 = 1 - TV", ylim=(0, 1),
           title="draft acceptance vs policy entropy (T=1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return lines


def _modes_figure(modes: dict, out: str) -> list[str]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    lines = ["| mode | T | acceptance rate | mean accepted length | policy entropy |", "|---|---|---|---|---|"]
    for mode, rows in modes["modes"].items():
        ts = [r["temperature"] for r in rows]
        axes[0].plot(ts, [r["draft_acceptance_rate"] for r in rows], "o-", label=mode)
        axes[1].plot(ts, [r["draft_mean_acceptance_length"] for r in rows], "o-", label=mode)
        lines += [f"| {mode} | {r['temperature']:g} | {r['draft_acceptance_rate']:.3f} | "
                  f"{r['draft_mean_acceptance_length']:.3f} | {r['policy_entropy']:.3f} |" for r in rows]
    axes[0].set(xlabel="temperature", ylabel="draft acceptance rate", title="verification rule vs temperature")
    axes[1].set(xlabel="temperature", ylabel="tokens per verify step", title=f"K = {modes['num_draft']}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return lines


def _rl_figure(histories: dict[str, list[dict]], out: str) -> list[str]:
    """Four panels, one curve per run: acceptance and policy entropy per learner step, acceptance against
    entropy with the line fitted across steps, wall time. Returns the per-run table."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    lines = ["| RL run | steps | s / step | rollout tok/s | acceptance: step 1, mean, per position | "
             "entropy: first, last | slope / nat (R^2) | reward: first 5, last 5 |", "|---|---|---|---|---|---|---|---|"]
    for name, hist in histories.items():
        s = run_stats(hist)
        steps = [h["step"] for h in hist]
        color = axes[0, 1].plot(steps, s["entropy"], "o-", ms=3, label=name)[0].get_color()
        axes[1, 1].plot(steps, s["wall_s"] / 60, "-", color=color, label=name)
        accept = "-"
        fit = "-"
        if "acceptance" in s:
            axes[0, 0].plot(steps, s["acceptance"], "o-", ms=3, color=color, label=name)
            axes[1, 0].plot(s["entropy"], s["acceptance"], "o", ms=3, color=color, label=name)
            f = s["fit"]
            if np.isfinite(f["slope"]):
                grid = np.linspace(s["entropy"].min(), s["entropy"].max(), 10)
                axes[1, 0].plot(grid, f["intercept"] + f["slope"] * grid, "--", color=color)
            accept = (f"{s['acceptance'][0]:.3f}, {s['acceptance'].mean():.3f}, "
                      f"{' / '.join(f'{a:.2f}' for a in s['per_position'])}")
            fit = f"{f['slope']:+.3f} ({f['r2']:.2f})"
        tokens = np.mean([h["rollout_tokens_per_s"] for h in hist])
        lines.append(f"| {name} | {s['steps']} | {s['s_per_step']:.1f} | {tokens:.1f} | {accept} | "
                     f"{s['entropy'][0]:.3f}, {s['entropy'][-1]:.3f} | {fit} | "
                     f"{s['reward'][:5].mean():.3f}, {s['reward'][-5:].mean():.3f} |")
    for ax, (xlabel, ylabel, title) in zip(axes.flat, (
            ("learner step", "draft acceptance rate", "acceptance through RL"),
            ("learner step", "policy entropy [nats / token]", "policy entropy"),
            ("policy entropy [nats / token]", "draft acceptance rate", "acceptance vs entropy, one point per step"),
            ("learner step", "wall time [min]", "wall time"))):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return lines


def analyze(run_dir: str) -> str:
    """Writes the report of `run_dir` and returns the path of report.md."""
    from tensorboardX import SummaryWriter

    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    md = [f"# bebop-jax report: {os.path.abspath(run_dir)}", ""]
    figures = []
    reports = {_label(p, run_dir): json.load(open(p))
               for p in sorted(glob.glob(os.path.join(run_dir, "**", "acceptance.json"), recursive=True))}
    modes_file = os.path.join(run_dir, "modes.json")
    histories = {os.path.basename(d): read_history(d)
                 for d in sorted(glob.glob(os.path.join(run_dir, "rl", "*"))) if os.path.isfile(os.path.join(d, "metrics.jsonl"))}
    sections = [  # (title, figure file, draw(path) -> table lines, or None when the input is missing, note)
        ("Acceptance vs policy entropy, per draft loss", "acceptance_vs_entropy.png",
         (lambda path: _entropy_figure(reports, path)) if reports else None, "_no eval-acceptance reports found_"),
        ("Rejection sampling vs greedy drafting vs block verification", "verify_modes.png",
         (lambda path: _modes_figure(json.load(open(modes_file)), path)) if os.path.isfile(modes_file) else None,
         "_no modes.json found_"),
        ("RL runs: acceptance, policy entropy and wall time per step", "rl_acceptance.png",
         (lambda path: _rl_figure({k: v for k, v in histories.items() if v}, path))
         if any(histories.values()) else None, "_no RL runs found under rl/_"),
    ]
    for title, figure, draw, note in sections:
        md.append(f"## {title}")
        if draw is None:
            md += ["", note, ""]
            continue
        figures.append(figure)
        md += ["", f"![{title}]({figure})", "", *draw(os.path.join(out, figure)), ""]
    rows = claims({name: run_stats(hist) for name, hist in histories.items() if hist})
    md += ["## The paper's claims on these RL runs", ""]
    if all(r["holds"] == "-" for r in rows):
        md += [f"_no RL runs named {', '.join(VARIANTS)} (`benchmarks/rl_claims.py` makes them)_", ""]
    else:
        md += ["+- is two standard errors over learner steps; runs named as in `benchmarks/rl_claims.py`.", "",
               "| claim | paper | ours | holds |", "|---|---|---|---|",
               *(f"| {r['claim']} | {r['paper']} | {r['ours']} | {r['holds']} |" for r in rows), ""]
    md.append("## Rollout throughput")
    speed_file = os.path.join(run_dir, "speed.json")
    if os.path.isfile(speed_file):
        speed = json.load(open(speed_file))
        md += ["", "| setting | plain tok/s | speculative tok/s | speed-up | acceptance | tokens / verify |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['setting']} | {r['plain_tokens_per_s']:.1f} | {r['spec_tokens_per_s']:.1f} | x{r['speedup']:.2f} | "
               f"{r['draft_acceptance_rate']:.3f} | {r['draft_mean_acceptance_length']:.2f} |" for r in speed["rows"]]
        md.append("")
    else:
        md += ["", "_no speed.json found_", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    writer = SummaryWriter(os.path.join(out, "tb"))
    plt = _plt()
    for name in figures:
        writer.add_image(f"report/{os.path.splitext(name)[0]}", plt.imread(os.path.join(out, name))[..., :3],
                         dataformats="HWC")
    writer.close()
    return os.path.join(out, "report.md")
