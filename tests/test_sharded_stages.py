"""Each stage's step on 8 fake CPU devices (data=2 x fsdp=2 x tensor=2) gives the numbers it gives on one.

The checks run once in a subprocess (`tests/sharded_stage_checks.py`; XLA_FLAGS must be set before jax
is imported) on a 1-layer Qwen3-style trunk with one MTP layer (K=2) initialised from it.
Tolerances (absolute, float32): losses 1e-5 (only the order of reductions differs); parameters after
one AdamW step 1e-4 (Adam divides by sqrt(v), which magnifies that rounding where gradients are
small), with the step moving them by far more than that; speculative generation at temperature 0
emits identical tokens. At temperature 1 the tokens are identical too: jax_threefry_partitionable
(the default since jax 0.5) draws the same random bits for an array whatever its sharding, and no
sampled token sits within rounding of a decision boundary on these seeds; behaviour log-probs agree
to 1e-5.
"""

import pytest

from tests.fake_devices import run_checks


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Results of tests/sharded_stage_checks.py, run on 8 fake CPU devices."""
    return run_checks("tests.sharded_stage_checks", tmp_path_factory.mktemp("stages") / "results.json")


def test_sharded_mtp_train_step_matches_one_device(stages):
    mtp = stages["mtp"]
    assert mtp["loss"] == pytest.approx(mtp["ref_loss"], abs=1e-5)
    assert mtp["alpha_max_diff"] < 1e-5
    assert mtp["params_max_diff"] < 1e-4 < 100 * 1e-4 < mtp["params_moved"]
    assert mtp["wq_spec"] == "P('tensor', None, 'fsdp')" and mtp["fc_spec"] == "P('fsdp', None)"
    assert "P('fsdp', 'tensor')" in mtp["mu_specs"]  # the AdamW moments stay sharded like the heads


@pytest.mark.parametrize("temperature", ["t0", "t1"])
def test_sharded_speculative_generation_matches_one_device(stages, temperature):
    spec = stages["speculative"]
    run = spec[temperature]
    assert "P('tensor', 'fsdp')" in spec["trunk_specs"]  # the embedding, sharded for real
    assert run["tokens"] == run["ref_tokens"] and run["num_tokens_equal"] and run["accepted_equal"]
    assert run["logprobs_max_diff"] < 1e-5
    assert run["accepted"] > 0  # drafts were accepted, so verification and the MTP refresh both ran
    if temperature == "t1":
        assert stages["threefry_partitionable"]


def test_sharded_generation_drops_finished_rows_and_keeps_every_sequence(stages):
    """8 prompts on the mesh: the batch goes on with 4 rows once half have ended, and every sequence equals
    the one-device run that keeps all rows."""
    run = stages["speculative"]["compacted"]
    assert len(set(run["num_tokens"])) > 2  # rows end at different lengths
    assert run["new_programs"] == 2  # decode at 8 and at 4 rows on the mesh
    assert run["tokens_equal"] and run["accepted_equal"]


def test_sharded_learner_step_matches_one_device(stages):
    learner = stages["learner"]
    assert learner["loss"] == pytest.approx(learner["ref_loss"], abs=1e-5)
    assert learner["grad_norm_diff"] < 1e-5
    assert learner["params_max_diff"] < 1e-4 < 10 * 1e-4 < learner["params_moved"]
    assert learner["embedding_spec"] == "P('tensor', 'fsdp')"
    assert learner["nu_wq_spec"] == "P('tensor', None, 'fsdp')"
