"""One process of the multi-process RL tests: `python -m tests.multihost_rl_worker PROCESS_ID NUM_PROCESSES PORT
TINY_DIR RUN_DIR LOOP STEPS [OVERRIDE ...]`.

Every process runs `train_rl` on the tiny chat model with the DigitsEnv over one mesh of all devices of all
processes (fsdp=2 x tensor=2 on 4 devices: 2 processes x 2, 4 x 1, or 1 x 4 as the reference). Process
`PROCESS_ID` writes `{RUN_DIR}/process{PROCESS_ID}.json`: the learner losses, the summary and a checksum of
the final parameters, as every process sees them, and how the trunk loaded (straight into its shards).
"""

from __future__ import annotations

import json
import os
import sys

from bebop_jax import distributed  # imported before jax.distributed starts: importing must not start JAX
from bebop_jax.config import load_config


def config(tiny_dir: str, run_dir: str, loop: str, steps: int, *mesh: str):
    return load_config(None, [f"model.source={tiny_dir}", f"rl.run_dir={run_dir}", "rl.prompts_per_step=2",
                              "rl.group_size=4", "rl.max_new_tokens=12", "rl.max_prompt_tokens=16",
                              "rl.learning_rate=1e-3", f"rl.steps={steps}", f"rl.loop={loop}", "rl.max_staleness=1",
                              "rl.checkpoint_every=2", "mesh.fsdp=2", "mesh.tensor=2", *mesh])


def main(process_id: str, num_processes: str, port: str, tiny_dir: str, run_dir: str, loop: str, steps: str,
         *overrides: str) -> None:
    mesh = [] if num_processes == "1" else [f"mesh.coordinator_address=127.0.0.1:{port}",
                                            f"mesh.num_processes={num_processes}", f"mesh.process_id={process_id}"]
    cfg = config(tiny_dir, run_dir, loop, int(steps), *mesh, *overrides)
    distributed.initialize(cfg.mesh)
    import jax

    from bebop_jax.rl.loop import train_rl
    from bebop_jax.rl.records import read_history
    from tests.rl_tiny import DigitsEnv

    from bebop_jax import sharding
    from bebop_jax.model import load_model

    from bebop_jax.model import weights

    mesh = sharding.make_mesh(cfg.mesh)
    opened, read_dir = [], weights.read_safetensors_dir
    weights.read_safetensors_dir = lambda path: opened.append(read_dir(path)) or opened[-1]
    model = load_model(tiny_dir, shardings=lambda c: sharding.param_shardings(
        c, mesh, sharding.make_rules(mesh, cfg.mesh.rules, sharding.trunk_dims(c))))
    weights.read_safetensors_dir = read_dir
    loading = {"sharded": [], "whole_on_one_device": 0, "bytes_read": opened[0].bytes_read,
               "bytes": sum(4 * x.size for x in jax.tree.leaves(model.params))}
    for x in jax.tree.leaves(model.params):
        shard = x.sharding.shard_shape(x.shape)
        held = {tuple(s.data.shape) for s in x.addressable_shards}
        loading["sharded"].append(shard != x.shape and held == {shard})
    big = {x.shape for x in jax.tree.leaves(model.params) if x.sharding.shard_shape(x.shape) != x.shape}
    loading["whole_on_one_device"] = sum(len(a.devices()) == 1 and a.shape in big for a in jax.live_arrays())
    summary = train_rl(cfg, model=model, env=DigitsEnv(), progress=False)
    history = read_history(run_dir)
    result = {"process": jax.process_index(), "devices": jax.device_count(), "summary": summary, "loading": loading,
              "losses": [h["loss"] for h in history], "rewards": [h["reward"] for h in history],
              "mtp_losses": [h.get("mtp_loss") for h in history]}
    with open(os.path.join(run_dir, f"process{process_id}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
