"""`bebop rl`'s loop on several processes (jax.distributed on 127.0.0.1, CPU collectives), against one process.

`tests/multihost_rl_worker.py` runs `train_rl` on the tiny chat model over one fsdp=2 x tensor=2 mesh of 4
devices: 2 processes x 2 devices, 4 x 1, or 1 x 4 (the reference). Every process rolls out the whole
batch and reads it back by an all-gather, scores it and feeds the learner global arrays, so the sharded
step is the same program on the same values as on one process: losses agree to 1e-5 (measured: equal)
and the final parameters to 1e-4. Process 0 alone writes the logs; checkpoints are written by all.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bebop_jax.checkpoint import RunCheckpoints
from bebop_jax.rl.records import read_history
from tests.fake_devices import cpu_env
from tests.test_multihost import collect, free_port, wait_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(num_processes: int, tiny_dir: str, run_dir, loop: str, steps: int, *overrides: str) -> list[subprocess.Popen]:
    devices = 4 // num_processes
    env = cpu_env(devices)
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "tests.multihost_rl_worker", str(i), str(num_processes), port,
                              tiny_dir, str(run_dir), loop, str(steps), *overrides], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


def finish(procs: list[subprocess.Popen], run_dir) -> list[dict]:
    return collect(procs, run_dir, timeout=420)


def latest_step(run_dir) -> int | None:
    if not (run_dir / "checkpoints").exists():
        return None
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    return max(steps, default=None)


def wait_for(condition, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def final_params(run_dir, part: str = "learner") -> list[np.ndarray]:
    """The leaves of the last checkpoint's `part` params: the trunk ("learner") or the heads ("mtp")."""
    ckpt = RunCheckpoints(str(run_dir))
    state, _ = ckpt.restore_raw(ckpt.latest_step())
    ckpt.close()
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state[part]["params"])]


@pytest.fixture(scope="module")
def sync_reference(tiny_dir, tmp_path_factory):
    """Two sync steps on 1 process x 4 devices: (its report, its run directory), shared by the tests below."""
    run = tmp_path_factory.mktemp("one")
    return finish(start(1, tiny_dir, run, "sync", 2), run)[0], run


