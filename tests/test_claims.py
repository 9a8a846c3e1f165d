"""The claims table on RL histories with known slopes, levels, drifts and step times."""

import json
import os
import subprocess
import sys

import numpy as np

from bebop_jax.analyze import analyze
from bebop_jax.claims import claims, run_stats


def _history(steps, s_per_step, entropy, acceptance=None, rng=None):
    out = []
    for i in range(steps):
        h = {"step": i + 1, "reward": 0.1, "policy_entropy": float(entropy[i]), "rollout_tokens_per_s": 50.0,
             "wall_s": 60.0 + s_per_step * i}  # the first step compiles: 60 s
        if acceptance is not None:
            a = float(acceptance[i])
            h.update(draft_acceptance_rate=a, draft_acceptance_rate_pos_0=a + 0.1, draft_acceptance_rate_pos_1=a,
                     draft_acceptance_rate_pos_2=a - 0.1)
        out.append(h)
    return out


def _write_runs(root, runs):
    """Each run's history as ROOT/NAME/metrics.jsonl, the file `bebop rl` writes."""
    for name, hist in runs.items():
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in hist)


def _runs(seed=0):
    rng = np.random.default_rng(seed)
    n = 40
    entropy = np.linspace(2.2, 1.2, n) + rng.normal(0, 0.05, n)
    noise = lambda: rng.normal(0, 0.01, n)  # noqa: E731
    return {
        "e2e-tv-frozen": _history(n, 20.0, entropy, 0.8 - 0.1 * entropy + noise()),
        "greedy-draft": _history(n, 20.0, entropy, 0.9 - 0.3 * entropy + noise()),
        "ce-frozen": _history(n, 20.0, entropy, 0.7 - 0.1 * entropy + noise()),
        "online-tv": _history(n, 26.0, entropy, 0.81 - 0.1 * entropy + noise()),
        "plain": _history(n, 30.0, entropy),
    }


def test_run_stats_fit_the_slope_and_time_steps_after_the_first():
    stats = run_stats(_runs()["e2e-tv-frozen"])
    assert stats["steps"] == 40 and stats["s_per_step"] == 20.0
    assert abs(stats["fit"]["slope"] + 0.1) < 0.02 and 0 < stats["fit"]["slope_se"] < 0.02
    np.testing.assert_allclose(stats["per_position"], np.mean(stats["acceptance"]) + np.array([0.1, 0.0, -0.1]))
    assert len(stats["moving"]) == 36


def test_claims_verdicts_follow_the_numbers():
    rows = {r["claim"]: r for r in claims({k: run_stats(v) for k, v in _runs().items()})}
    assert {k.split()[0]: r["holds"] for k, r in rows.items()} == dict.fromkeys(
        ("Draft", "Rejection", "e2e-TV", "Frozen", "Online", "Speculative"), "yes")
    # entropy falls 1 nat over the run, so acceptance rises ~0.1: the heads lose nothing
    rise = rows["Frozen e2e-TV heads keep their acceptance through RL"]["ours"].split("(")[1].split()[0]
    assert 7.0 < float(rise) < 12.0
    points = float(rows["e2e-TV heads accept more than CE heads"]["ours"].split(": ")[1].split()[0])
    assert abs(points - 10.0) < 1.0
    assert rows["Speculative rollouts speed up RL end to end"]["ours"].startswith("x1.50")


def test_claims_say_which_runs_are_missing_and_reverse_when_the_data_do():
    runs = _runs()
    runs["greedy-draft"], runs["e2e-tv-frozen"] = runs["e2e-tv-frozen"], runs["greedy-draft"]  # rejection steeper
    del runs["ce-frozen"], runs["online-tv"]
    rows = {r["claim"].split()[0]: r for r in claims({k: run_stats(v) for k, v in runs.items()})}
    assert rows["Rejection"]["holds"] == "no"
    assert rows["e2e-TV"]["ours"] == "not run (ce-frozen)" and rows["Online"]["holds"] == "-"
    flat = _history(40, 20.0, np.full(40, 1.5), np.full(40, 0.6))  # no entropy range: no slope to judge
    assert claims({"e2e-tv-frozen": run_stats(flat)})[0]["holds"] != "yes"
    falling = _history(40, 20.0, np.full(40, 1.5) + np.linspace(0, 0.01, 40), np.linspace(0.6, 0.45, 40))
    assert claims({"e2e-tv-frozen": run_stats(falling)})[3]["holds"] == "no (fell -14.2 points)"


def test_analyze_writes_the_claims_table(tmp_path):
    _write_runs(tmp_path / "rl", _runs())
    text = open(analyze(str(tmp_path))).read()
    assert "## The paper's claims on these RL runs" in text
    assert "| e2e-TV heads accept more than CE heads | ~+10 points |" in text
    assert "| plain | 40 | 30.0 |" in text and os.path.getsize(tmp_path / "report" / "rl_acceptance.png") > 1000


def test_runs_are_compared_at_the_same_entropy():
    """Two runs on one acceptance-entropy line, one drifting to lower entropy: equal heads, not +10 points."""
    rng = np.random.default_rng(1)
    hi, lo = np.linspace(2.2, 1.8, 40), np.linspace(1.6, 0.6, 40)
    line = lambda h: 0.8 - 0.1 * h + rng.normal(0, 0.01, 40)  # noqa: E731
    stats = {"e2e-tv-frozen": run_stats(_history(40, 20.0, lo, line(lo))),
             "ce-frozen": run_stats(_history(40, 20.0, hi, line(hi)))}
    assert stats["e2e-tv-frozen"]["acceptance"].mean() - stats["ce-frozen"]["acceptance"].mean() > 0.08
    row = claims(stats)[2]
    assert row["holds"] == "no" and abs(float(row["ours"].split(": ")[1].split()[0])) < 2.0


def test_rl_claims_rebuilds_the_table_from_kept_metrics_without_running(tmp_path):
    """benchmarks/rl_claims.py restores runs kept under RESULTS_runs/ (committed) instead of rerunning them."""
    results = tmp_path / "res" / "rl_claims"
    _write_runs(f"{results}_runs", _runs())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "rl_claims.py"), "--steps", "40",
                           "--out", str(tmp_path / "out"), "--results", str(results)],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("restored 40+ steps") == 5
    assert os.listdir(tmp_path / "out" / "logs") == []  # no `bebop` process ran: each writes a log there
    table = json.load(open(f"{results}.json"))
    assert [r["holds"] for r in table["claims"]] == ["yes"] * 6
    assert table["runs"]["plain"]["s_per_step"] == 30.0 and os.path.getsize(f"{results}.png") > 1000
