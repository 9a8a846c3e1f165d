"""The 8-device half of tests/test_rl_split.py: RL's actor and learner on disjoint sub-meshes
(`rl.actor_devices`), in a subprocess whose environment sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported.

`python -m tests.rl_split_checks OUT_JSON` runs every check once (compiles dominate, so they share one
process) and writes what the tests assert on: the device split and its errors, where published weights
live, and short sync and async RL runs on the split meshes beside the same run on one device.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import numpy as np

from bebop_jax import sharding
from bebop_jax.checkpoint import RunCheckpoints
from bebop_jax.config import MeshConfig, load_config
from bebop_jax.model import load_model
from bebop_jax.rl.learner import LearnerSettings
from bebop_jax.rl.loop import train_rl
from bebop_jax.rl.records import read_history
from bebop_jax.rl.weights import learner_shardings, place_learner, publish
from tests.rl_tiny import DigitsEnv, make_tiny_chat_model

MESH = MeshConfig(fsdp=2, tensor=2)  # learner on 4 devices: data=1 x fsdp=2 x tensor=2; actor: data=2 x tensor=2
SETTINGS = LearnerSettings()


def ids(devices) -> list[int]:
    return sorted(d.id for d in devices)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_split(results: dict) -> None:
    devices = jax.devices()
    splits = {}
    for fraction in (0.125, 0.25, 0.5, 0.75, 0.875):
        learner, actor = sharding.split_devices(devices, fraction)
        splits[str(fraction)] = {"learner": ids(learner), "actor": ids(actor)}
    learner_mesh, actor_mesh = sharding.rl_meshes(MESH, 0.5)
    shared = sharding.rl_meshes(MESH, 0.0)
    one = sharding.rl_meshes(MeshConfig(), 0.5, devices[:1])
    errors = {}
    bad = {"actor_none": (MeshConfig(), 0.05), "learner_none": (MeshConfig(), 0.95), "learner_mesh": (MESH, 0.75),
           "actor_mesh": (MeshConfig(tensor=3), 0.25)}  # 6 learner devices hold 2 x 3; 2 actor devices cannot
    for name, (mesh_cfg, fraction) in bad.items():
        try:
            sharding.rl_meshes(mesh_cfg, fraction)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    results["split"] = {
        "fractions": splits, "errors": errors,
        "learner_shape": dict(learner_mesh.shape), "learner_ids": ids(learner_mesh.devices.flat),
        "actor_shape": dict(actor_mesh.shape), "actor_ids": ids(actor_mesh.devices.flat),
        "shared_devices_decode_layout": (sorted(ids(shared[0].devices.flat)) == sorted(ids(shared[1].devices.flat))
                                         and dict(shared[1].shape) == {"data": 4, "fsdp": 1, "tensor": 2}),
        "one_device_is_one_mesh": one[0] is one[1] and ids(one[0].devices.flat) == [devices[0].id]}


def check_publish(model_cfg, params, results: dict) -> None:
    """Publishing: the actor's copy lives on the actor's devices only, equals the learner's parameters, and
    outlives the learner step's donation of them (on split meshes and where the mesh is shared)."""
    donate = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)  # as the learner step donates
    for name, (mesh_cfg, fraction, devices) in {"split": (MESH, 0.5, None),
                                                "shared": (MeshConfig(), 0.0, jax.devices()[:1])}.items():
        learner_mesh, actor_mesh = sharding.rl_meshes(mesh_cfg, fraction, devices)
        dims = sharding.trunk_dims(model_cfg)
        learner_rules = sharding.make_rules(learner_mesh, mesh_cfg.rules, dims)
        actor_rules = sharding.make_rules(actor_mesh, mesh_cfg.rules, dims)
        state_sh = learner_shardings(model_cfg, SETTINGS, learner_mesh, learner_rules)
        state = place_learner(jax.device_put(params, state_sh.params), SETTINGS, state_sh)
        on_learner = state.params
        on_actor = publish(on_learner, sharding.param_shardings(model_cfg, actor_mesh, actor_rules))
        equal = max_diff(on_actor, params)
        donate(state)
        results["publish_" + name] = {
            "actor_devices": sorted({d.id for x in jax.tree.leaves(on_actor) for d in x.sharding.device_set}),
            "learner_devices": sorted({d.id for x in jax.tree.leaves(on_learner) for d in x.sharding.device_set}),
            "learner_donated": all(x.is_deleted() for x in jax.tree.leaves(on_learner)),
            "max_diff": equal, "max_diff_after_donation": max_diff(on_actor, params),
            "embedding_spec_learner": str(on_learner["embedding"].sharding.spec),
            "embedding_spec_actor": str(on_actor["embedding"].sharding.spec)}


def check_runs(tiny_dir: str, initial_params, work: str, results: dict) -> None:
    """Two steps (staleness 0) on one device (sync), then on the split meshes, sync and async."""
    def run(name, overrides, devices=None):
        run_dir = os.path.join(work, name)
        cfg = load_config(None, [f"model.source={tiny_dir}", f"rl.run_dir={run_dir}", "rl.prompts_per_step=2",
                                 "rl.group_size=4", "rl.max_new_tokens=12", "rl.max_prompt_tokens=16",
                                 "rl.learning_rate=1e-3", "rl.steps=2", "rl.max_staleness=0", *overrides])
        train_rl(cfg, env=DigitsEnv(), progress=False, devices=devices)
        ckpt = RunCheckpoints(run_dir)
        state, _ = ckpt.restore_raw(2)
        ckpt.close()
        return read_history(run_dir), state["learner"]["params"]

    split = ["rl.actor_devices=0.5", f"mesh.fsdp={MESH.fsdp}", f"mesh.tensor={MESH.tensor}"]
    one_history, one_params = run("one", ["rl.loop=sync"], jax.devices()[:1])
    results["one"] = {"history": one_history, "params_moved": max_diff(one_params, initial_params)}
    for name, overrides in {"split_sync": ["rl.loop=sync", *split], "split_async": ["rl.loop=async", *split]}.items():
        history, params = run(name, overrides)
        results[name] = {"history": history, "params_max_diff": max_diff(params, one_params)}


def main(out_path: str) -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 CPU devices (XLA_FLAGS), got {jax.device_count()}")
    results: dict = {}
    check_split(results)
    with tempfile.TemporaryDirectory() as work:
        tiny_dir = os.path.join(work, "tiny")
        make_tiny_chat_model(tiny_dir)
        model = load_model(tiny_dir)
        check_publish(model.cfg, model.params, results)
        check_runs(tiny_dir, model.params, work, results)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
