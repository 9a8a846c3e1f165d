"""The RL loop end to end on a tiny model: sync == async at staleness 0, exact resume, kill -9, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax.checkpoint import RunCheckpoints
from bebop_jax.config import load_config
from bebop_jax.rl.loop import train_rl
from bebop_jax.rl.records import read_history
from tests.rl_tiny import DigitsEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tiny_dir, run_dir, *overrides):
    return load_config(None, [f"model.source={tiny_dir}", f"rl.run_dir={run_dir}", "rl.prompts_per_step=2",
                              "rl.group_size=4", "rl.max_new_tokens=12", "rl.max_prompt_tokens=16",
                              "rl.learning_rate=1e-3", "rl.steps=4", *overrides])


def _params(run_dir, step):
    ckpt = RunCheckpoints(run_dir)
    state, _ = ckpt.restore_raw(step)
    ckpt.close()
    return state["learner"]["params"]


def test_sync_and_async_at_staleness_zero_make_the_same_first_update(tiny_dir, tmp_path):
    runs = {}
    for loop in ("sync", "async"):
        run = str(tmp_path / loop)
        train_rl(_cfg(tiny_dir, run, f"rl.loop={loop}", "rl.max_staleness=0", "rl.steps=1"), env=DigitsEnv(),
                 progress=False)
        runs[loop] = run
    a, b = read_history(runs["sync"])[0], read_history(runs["async"])[0]
    assert a["reward"] == b["reward"] and a["loss"] == b["loss"] and a["reward"] > 0
    flat = lambda tree: np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(tree)])  # noqa: E731
    np.testing.assert_array_equal(flat(_params(runs["sync"], 1)), flat(_params(runs["async"], 1)))


def test_learner_cuts_batches_to_their_length_bucket_with_the_same_update(tiny_dir, tmp_path):
    """rl.length_buckets=4 runs the learner on the filled quarter-buckets of L=64 tokens: the update of L."""
    runs = {}
    for buckets in (1, 4):
        run = str(tmp_path / f"b{buckets}")
        train_rl(_cfg(tiny_dir, run, "rl.loop=sync", "rl.steps=2", "rl.max_new_tokens=4", f"rl.length_buckets={buckets}",
                      "rl.share_prefix=false"), env=DigitsEnv(), progress=False)
        runs[buckets] = read_history(run)
    assert [h["learner_tokens"] for h in runs[1]] == [64, 64]
    assert all(h["learner_tokens"] in (16, 32) for h in runs[4])  # prompts <= 16 + 4 new tokens
    for a, b in zip(runs[1], runs[4]):
        assert a["reward"] == b["reward"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-7)


def test_shared_prefix_learner_makes_the_update_of_whole_rows(tiny_dir, tmp_path):
    """rl.share_prefix runs each task's prompt once for its 4 rollouts: the loss, the metrics and the parameters
    of the learner over whole rows, with fewer tokens through the forward (KL term on: the reference too)."""
    runs = {}
    for share in ("false", "true"):
        run = str(tmp_path / share)
        train_rl(_cfg(tiny_dir, run, "rl.loop=sync", "rl.steps=2", f"rl.share_prefix={share}", "rl.kl_coef=0.1"),
                 env=DigitsEnv(), progress=False)
        runs[share] = read_history(run)
    for a, b in zip(runs["false"], runs["true"]):
        assert a["reward"] == b["reward"]
        for name in ("loss", "kl_ref", "grad_norm", "entropy"):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6)
        assert b["learner_tokens"] < a["learner_tokens"]
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    np.testing.assert_allclose(flat(_params(str(tmp_path / "true"), 2)), flat(_params(str(tmp_path / "false"), 2)),
                               rtol=1e-4, atol=1e-5)


def test_resume_after_interruption_gives_the_same_next_steps(tiny_dir, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train_rl(_cfg(tiny_dir, full, "rl.loop=sync", "rl.checkpoint_every=2"), env=DigitsEnv(), progress=False)
    train_rl(_cfg(tiny_dir, cut, "rl.loop=sync", "rl.checkpoint_every=2"), env=DigitsEnv(), progress=False,
             stop_at_step=2)
    summary = train_rl(_cfg(tiny_dir, cut, "rl.loop=sync", "rl.checkpoint_every=2"), env=DigitsEnv(), progress=False)
    assert summary["steps"] == 4
    h_full, h_cut = read_history(full), read_history(cut)
    assert [h["step"] for h in h_cut] == [1, 2, 3, 4]
    for a, b in zip(h_full[2:], h_cut[2:]):
        assert a["loss"] == b["loss"] and a["reward"] == b["reward"]
    assert os.path.isfile(summary["curves"])


def test_async_run_logs_metrics_and_counts_staleness(tiny_dir, tmp_path):
    run = str(tmp_path / "async")
    summary = train_rl(_cfg(tiny_dir, run, "rl.loop=async", "rl.max_staleness=1", "rl.steps=3"), env=DigitsEnv(),
                       progress=False)
    history = read_history(run)
    assert summary["steps"] == 3 and len(history) == 3
    for h in history:
        assert 0 <= h["staleness"] <= 1
        for key in ("reward", "accuracy", "response_length", "policy_entropy", "rollout_tokens_per_s",
                    "learner_step_s", "dropped_trajectories", "loss"):
            assert key in h
    assert os.path.isdir(os.path.join(run, "tb"))


_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from bebop_jax.config import load_config
from bebop_jax.rl.loop import train_rl
from tests.rl_tiny import DigitsEnv
cfg = load_config(None, {overrides!r})
print("summary", train_rl(cfg, env=DigitsEnv(), progress=False), flush=True)
"""


