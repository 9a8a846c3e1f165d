"""The Pallas kernels under a mesh partition (shard_map, vocabulary split or whole) on 8 fake CPU devices
equal the jnp references: values and gradients of fused_acceptance to 1e-5 (f32; only the order of the
shards' sums differs), with and without a target log-normaliser; rejection sampling token for token."""

import pytest

from tests.fake_devices import run_checks


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks("tests.kernel_partition_checks", tmp_path_factory.mktemp("kp") / "out.json")


@pytest.mark.parametrize("layout", ["vocab_split", "vocab_whole"])
def test_fused_acceptance_sharded_equals_reference(results, layout):
    for name, diff in results[layout]["acceptance"].items():
        assert diff <= 1e-5, (name, diff)


@pytest.mark.parametrize("layout", ["vocab_split", "vocab_whole"])
def test_rejection_sample_sharded_emits_the_reference_tokens(results, layout):
    assert results[layout]["rejection"] == {"rejection": True, "greedy_draft": True, "block": True}
