"""RL's actor and learner on disjoint sub-meshes of 8 fake CPU devices (`rl.actor_devices=0.5`).

The checks run once in a subprocess (`tests/rl_split_checks.py`; XLA_FLAGS must be set before jax is
imported) on the 2-layer tiny chat model of tests/rl_tiny.py. The learner's mesh is data=1 x fsdp=2 x
tensor=2 on devices 0-3, the actor's data=2 x tensor=2 on devices 4-7. Two sync steps and two async
steps (staleness 0) on the split meshes are compared with two sync steps on one device. Tolerances
(absolute, float32): the rollouts are identical (same rewards and lengths: jax_threefry_partitionable
draws the same bits whatever the sharding), losses 1e-5 and gradient norms 1e-5 (only the order of
reductions differs), parameters after two AdamW steps 1e-4, while the steps move them by more than 1e-3.
"""

import pytest

from tests.fake_devices import run_checks


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Results of tests/rl_split_checks.py, run on 8 fake CPU devices."""
    return run_checks("tests.rl_split_checks", tmp_path_factory.mktemp("rl_split") / "results.json")


def test_device_split_is_disjoint_and_covers_the_devices(checks):
    split = checks["split"]
    for fraction, part in split["fractions"].items():
        learner, actor = part["learner"], part["actor"]
        assert not set(learner) & set(actor) and sorted(learner + actor) == list(range(8))
        assert len(actor) == round(float(fraction) * 8) and 0 in learner
    assert split["learner_shape"] == {"data": 1, "fsdp": 2, "tensor": 2} and split["learner_ids"] == [0, 1, 2, 3]
    assert split["actor_shape"] == {"data": 2, "fsdp": 1, "tensor": 2} and split["actor_ids"] == [4, 5, 6, 7]
    assert split["shared_devices_decode_layout"] and split["one_device_is_one_mesh"]


@pytest.mark.parametrize("case, expected", [
    ("actor_none", "rl.actor_devices=0.05 gives the actor 0 of 8 devices"),
    ("learner_none", "rl.actor_devices=0.95 gives the actor 8 of 8 devices and the learner 0"),
    ("learner_mesh", "gives the learner 2 of 8 devices, which its mesh cannot use: mesh data=-1 x fsdp=2 x tensor=2"),
    ("actor_mesh", "gives the actor 2 of 8 devices, which its mesh cannot use: mesh data=-1 x fsdp=1 x tensor=3"),
])
def test_bad_fractions_raise_errors_naming_the_key_and_the_mesh(checks, case, expected):
    assert expected in checks["split"]["errors"][case]


@pytest.mark.parametrize("case", ["split", "shared"])
def test_published_weights_live_on_the_actor_devices_and_survive_the_learner_donation(checks, case):
    published = checks[f"publish_{case}"]
    if case == "split":
        assert published["actor_devices"] == [4, 5, 6, 7] and published["learner_devices"] == [0, 1, 2, 3]
        assert published["embedding_spec_learner"] == published["embedding_spec_actor"] == "P('tensor', 'fsdp')"
    else:
        assert published["actor_devices"] == published["learner_devices"] == [0]
    assert published["max_diff"] == 0.0  # the actor's copy equals the learner's parameters
    assert published["learner_donated"] and published["max_diff_after_donation"] == 0.0


@pytest.mark.parametrize("loop", ["split_sync", "split_async"])
def test_rl_on_split_meshes_matches_one_device(checks, loop):
    one, split = checks["one"], checks[loop]
    assert [h["step"] for h in split["history"]] == [1, 2]
    for a, b in zip(one["history"], split["history"]):
        assert a["reward"] == b["reward"] and a["response_length"] == b["response_length"] and a["reward"] > 0
        assert b["staleness"] == 0
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
    assert split["params_max_diff"] < 1e-4 < 10 * 1e-4 < one["params_moved"]
