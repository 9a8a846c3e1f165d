"""Several processes through jax.distributed: 2 local processes x 2 CPU devices train like one device.

`tests/multihost_worker.py` runs in 2 processes on 127.0.0.1 (a (data=2, fsdp=2) mesh over 4 devices),
each reading its own rows through grain; process 1 sends itself SIGTERM after step 3 and both stop
there and write one orbax checkpoint. This process (1 device) replays the same global batches
unsharded. Tolerances (absolute, float32): losses 1e-5, restored parameters 1e-4 (see test_sharding).

`tests/multihost_pretrain_worker.py` runs `bebop pretrain-mtp` itself in 2 processes (an (fsdp=2,
tensor=2) mesh): interrupted, resumed and uncached runs, against `pretrain_mtp.train` on one device
here. A global batch holds the one-device batch's rows in another order, the sharded reductions add
in another order and the workers compile at LLVM -O0 (for time), so losses agree to 1e-5 (absolute;
measured 8e-7; the uncached run to 1e-4 relative, as on one device in tests/test_pretrain_mtp.py)
and the heads after 4 AdamW steps at learning rate 1e-2 to 1e-3 (measured: 2e-4 on one element,
below 1e-5 on 99.9% of them: Adam's m / sqrt(v) turns rounding into steps of up to the learning
rate where a gradient is near zero), with the heads moving by more than 10x that; a resumed run
repeats the interrupted one's step bit for bit.
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

from bebop_jax import data as data_lib
from bebop_jax import distributed, pretrain_mtp, sharding
from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.config import MeshConfig, load_config
from bebop_jax.model import LoadedModel, export_hf
from bebop_jax.model.transformer import init_params
from tests.fake_devices import cpu_env
from tests import multihost_pretrain_worker as pretrain_worker
from tests import multihost_worker as worker
from tests.tiny_training import CFG, abstract_state, new_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir, module: str = "tests.multihost_worker") -> list[dict]:
    """Runs `module` in NUM_PROCESSES processes of 2 CPU devices; returns their {out_dir}/process{i}.json."""
    env = cpu_env(2)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", module, str(i), str(NUM_PROCESSES), port, str(out_dir)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(NUM_PROCESSES)]
    return collect(procs, out_dir)


def collect(procs: list[subprocess.Popen], out_dir, timeout: float = 300) -> list[dict]:
    """Waits for the worker processes (`wait_all`) and returns their {out_dir}/process{i}.json."""
    wait_all(procs, timeout)
    return [json.loads((out_dir / f"process{i}.json").read_text()) for i in range(len(procs))]


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Waits for the processes (killing stragglers), checks that each exited 0; returns their outputs."""
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    return logs


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


def write_tiny_run_inputs(base) -> None:
    """A random trunk (peaked next-token distributions) as an HF directory {base}/model, and 32 random
    sequences of 12-16 tokens, the first 3-6 of them prompt, as a token shard in {base}/data/train."""
    params = jax.jit(init_params, static_argnums=0)(pretrain_worker.CFG, jax.random.key(0))  # one compile
    params["embedding"] = params["embedding"] * 30.0
    model = LoadedModel(pretrain_worker.CFG, params, None, "tiny")
    export_hf(model, str(base / "model"))
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, model.cfg.vocab_size, rng.integers(12, 17)).astype(np.int32) for _ in range(32)]
    os.makedirs(base / "data/train")
    data_lib.write_shard(str(base / "data/train/shard_00000.npz"),
                         data_lib.Sequences(tokens, rng.integers(3, 7, len(tokens)).astype(np.int32)))


def test_pretrain_mtp_on_two_processes_matches_one_device(tmp_path):
    write_tiny_run_inputs(tmp_path)
    first, second = run_workers(tmp_path, "tests.multihost_pretrain_worker")
    for cache in ("trunk", "logz"):  # each process computed half of the hidden states and of the log-normalisers
        assert first["cache_calls"][cache] == second["cache_calls"][cache] > 0, cache
    assert {k: v for k, v in first.items() if k != "cache_calls"} == \
           {k: v for k, v in second.items() if k != "cache_calls"}  # every process saw the same losses
    assert sorted(name.split("_")[0] for name in os.listdir(tmp_path / "cache")) == ["hidden", "logz"]  # no .tmp

    ref_keys = [*pretrain_worker.overrides(str(tmp_path), "ref", "ref_cache"), "pretrain.checkpoint_every=4"]
    cfg = load_config(None, ref_keys)
    ref = [h["loss"] for h in pretrain_mtp.train(cfg, progress=False)["history"]]
    interrupted, resumed = first["interrupted"], first["resumed"]
    assert [s for s, _ in interrupted] == [1, 2, 3] and first["resumed_from"] == 2
    assert [s for s, _ in resumed] == [3, 4] and resumed[0][1] == interrupted[2][1]  # resumed bit for bit
    assert [loss for _, loss in interrupted + resumed[1:]] == pytest.approx(ref, abs=1e-5)
    assert [loss for _, loss in first["uncached"]] == pytest.approx(ref, rel=1e-4)

    got, want = load_mtp_heads(str(tmp_path / "run")), load_mtp_heads(str(tmp_path / "ref"))  # 2-process checkpoint
    np.testing.assert_array_equal(got.draft_ids, want.draft_ids)
    fc_init = np.concatenate([np.eye(32), np.eye(32)], axis=1)  # pretrain.init=trunk: fc = [I, I]
    assert np.max(np.abs(want.params["layers_0"]["fc"] - fc_init)) > 10 * 1e-3  # the heads moved: a real test
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_preemption_guard_in_one_process():
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_tpu_chips_are_found_by_their_device_files_not_by_libtpu(tmp_path):
    assert not distributed.tpu_chips_present(str(tmp_path))
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()  # the control node alone: no chip
    assert not distributed.tpu_chips_present(str(tmp_path))
    (tmp_path / "vfio" / "0").touch()
    assert distributed.tpu_chips_present(str(tmp_path))
    (tmp_path / "accel0").touch()
    assert distributed.tpu_chips_present(str(tmp_path))


def test_one_process_without_config_stays_single():
    distributed.initialize(MeshConfig())  # no coordinator keys, no TPU chips here (libtpu may be): nothing to start
    assert jax.process_count() == 1 and not distributed.tpu_chips_present()
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert distributed.data_shard(8, mesh, sharding.make_rules(mesh)) == (0, 1)
