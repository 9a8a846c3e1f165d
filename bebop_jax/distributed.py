"""Several processes, one program: `jax.distributed` setup, per-process data, and preemption.

Every process (one per TPU VM worker, or several local ones in tests) runs the same script:

    initialize(cfg.mesh)                              # before any other JAX call
    mesh = sharding.make_mesh(cfg.mesh)               # all devices of all processes
    for local in process_batches(dataset, global_batch_size, mesh, rules).to_iter_dataset():
        batch = to_global(local, global_batch_size, mesh, rules)  # jax.Arrays over the mesh
        ...

Each process reads only the rows of the global batch that its own devices hold; processes holding
the same rows (replicas along the batch, e.g. a tensor axis that spans hosts) read the same records.
Checkpoints are written by every process through orbax (each its own shards) into one directory,
which on a pod is a bucket (`gs://...`). `PreemptionGuard` turns SIGTERM into a flag that all
processes agree on, so that they save the same step and exit.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bebop_jax.config import MeshConfig
from bebop_jax.sharding import Rules, batch_sharding


def tpu_chips_present(dev: str = "/dev") -> bool:
    """True where this host has TPU chips (their device files, as libtpu finds them: /dev/accel* on v4 and
    v5e, /dev/vfio/<n> on v5p and v6e). Not whether libtpu is installed: a CPU host compiling for TPU
    (`bebop plan --accelerator`, CI) has the package and no chips. Read before JAX starts a backend."""
    return bool(glob.glob(os.path.join(dev, "accel*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")))


def initialize(mesh_cfg: MeshConfig) -> None:
    """Starts `jax.distributed` from `mesh.coordinator_address/num_processes/process_id`, or, where
    those are unset and this host has TPU chips, from the TPU environment; otherwise (one
    process on CPU or GPU) does nothing. Call it before any other JAX call; calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        return
    if mesh_cfg.num_processes is not None:
        # A process that never joins makes the JAX client end this process (a fatal log, no exception to
        # catch) after the timeout: say first what is awaited, so the reason leads the log.
        print(f"process {mesh_cfg.process_id}: joining {mesh_cfg.num_processes} processes at "
              f"{mesh_cfg.coordinator_address}; if not every process (the same mesh.num_processes and "
              f"coordinator_address, a distinct mesh.process_id) joins within {mesh_cfg.join_timeout_s}s "
              "(mesh.join_timeout_s), this process stops", file=sys.stderr, flush=True)
        jax.distributed.initialize(coordinator_address=mesh_cfg.coordinator_address,
                                   num_processes=mesh_cfg.num_processes, process_id=mesh_cfg.process_id,
                                   initialization_timeout=mesh_cfg.join_timeout_s)
    elif tpu_chips_present():
        jax.distributed.initialize()


def data_shard(global_batch: int, mesh: Mesh, rules: Rules) -> tuple[int, int]:
    """(index, count): this process supplies data shard `index` of `count` to each global batch.

    Shards are the distinct sets of batch rows that processes hold, in row order; processes that hold
    the same rows share a shard. Raises if the batch sharding gives processes overlapping row sets.
    """
    sharding = batch_sharding((global_batch,), mesh, rules)
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
    shards = sorted({tuple(sorted(r)) for r in rows.values()})
    covered = [row for shard in shards for row in shard]
    if len(covered) != len(set(covered)):
        raise ValueError(f"the batch sharding {sharding.spec} gives processes overlapping but unequal rows "
                         f"of a batch of {global_batch}; change mesh.rules for activation_batch")
    return shards.index(tuple(sorted(rows[jax.process_index()]))), len(shards)


def process_batches(dataset: grain.MapDataset, global_batch: int, mesh: Mesh, rules: Rules) -> grain.MapDataset:
    """This process's share of `dataset`, batched: every `count`-th record from `index` (`data_shard`),
    global_batch / count records per batch. Batch s of all shards together is global batch s."""
    index, count = data_shard(global_batch, mesh, rules)
    if global_batch % count:
        raise ValueError(f"a global batch of {global_batch} does not split over {count} data shards")
    return dataset[index::count].batch(global_batch // count, drop_remainder=True)


def to_global(local_batch: Any, global_batch: int, mesh: Mesh, rules: Rules) -> Any:
    """A pytree of this process's rows [global_batch / count, ...] (`process_batches`) -> global arrays
    [global_batch, ...] sharded over the batch axes; local rows fill this process's rows in order."""
    index, count = data_shard(global_batch, mesh, rules)

    def one(x):
        x = np.asarray(x)
        if x.shape[0] * count != global_batch:
            raise ValueError(f"data shard {index} of {count} should hold {global_batch // count} rows of the global "
                             f"batch of {global_batch}, got an array of shape {x.shape}")
        shape = (global_batch,) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(shape, mesh, rules), x, shape)

    return jax.tree.map(one, local_batch)


