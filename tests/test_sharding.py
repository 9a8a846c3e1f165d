"""Mesh, rules and sharded jit: unit checks in this process (1 device), and parity on 8 fake CPU devices.

The 8-device checks run once in a subprocess (`tests/sharded_checks.py`; XLA_FLAGS must be set before
jax is imported) against the unsharded computation on one device. Tolerances (absolute, float32):
logits of a forward and losses of 3 training steps 1e-5 (only the order of reductions differs);
parameters after 3 AdamW steps 1e-4 (Adam divides by sqrt(v), which magnifies that rounding where
gradients are small); greedy tokens and checkpoint round trips exactly.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from bebop_jax import sharding
from bebop_jax.config import ConfigError, MeshConfig, load_config
from tests.fake_devices import cpu_env
from tests.tiny_training import CFG, abstract_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_222 = AbstractMesh((2, 2, 2), sharding.AXES)


def test_mesh_shape_takes_the_rest_and_names_bad_sizes():
    assert sharding.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="data=2 x fsdp=2 x tensor=1 needs 4 devices, but 8"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        sharding.mesh_shape(MeshConfig(tensor=3), 8)


def test_mesh_config_is_validated_with_key_names():
    cfg = load_config(None, ["mesh.fsdp=2", "mesh.rules=[[embed, null], [activation_batch, [data, fsdp]]]"])
    assert cfg.mesh.rules == (("embed", None), ("activation_batch", ("data", "fsdp")))
    for overrides, expected in [(["mesh.data=-1", "mesh.tensor=-1"], "at most one axis"),
                                (["mesh.rules=[[embed, model]]"], r"mesh.rules\[0\].*mesh axis .model."),
                                (["mesh.fsdp=0"], "mesh.fsdp"),
                                (["mesh.num_processes=2"], "mesh.coordinator_address, mesh.process_id missing"),
                                (["mesh.coordinator_address=h:1", "mesh.num_processes=2", "mesh.process_id=2"],
                                 "mesh.process_id")]:
        with pytest.raises(ConfigError, match=expected):
            load_config(None, overrides)


def test_rules_override_and_fit_model_sizes():
    rules = dict(sharding.make_rules(MESH_222, (("embed", None), ("mlp", ("fsdp", "tensor")))))
    assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor") and rules["q_heads"] == "tensor"
    # SmolLM2's 9 heads / 3 KV heads do not divide tensor=2: replicated, in parameters and caches alike
    smol = dict(vocab=49152, embed=576, q_heads=9, kv_heads=3, cache_kv_heads=3, mlp=1536)
    fitted = dict(sharding.make_rules(MESH_222, (), smol))
    assert fitted["kv_heads"] is None and fitted["cache_kv_heads"] is None and fitted["q_heads"] is None
    assert fitted["mlp"] == "tensor" and fitted["embed"] == "fsdp"
    with pytest.raises(ValueError, match="'embedding'.*logical axes: activation_batch"):
        sharding.make_rules(MESH_222, (("embedding", None),))


def test_partition_spec_keeps_the_longest_dividing_prefix():
    rules = sharding.make_rules(MESH_222)
    assert sharding.partition_spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), MESH_222, rules) == \
        PartitionSpec("fsdp", None, None)
    assert sharding.partition_spec(("activation_batch", None), (8, 5), MESH_222, rules) == \
        PartitionSpec(("data", "fsdp"), None)
    assert sharding.partition_spec(("activation_batch", None), (6, 5), MESH_222, rules) == PartitionSpec("data", None)
    assert sharding.partition_spec(("activation_batch",), (3,), MESH_222, rules) == PartitionSpec(None)
    with pytest.raises(ValueError, match=r"name 2 dimensions, but the array has shape \(4,\)"):
        sharding.partition_spec(("embed", "mlp"), (4,), MESH_222, rules)


def test_state_shardings_follow_the_parameter_boxes():
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    rules = sharding.make_rules(mesh, (), sharding.trunk_dims(CFG))
    state = sharding.logical_to_sharding(abstract_state(), mesh, rules)
    wq = ("layers_0", "attn", "wq")
    param = state["params"][wq[0]][wq[1]][wq[2]]
    adam = state["opt"][0]
    assert param.spec == PartitionSpec("tensor", None, "fsdp")
    assert adam.mu[wq[0]][wq[1]][wq[2]] == param and adam.nu[wq[0]][wq[1]][wq[2]] == param
    assert adam.count.spec == PartitionSpec() and state["step"].spec == PartitionSpec()
    restore = sharding.sharded_abstract(abstract_state(), mesh, rules)
    assert restore["params"]["embedding"].shape == (CFG.vocab_size, CFG.hidden_size)
    assert restore["params"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Results of tests/sharded_checks.py, run on 8 fake CPU devices."""
    tmp = tmp_path_factory.mktemp("sharded")
    out = tmp / "results.json"
    env = cpu_env(8)
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_checks", str(out), str(tmp / "ckpt")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["data2_fsdp2_tensor2", "data2_tensor4"])
def test_sharded_forward_matches_one_device(eight_devices, mesh):
    assert eight_devices[mesh]["forward_max_diff"] < 1e-5


def test_kv_heads_that_do_not_divide_tensor_are_replicated(eight_devices):
    assert eight_devices["data2_fsdp2_tensor2"]["param_specs"]["wk"] == "P('tensor', None, 'fsdp')"
    specs = eight_devices["data2_tensor4"]["param_specs"]  # 2 KV heads, tensor=4; 4 q heads
    assert specs["wk"] == "P(None, None, 'fsdp')" and specs["wq"] == "P('tensor', None, 'fsdp')"


def test_sharded_greedy_generation_matches_one_device(eight_devices):
    assert eight_devices["data2_fsdp2_tensor2"]["generate_equal"]


def test_sharded_training_matches_one_device(eight_devices):
    train = eight_devices["train"]
    assert train["losses"] == pytest.approx(train["ref_losses"], abs=1e-5)
    assert train["params_max_diff"] < 1e-4
    assert train["param_specs_after"]["gate"] == "P('tensor', 'fsdp')"  # the step keeps the state sharded
    assert train["mu_spec"] == "P('tensor', None, 'fsdp')"
    assert train["lowered_donation"] == [True, False]  # state donated, batch not


@pytest.mark.parametrize("target", ["data8", "one_device"])
def test_checkpoint_restores_onto_another_mesh(eight_devices, target):
    restored = eight_devices[f"restore_{target}"]
    assert restored["max_diff"] == 0.0 and restored["shardings_match"]
    assert restored["num_devices"] == {"data8": 8, "one_device": 1}[target]
