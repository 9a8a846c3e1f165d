"""`bebop analyze` on run outputs in the writers' own formats: figures, tables and the fitted slopes."""

import json
import os

import numpy as np

from bebop_jax.analyze import analyze
from bebop_jax.eval_acceptance import entropy_analysis


def _acceptance_report(slope, rng):
    entropy = rng.uniform(0, 4, 2000)
    alpha = np.clip(0.9 + slope * entropy + rng.normal(0, 0.02, entropy.size), 0, 1)
    head = {"k": 1, "alpha": float(alpha.mean()), **entropy_analysis(alpha, entropy, 6)}
    return {"results": [{"temperature": 1.0, "alpha": [head["alpha"]], "expected_length": 1 + head["alpha"],
                         "entropy_mean": float(entropy.mean()), "heads": [head]}]}


def test_report_has_every_section_and_the_measured_numbers(tmp_path):
    rng = np.random.default_rng(0)
    for name, slope in (("e2e_tv", -0.05), ("ce", -0.15)):
        os.makedirs(tmp_path / "mtp" / name)
        json.dump(_acceptance_report(slope, rng), open(tmp_path / "mtp" / name / "acceptance.json", "w"))
    modes = {"num_draft": 3, "modes": {m: [{"temperature": t, "draft_acceptance_rate": a - t / 10,
                                            "draft_mean_acceptance_length": 1 + 3 * (a - t / 10), "policy_entropy": t}
                                           for t in (0.5, 1.0)] for m, a in (("rejection", 0.8), ("greedy_draft", 0.6),
                                                                            ("block", 0.85))}}
    json.dump(modes, open(tmp_path / "modes.json", "w"))
    for run in ("frozen", "online-ce"):
        os.makedirs(tmp_path / "rl" / run)
        with open(tmp_path / "rl" / run / "metrics.jsonl", "w") as f:
            for step in (1, 2):
                f.write(json.dumps({"step": step, "reward": 0.1 * step, "draft_acceptance_rate": 0.5,
                                    "rollout_tokens_per_s": 40.0, "wall_s": 10.0 * step,
                                    "policy_entropy": 1.0}) + "\n")
    json.dump({"rows": [{"setting": "batch 1, T=1, K=3", "plain_tokens_per_s": 30.0, "spec_tokens_per_s": 45.0,
                         "speedup": 1.5, "draft_acceptance_rate": 0.6, "draft_mean_acceptance_length": 2.8}]},
              open(tmp_path / "speed.json", "w"))
    report = analyze(str(tmp_path))
    text = open(report).read()
    for png in ("acceptance_vs_entropy.png", "verify_modes.png", "rl_acceptance.png"):
        assert os.path.getsize(tmp_path / "report" / png) > 1000 and png in text
    slopes = {line.split("|")[1].strip(): float(line.split("|")[5]) for line in text.splitlines()
              if line.startswith("| mtp/")}
    assert abs(slopes["mtp/e2e_tv"] + 0.05) < 0.005 and abs(slopes["mtp/ce"] + 0.15) < 0.005  # fitted slopes
    assert "| greedy_draft | 0.5 | 0.550 |" in text
    assert "| frozen | 2 | 10.0 |" in text and "x1.50" in text
    assert os.listdir(tmp_path / "report" / "tb")


def test_partial_runs_get_a_report_with_notes(tmp_path):
    text = open(analyze(str(tmp_path))).read()
    assert "_no eval-acceptance reports found_" in text and "_no RL runs found under rl/_" in text
    assert "_no RL runs named e2e-tv-frozen, plain" in text
