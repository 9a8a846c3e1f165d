"""One process of tests/test_multihost.py: `python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR`.

Each process has 2 CPU devices (XLA_FLAGS, set by the test); together they form a (data=2, fsdp=2)
mesh. Every process reads its own rows of each global batch through grain, trains the tiny trunk,
and, once SIGTERM has reached process 1 (sent by itself after step `SIGTERM_AFTER`), all processes
stop at the same step and write one orbax checkpoint together. Each writes its losses as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp

from bebop_jax import distributed, sharding
from bebop_jax.config import MeshConfig
from tests.tiny_training import CFG, init_state, sharded_step, tokens

GLOBAL_BATCH = 8
NUM_RECORDS = 64
MAX_STEPS = 6
SIGTERM_AFTER = 3  # process 1 signals itself after this many steps; every process stops there


def records() -> np.ndarray:
    """The whole dataset: NUM_RECORDS token rows [NUM_RECORDS, SEQ]."""
    return tokens(NUM_RECORDS, seed=5)


import time; T0 = time.perf_counter()
def lap(m): print(m, round(time.perf_counter() - T0, 1), flush=True)
def main(process_id, num_processes, port, out_dir):
    lap("imported")
    mesh_cfg = MeshConfig(data=2, fsdp=2, coordinator_address=f"127.0.0.1:{port}",
                          num_processes=int(num_processes), process_id=int(process_id))
    distributed.initialize(mesh_cfg)
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.make_rules(mesh, mesh_cfg.rules, sharding.trunk_dims(CFG))
    lap("init"); state, step = init_state(mesh, rules), sharded_step(mesh, rules, GLOBAL_BATCH)
    batches = iter(distributed.process_batches(grain.MapDataset.source(records()), GLOBAL_BATCH, mesh, rules)
                   .to_iter_dataset())
    lap("state"); losses = []
    with distributed.PreemptionGuard() as guard:
        for i in range(MAX_STEPS):
            state, loss = step(state, distributed.to_global(next(batches), GLOBAL_BATCH, mesh, rules))
            losses.append(float(loss))
            if mesh_cfg.process_id == 1 and i + 1 == SIGTERM_AFTER:
                os.kill(os.getpid(), signal.SIGTERM)
            if guard.should_stop():
                break
    lap("trained"); print(losses)
    with ocp.CheckpointManager(os.path.join(out_dir, "ckpt")) as manager:
        manager.save(len(losses), args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    lap("saved"); result = {"losses": losses, "data_shard": distributed.data_shard(GLOBAL_BATCH, mesh, rules),
              "signal": guard.received, "devices": [d.id for d in mesh.devices.flat]}
    with open(os.path.join(out_dir, f"process{process_id}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