def _start(tiny_dir, run, steps):
    overrides = [f"model.source={tiny_dir}", f"rl.run_dir={run}", "rl.prompts_per_step=2", "rl.group_size=2",
                 "rl.max_new_tokens=8", "rl.max_prompt_tokens=16", f"rl.steps={steps}", "rl.checkpoint_every=1",
                 "rl.loop=async"]
    return subprocess.Popen([sys.executable, "-c", _SCRIPT.format(root=ROOT, overrides=overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for_lines(run, count, proc, timeout=240):
    """Waits until metrics.jsonl holds `count` records (one per learner step, across restarts)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = os.path.join(run, "metrics.jsonl")
        if os.path.isfile(path) and sum(1 for _ in open(path)) >= count:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    raise TimeoutError(f"{count} learner steps not logged within {timeout}s")


def test_kill_9_then_restart_loses_at_most_one_interval_and_sigterm_saves(tiny_dir, tmp_path):
    run = str(tmp_path / "killed")
    proc = _start(tiny_dir, run, steps=50)
    _wait_for_lines(run, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = RunCheckpoints(run)
    saved = ckpt.latest_step()
    ckpt.close()
    before = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert saved is not None and max(before) - saved <= 1  # checkpoint_every=1: at most one step of work lost
    proc = _start(tiny_dir, run, steps=50)  # resumes; then SIGTERM makes it save and exit cleanly
    _wait_for_lines(run, len(before) + 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "signal received: checkpoint saved at step" in out
    after = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))][len(before):]
    assert after[0] == saved + 1  # the restart continued from the last checkpoint


def test_actor_cuts_tool_calls_at_the_stop_text(tiny_dir):
    from bebop_jax.model import load_model
    from bebop_jax.rl.actor import _cut_at_stop

    tok = load_model(tiny_dir).tokenizer
    ids = np.array(tok.encode("a<x>b<y>c"))
    assert _cut_at_stop(tok, ids, "<y>") == len(tok.encode("a<x>b<y>"))
    assert _cut_at_stop(tok, ids, "zz") == len(ids) and _cut_at_stop(tok, ids, None) == len(ids)


@pytest.mark.parametrize("strategy", ["online-ce", "online-tv"])
def test_online_mtp_update_trains_the_heads_on_the_completions(tiny_dir, strategy):
    """The online strategies' step sees the batch's completion positions (and only those) and moves the heads."""
    import jax
    import jax.numpy as jnp

    from bebop_jax.model import load_model
    from bebop_jax.model.mtp import MTPConfig, init_mtp_params
    from bebop_jax.rl.mtp_update import OnlineMTPUpdater

    model = load_model(tiny_dir)
    mtp = MTPConfig(2, 1)
    heads = init_mtp_params(model.cfg, mtp, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, model.cfg.vocab_size, (4, 16)).astype(np.int32)
    loss_mask = np.zeros((4, 16), bool)
    loss_mask[:, 6:14] = True  # completion tokens 6..13; 14, 15 padding
    one_device = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)),
                                            jax.sharding.PartitionSpec())
    updater = OnlineMTPUpdater(model, mtp, jax.tree.map(jnp.copy, heads), strategy, learning_rate=1e-2, length=16,
                               heads_shardings=one_device)
    batch = (jnp.asarray(tokens), jnp.asarray(loss_mask))
    first = updater.update(model.params, *batch)
    for _ in range(5):
        last = updater.update(model.params, *batch)
    assert 0.0 < first["mtp_alpha_1"] < 1.0  # a real mean over counted positions (none counted gives 0)
    assert last["mtp_loss"] < first["mtp_loss"] - 1e-3, (first, last)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), updater.state.params, heads)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_held_out_evaluation_before_every_n_steps_and_at_the_end(tiny_dir, tmp_path):
    run = str(tmp_path / "eval")
    summary = train_rl(_cfg(tiny_dir, run, "rl.loop=sync", "rl.steps=3", "rl.eval_tasks=3", "rl.eval_every=2",
                            "rl.math_level=easy"), progress=False)
    evals = [json.loads(line) for line in open(os.path.join(run, "eval.jsonl"))]
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert 0.0 <= e["accuracy"] <= 1.0 and e["response_length"] > 0
    assert sorted(summary["eval_accuracy"]) == [0, 2, 3]
    assert len(read_history(run)) == 3  # the per-step metrics are not mixed with the evaluations


def test_held_out_problems_come_from_the_test_split_and_training_from_the_rest():
    from bebop_jax.rl.environments import _in_split, make_environment
    from bebop_jax.rl.environments import env_options

    rl = load_config(None, ["rl.eval_tasks=8", "rl.math_level=easy"]).rl
    rng = np.random.default_rng(0)
    test = make_environment("math", **env_options(rl, "test")).sample_tasks(rng, 20)
    train = make_environment("math", **env_options(rl, "train")).sample_tasks(rng, 20)
    assert all(_in_split(t.messages[0]["content"], "test", 0.1) for t in test)
    assert not any(_in_split(t.messages[0]["content"], "test", 0.1) for t in train)
    assert {t.messages[0]["content"] for t in test}.isdisjoint(t.messages[0]["content"] for t in train)


def test_publish_hands_the_actor_weights_in_the_compute_dtype():
    from bebop_jax.rl.weights import publish

    tree = {"w": jnp.ones((4, 4), jnp.float32), "step": jnp.int32(3)}
    shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), tree)
    out = publish(tree, shardings, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["step"].dtype == jnp.int32
    assert publish(tree, shardings)["w"].dtype == jnp.float32
    assert out["w"].unsafe_buffer_pointer() != tree["w"].unsafe_buffer_pointer()
