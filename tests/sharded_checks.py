"""The 8-device half of tests/test_sharding.py, run in a subprocess whose environment sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported.

`python -m tests.sharded_checks OUT_JSON CKPT_DIR` runs every check once (compiles dominate, so they
share one process) and writes the numbers; the tests assert on them.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bebop_jax import sharding
from bebop_jax.config import MeshConfig
from bebop_jax.generate import generate
from bebop_jax.model.transformer import Transformer, init_params
from tests.tiny_training import CFG, SEQ, abstract_state, init_state, new_state, sharded_step, tokens, train_step

MESHES = {"data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
          "data2_tensor4": MeshConfig(data=2, fsdp=1, tensor=4)}  # 2 KV heads on tensor=4: replicated
GENERATE_MESH = "data2_fsdp2_tensor2"  # greedy generation is compared on this mesh only (compile time)
BATCH = 8
STEPS = 3
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]


def forward(params, batch):
    """Logits [B, T, V] of a full causal forward over batch [B, T]."""
    model = Transformer(CFG)
    positions = jnp.broadcast_to(jnp.arange(batch.shape[1], dtype=jnp.int32), batch.shape)
    hidden, _ = model.apply({"params": params}, batch, positions)
    return model.apply({"params": params}, hidden, method=Transformer.logits)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def layer_specs(tree) -> dict:
    """PartitionSpecs (as strings) of a few parameters of layer 0 and the embedding."""
    layer = tree["layers_0"]
    picked = {"embedding": tree["embedding"], "wq": layer["attn"]["wq"], "wk": layer["attn"]["wk"],
              "gate": layer["mlp"]["gate"]}
    return {k: str(v.sharding.spec) for k, v in picked.items()}


def check_forward_and_generate(params, results):
    batch = tokens(BATCH, seed=10)
    ref = jax.jit(forward)(params, batch)
    ref_tokens, ref_counts = generate(params, CFG, PROMPTS, jax.random.key(0), max_new_tokens=8)
    for name, mesh_cfg in MESHES.items():
        mesh = sharding.make_mesh(mesh_cfg)
        rules = sharding.make_rules(mesh, mesh_cfg.rules, sharding.trunk_dims(CFG))
        sharded = sharding.shard_params(params, CFG, mesh, rules)
        fwd = sharding.sharded_jit(forward, mesh, rules,
                                   in_shardings=(sharding.param_shardings(CFG, mesh, rules),
                                                 sharding.batch_sharding(batch.shape, mesh, rules)),
                                   out_shardings=None)
        results[name] = {"forward_max_diff": max_diff(fwd(sharded, batch), ref), "param_specs": layer_specs(sharded)}
        if name == GENERATE_MESH:
            with sharding.use_mesh(mesh, rules):
                out_tokens, out_counts = generate(sharded, CFG, PROMPTS, jax.random.key(0), max_new_tokens=8)
            results[name]["generate_equal"] = bool(np.array_equal(out_tokens, ref_tokens)
                                                   and np.array_equal(out_counts, ref_counts))


def check_training_and_checkpoint(params, ckpt_dir, results):
    ref_state, ref_losses, step = new_state(params), [], jax.jit(train_step)
    for i in range(STEPS):
        ref_state, loss = step(ref_state, tokens(BATCH, seed=i))
        ref_losses.append(float(loss))

    mesh_cfg = MESHES["data2_fsdp2_tensor2"]
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.make_rules(mesh, mesh_cfg.rules, sharding.trunk_dims(CFG))
    state, losses, sstep = init_state(mesh, rules), [], sharded_step(mesh, rules, BATCH)
    for i in range(STEPS):
        state, loss = sstep(state, tokens(BATCH, seed=i))
        losses.append(float(loss))
    batch_abstract = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=sharding.batch_sharding((BATCH, SEQ), mesh, rules))
    lowered = sstep.lower(sharding.sharded_abstract(abstract_state(), mesh, rules), batch_abstract)
    results["train"] = {
        "ref_losses": ref_losses, "losses": losses, "params_max_diff": max_diff(state, ref_state),
        "param_specs_after": layer_specs(state["params"]),
        "mu_spec": str(state["opt"][0].mu["layers_0"]["attn"]["wq"].sharding.spec),
        "lowered_donation": [all(a.donated for a in jax.tree.leaves(arg)) for arg in lowered.args_info[0]],
    }

    saved = jax.tree.map(np.asarray, state)
    with ocp.CheckpointManager(ckpt_dir) as manager:
        manager.save(STEPS, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    targets = {"data8": sharding.make_mesh(MeshConfig(data=8)),
               "one_device": sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])}
    for name, target_mesh in targets.items():
        target_rules = sharding.make_rules(target_mesh, (), sharding.trunk_dims(CFG))
        target = sharding.sharded_abstract(abstract_state(), target_mesh, target_rules)
        with ocp.CheckpointManager(ckpt_dir) as manager:
            restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        results[f"restore_{name}"] = {
            "max_diff": max_diff(restored, saved),
            "shardings_match": all(r.sharding == t.sharding for r, t in
                                   zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
            "num_devices": len(restored["params"]["embedding"].sharding.device_set),
        }


def main(out_path: str, ckpt_dir: str) -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 CPU devices (XLA_FLAGS), got {jax.device_count()}")
    params = init_params(CFG, jax.random.key(0))
    results: dict = {}
    check_forward_and_generate(params, results)
    check_training_and_checkpoint(params, ckpt_dir, results)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