@pytest.mark.xdist_group("sync_reference")  # one worker runs both, so the reference runs once
@pytest.mark.parametrize("num_processes", [2, 4])
def test_sync_steps_on_several_processes_equal_one_process(tiny_dir, tmp_path, sync_reference, num_processes):
    ref, ref_dir = sync_reference
    got = finish(start(num_processes, tiny_dir, tmp_path / "many", "sync", 2), tmp_path / "many")
    assert all(g["devices"] == 4 for g in got)
    for g in got:  # the trunk loaded tensor by tensor straight into its shards: no whole copy on any device
        assert g["loading"]["whole_on_one_device"] == 0 and sum(g["loading"]["sharded"]) >= 10
        if num_processes == 2:  # each process read the blocks of its own 2 devices only, not the checkpoint
            assert g["loading"]["bytes_read"] < 0.7 * g["loading"]["bytes"], g["loading"]
    np.testing.assert_allclose(got[0]["losses"], ref["losses"], atol=1e-5)
    assert got[0]["rewards"] == ref["rewards"]  # the same rollouts, scored the same
    assert not (tmp_path / "many/process1.json").read_text() == ""  # every process finished
    for a, b in zip(final_params(tmp_path / "many"), final_params(ref_dir)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    steps = [h["step"] for h in read_history(str(tmp_path / "many"))]
    with open(tmp_path / "many/metrics.jsonl") as f:
        assert len(f.readlines()) == len(steps) == 2  # one writer: no step logged twice


def test_online_tv_heads_on_two_processes_equal_one_process(tiny_dir, tmp_path):
    """rl.mtp_strategy=online-tv: speculative rollouts with heads updated by a TV step per batch, on the
    learner's mesh across 2 processes x 2 devices, equal the same run on 1 process x 4 devices."""
    import jax

    from bebop_jax.checkpoint import save_heads_file
    from bebop_jax.model import load_model
    from bebop_jax.model.mtp import MTPConfig, init_mtp_params

    trunk, mtp = load_model(tiny_dir).cfg, MTPConfig(2, 1)
    heads = str(tmp_path / "heads.safetensors")
    save_heads_file(heads, trunk, mtp, init_mtp_params(trunk, mtp, jax.random.key(0)), None, "tiny")
    online = ("speculative.mode=rejection", f"speculative.mtp_checkpoint={heads}", "speculative.num_draft=2",
              "rl.mtp_strategy=online-tv", "rl.mtp_learning_rate=1e-2")
    ref = finish(start(1, tiny_dir, tmp_path / "one", "sync", 2, *online), tmp_path / "one")[0]
    got = finish(start(2, tiny_dir, tmp_path / "two", "sync", 2, *online), tmp_path / "two")
    assert len(ref["mtp_losses"]) == 2 and all(m is not None for m in ref["mtp_losses"])
    for g in got:
        np.testing.assert_allclose(g["mtp_losses"], ref["mtp_losses"], atol=1e-5)
        np.testing.assert_allclose(g["losses"], ref["losses"], atol=1e-5)
        assert g["rewards"] == ref["rewards"]
    for a, b in zip(final_params(tmp_path / "two", "mtp"), final_params(tmp_path / "one", "mtp")):
        np.testing.assert_allclose(a, b, atol=1e-4)  # the heads' TV steps agree too, not only the trunk's


def test_async_on_two_processes_survives_kill_9_and_stops_together_on_sigterm(tiny_dir, tmp_path):
    run = tmp_path / "async"
    procs = start(2, tiny_dir, run, "async", 8)
    wait_for(lambda: latest_step(run) is not None)  # checkpoints every 2 steps: kill -9 both once one is saved
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    saved = latest_step(run)
    logged = max(h["step"] for h in read_history(str(run)))
    assert saved >= 2 and logged - saved <= 2  # lost at most one checkpoint interval
    procs = start(2, tiny_dir, run, "async", 8)  # resumes from the checkpoint
    wait_for(lambda: latest_step(run) > saved)
    procs[1].send_signal(signal.SIGTERM)  # one host preempted: every process saves the same step and exits 0
    results = finish(procs, run)
    stopped = {r["summary"]["steps"] for r in results}
    assert len(stopped) == 1 and stopped.pop() < 8
    assert RunCheckpoints(str(run)).latest_step() == results[0]["summary"]["steps"]
    steps = [h["step"] for h in read_history(str(run))]
    assert steps == list(range(1, len(steps) + 1))  # continuous across the kill and the resume


def bebop(num_processes: int, *args: str, timeout: float = 300) -> list[str]:
    """`bebop ARGS` on num_processes local processes of one CPU device each; returns their outputs."""
    env = cpu_env(1)
    port = str(free_port())
    mesh = lambda i: [] if num_processes == 1 else [f"mesh.coordinator_address=127.0.0.1:{port}",  # noqa: E731
                                                     f"mesh.num_processes={num_processes}", f"mesh.process_id={i}"]
    procs = [subprocess.Popen([sys.executable, "-m", "bebop_jax.cli", *args, *mesh(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    return wait_all(procs, timeout)


def test_sample_data_splits_its_shards_and_generate_runs_on_process_0(tiny_dir, tmp_path):
    args = lambda d: ["sample-data", "--model", tiny_dir, "data.prompts=math", "data.num_prompts=6",  # noqa: E731
                      "data.heldout_prompts=2", "data.sample_batch=2", "data.max_new_tokens=6", f"data.dir={d}"]
    bebop(1, *args(tmp_path / "one"))
    bebop(2, *args(tmp_path / "two"))
    for split, shards in (("train", 3), ("heldout", 1)):
        one, two = sorted((tmp_path / "one" / split).glob("shard_*.npz")), sorted((tmp_path / "two" / split).glob("shard_*.npz"))
        assert [p.name for p in one] == [p.name for p in two] and len(one) == shards
        for a, b in zip(one, two):  # the same shards, each sampled once by one of the processes
            with np.load(a) as x, np.load(b) as y:
                assert all(np.array_equal(x[k], y[k]) for k in x.files)
    outs = bebop(2, "generate", "--model", tiny_dir, "--prompt", "say 7", "--max-new-tokens", "4")
    assert "### prompt: say 7" in outs[0] and "### prompt" not in outs[1]


def test_eval_acceptance_splits_its_rows_and_reports_like_one_process(tiny_dir, tmp_path):
    """Two processes each score every other batch of the held-out rows (3 rows, batch 1: one padded) and
    gather the scores: the report equals one process's, written once, by process 0."""
    import json

    import jax

    from bebop_jax.checkpoint import save_heads_file
    from bebop_jax.model import load_model
    from bebop_jax.model.mtp import MTPConfig, init_mtp_params

    bebop(1, "sample-data", "--model", tiny_dir, "data.prompts=math", "data.num_prompts=2", "data.heldout_prompts=3",
          "data.sample_batch=3", "data.max_new_tokens=8", f"data.dir={tmp_path / 'data'}")
    trunk, mtp = load_model(tiny_dir).cfg, MTPConfig(2, 1)
    save_heads_file(str(tmp_path / "heads.safetensors"), trunk, mtp, init_mtp_params(trunk, mtp, jax.random.key(0)),
                    None, "tiny")
    args = lambda out: ["eval-acceptance", "--model", tiny_dir, "--heads", str(tmp_path / "heads.safetensors"),  # noqa: E731
                        "--data-dir", str(tmp_path / "data"), "--out", str(out), "eval.batch_size=1"]
    one = bebop(1, *args(tmp_path / "one.json"))
    two = bebop(2, *args(tmp_path / "two.json"))
    assert "E[accepted length]" in two[0] and "E[accepted length]" not in two[1] and "wrote" in one[0]
    assert all(f"eval-acceptance (process {i}): 100%" in out and "| 2/2 " in out for i, out in enumerate(two))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_origins"] == b["num_origins"] and sum(a["num_origins"]) > 0
    for ra, rb in zip(a["results"], b["results"]):
        np.testing.assert_allclose(ra["alpha"] + [ra["expected_length"]], rb["alpha"] + [rb["expected_length"]],
                                   rtol=1e-6)


def test_bad_multi_process_setups_are_clear_errors_not_hangs(tiny_dir, tmp_path):
    env = cpu_env(1)
    port = free_port()
    # one process of a declared two: it gives up after mesh.join_timeout_s, naming what to check
    lonely = subprocess.run([sys.executable, "-m", "bebop_jax.cli", "generate", "--model", tiny_dir, "--prompt", "hi",
                             f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
                             "mesh.process_id=0", "mesh.join_timeout_s=5"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert lonely.returncode != 0
    assert f"process 0: joining 2 processes at 127.0.0.1:{port}; if not every process" in lonely.stderr
    assert "within 5s (mesh.join_timeout_s), this process stops" in lonely.stderr
    # a mesh that the global devices cannot hold (fsdp=2 x tensor=2 over 2 x 1 devices), then run directories
    # that the processes do not share: every process stops with the reason
    for devices, run_dirs, message in ((1, ("same", "same"), "2 devices are not a multiple of 4"),
                                       (2, ("own0", "own1"), "config key 'rl.run_dir'")):
        env = cpu_env(devices)
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_rl_worker", str(i), "2", port, tiny_dir,
                                   str(tmp_path / run_dirs[i]), "sync", "1"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode != 0 and message in out
