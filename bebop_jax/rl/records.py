"""What an RL run leaves behind, and its held-out evaluation.

`held_out_eval` scores fixed test-split problems with plain sampling (RUN/eval.jsonl via
`append_evals`); `read_history` reads RUN/metrics.jsonl (the last record of each step wins, across
resumes); `summarise_run` draws RUN/curves.png (reward, acceptance) and returns the headline numbers.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from bebop_jax.config import Config
from bebop_jax.model import LoadedModel
from bebop_jax.rl.actor import Actor
from bebop_jax.rl.environments import env_options, make_environment


def held_out_eval(cfg: Config, model: LoadedModel):
    """`evaluate(params) -> {accuracy, reward, response_length}` on rl.eval_tasks fixed problems of the
    environment's test split, one plain sample each at the rollout temperature, the same key every time
    (so two evaluations differ by the policy, not by the noise)."""
    rl = cfg.rl
    env = make_environment(rl.environment, **env_options(rl, "test"))
    tasks = env.sample_tasks(np.random.default_rng([rl.seed, 2**31 - 1]), rl.eval_tasks)
    actor = Actor(model, env, group_size=1, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                  mode="none", max_prompt_tokens=rl.max_prompt_tokens,
                  max_seq_len=min(cfg.model.max_seq_len, model.cfg.max_position_embeddings))
    key = jax.random.key(rl.seed + 1)

    def evaluate(params) -> dict:
        metrics = actor.rollout(params, 0, key, tasks)[1]
        return {name: metrics[name] for name in ("accuracy", "reward", "response_length")}

    return evaluate


def _read_jsonl(path: str) -> list[dict]:
    """Records with a "step" from a JSON-lines file (none if it is absent); the last of each step wins."""
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def append_evals(run_dir: str, results: list[dict]) -> None:
    """Adds held-out evaluations ({step, accuracy, reward, response_length}) to RUN/eval.jsonl."""
    with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)


def read_history(run_dir: str) -> list[dict]:
    """The per-step metrics of a run (the last record of each step wins, across resumes)."""
    return _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def summarise_run(run_dir: str) -> dict:
    """Curves PNG (reward, acceptance) and headline numbers of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    if not history:
        return {}
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    rewards = np.array([h["reward"] for h in history])
    axes[0].plot(steps, rewards, marker="o", alpha=0.5, label="per step")
    window = min(5, len(rewards))  # each step's reward is a mean over a few groups: noisy
    axes[0].plot(steps[window - 1:], np.convolve(rewards, np.ones(window) / window, mode="valid"), color="C3",
                 label=f"mean of {window} steps")
    evals = _read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if evals:
        axes[0].plot([e["step"] for e in evals], [e["accuracy"] for e in evals], marker="s", color="k",
                     label="held-out accuracy")
    axes[0].legend(loc="upper left", fontsize="small")
    axes[0].set(xlabel="learner step", ylabel="mean reward", title="reward")
    if "draft_acceptance_rate" in history[0]:
        axes[1].plot(steps, [h["draft_acceptance_rate"] for h in history], marker="o", color="C0")
        twin = axes[1].twinx()
        twin.plot(steps, [h["draft_mean_acceptance_length"] for h in history], marker=".", color="C1")
        twin.set_ylabel("tokens per verify step", color="C1")
    axes[1].set(xlabel="learner step", ylabel="draft acceptance rate", title="draft acceptance")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "curves.png"), dpi=100)
    plt.close(fig)
    half = max(len(history) // 2, 1)
    mean = lambda key, part: float(np.mean([h[key] for h in part if key in h])) if any(key in h for h in part) else None  # noqa: E731
    summary = {"reward_first_half": mean("reward", history[:half]), "reward_second_half": mean("reward", history[half:]),
               "acceptance": mean("draft_acceptance_rate", history), "wall_s": history[-1]["wall_s"],
               "curves": os.path.join(run_dir, "curves.png")}
    if evals:
        summary["eval_accuracy"] = {int(e["step"]): e["accuracy"] for e in evals}
    return summary
