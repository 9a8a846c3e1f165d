"""Several processes through jax.distributed: 2 local processes x 2 CPU devices train like one device.

`tests/multihost_worker.py` runs in 2 processes on 127.0.0.1 (a (data=2, fsdp=2) mesh over 4 devices),
each reading its own rows through grain; process 1 sends itself SIGTERM after step 3 and both stop
there and write one orbax checkpoint. This process (1 device) replays the same global batches
unsharded. Tolerances (absolute, float32): losses 1e-5, restored parameters 1e-4 (see test_sharding).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bebop_jax import distributed, sharding
from bebop_jax.config import MeshConfig
from bebop_jax.model.transformer import init_params
from tests import multihost_worker as worker
from tests.tiny_training import CFG, abstract_state, new_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(NUM_PROCESSES), port,
                               str(out_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(NUM_PROCESSES)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    return [json.loads((out_dir / f"process{i}.json").read_text()) for i in range(NUM_PROCESSES)]


def global_batches(num_steps: int) -> list[np.ndarray]:
    """The global batches the processes assemble: shard p's rows (records p, p+2, ...) at rows [4p, 4p+4)."""
    records, rows = worker.records(), worker.GLOBAL_BATCH // NUM_PROCESSES
    shards = [records[p::NUM_PROCESSES] for p in range(NUM_PROCESSES)]
    return [np.concatenate([s[i * rows:(i + 1) * rows] for s in shards]) for i in range(num_steps)]


def test_two_processes_train_save_and_stop_like_one(tmp_path):
    results = run_workers(tmp_path)
    assert [r["data_shard"] for r in results] == [[0, 2], [1, 2]]
    assert [r["signal"] for r in results] == [None, signal.SIGTERM]  # only process 1 was signalled
    losses = results[0]["losses"]
    assert len(losses) == worker.SIGTERM_AFTER and results[1]["losses"] == losses  # both stopped there

    state, ref_losses, step = new_state(init_params(CFG, jax.random.key(0))), [], jax.jit(train_step)
    for batch in global_batches(len(losses)):
        state, loss = step(state, batch)
        ref_losses.append(float(loss))
    assert losses == pytest.approx(ref_losses, abs=1e-5)

    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    target = sharding.sharded_abstract(abstract_state(), mesh, sharding.make_rules(mesh))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == len(losses)
        restored = manager.restore(len(losses), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    restored = restored["state"]
    assert int(restored["step"]) == len(losses)
    for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_preemption_guard_in_one_process():
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_one_process_without_config_stays_single():
    distributed.initialize(MeshConfig())  # no coordinator keys, no libtpu here: nothing to start
    assert jax.process_count() == 1 and not distributed.tpu_runtime_installed()
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert distributed.data_shard(8, mesh, sharding.make_rules(mesh)) == (0, 1)