def barrier(name: str, timeout_s: float = 900.0) -> None:
    """Waits until every process reaches `barrier(name)`; a no-op on one process. A process that never
    arrives (it failed, or runs other code) is an error after `timeout_s` on every waiting process,
    never a hang; the coordination service's message names the missing tasks."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    try:
        jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
    except Exception as e:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED, or a peer's failure)
        raise RuntimeError(f"process {jax.process_index()} of {jax.process_count()}: not every process reached "
                           f"'{name}' within {timeout_s:.0f}s ({str(e).splitlines()[0]})") from None


def processes_seeing(path: str, key: str) -> list[bool]:
    """For each process, whether it sees the files process 0 writes in directory `path` (config key `key`):
    process 0 writes a marker there, the others look for it. Every process must call it."""
    if jax.process_count() == 1:
        return [True]
    marker = os.path.join(path, f".shared-{jax.process_count()}")
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        with open(marker, "w") as f:
            f.write("written by process 0\n")
    barrier(f"shared {key}")  # named by the key: the paths may differ, which is what this checks
    seen = multihost_utils.process_allgather(np.array(os.path.isfile(marker)))  # after every process looked
    if jax.process_index() == 0:
        os.remove(marker)
    return [bool(x) for x in np.asarray(seen).reshape(-1)]


def check_shared_dir(path: str, key: str) -> None:
    """Raises on every process unless `path` (config key `key`) is one directory that all processes see
    (a bucket on a pod)."""
    everyone = processes_seeing(path, key)
    if not all(everyone):
        missing = [i for i, ok in enumerate(everyone) if not ok]
        raise ValueError(f"config key '{key}': '{path}' is not shared by the processes (processes {missing} do not "
                         "see process 0's files); give every process the same directory, e.g. a gs:// bucket")


def lead_only(name: str, fn, timeout_s: float = 3600.0):
    """Runs `fn()` on process 0 while the others wait (a stage whose output is one set of files:
    generate, export, analyze); returns its result on process 0, None elsewhere. When
    it fails there, the others fail too, with its message."""
    if jax.process_count() == 1:
        return fn()
    from jax._src import distributed as jax_distributed

    client, key = jax_distributed.global_state.client, f"bebop/{name}/error"
    if jax.process_index() == 0:
        error = ""
        try:
            return fn()
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            client.key_value_set(key, error)
            barrier(f"{name} done", timeout_s)
    barrier(f"{name} done", timeout_s)
    error = client.blocking_key_value_get(key, 60_000)
    if error:
        raise RuntimeError(f"process 0 failed in {name}: {error}")
    return None


class Preempted(Exception):
    """A run stopped by SIGTERM after checkpointing `step`; running the same command again resumes it."""

    exit_code = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended

    def __init__(self, step: int):
        super().__init__(f"signal received: checkpoint saved at step {step}; run the same command again to resume")
        self.step = step


class PreemptionGuard:
    """Turns SIGTERM (a TPU VM's preemption or maintenance notice) into a flag that loops poll.

        with PreemptionGuard() as guard:
            for step in range(start, num_steps):
                state = train_step(state, next(batches))
                if guard.should_stop():   # every process, at the same steps
                    save(step, state)
                    break

    `should_stop` is a collective across processes (a one-byte all-gather), so all of them stop at
    the same step even if the signal reached only some. Enter it on the main thread.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal caught, on this process
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered on the main thread: Python runs signal handlers there")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True once any process has caught one of the signals."""
        caught = np.array(self.received is not None)
        if jax.process_count() == 1:
            return bool(caught)
        return bool(np.any(multihost_utils.process_allgather(caught)))
