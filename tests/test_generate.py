"""Plain generation on tiny random models: greedy parity, ragged batches, EOS, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bebop_jax import generate as gen
from bebop_jax.model import load_model
from bebop_jax.model.transformer import Transformer
from bebop_jax.sampling import probs_from_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import _make_hf

    path = str(tmp_path_factory.mktemp("gen_llama"))
    _make_hf("llama", path)
    return load_model(path)


def _greedy_by_full_forward(model, prompt, n):
    """Greedy continuation recomputing the whole sequence without a cache at every step."""

    @jax.jit
    def next_token(seq, length):  # seq [1, W] right-padded
        m = Transformer(model.cfg)
        h, _ = m.apply({"params": model.params}, seq, jnp.arange(seq.shape[1])[None])
        return jnp.argmax(m.apply({"params": model.params}, h[0, length - 1], method=Transformer.logits))

    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        seq[0, t] = next_token(jnp.asarray(seq), t)
    return seq[0, len(prompt):].tolist()


def test_greedy_equals_full_forward_argmax_and_ragged_batch(tiny):
    prompts = [[5, 9, 3, 7, 1, 2, 8], [4, 4, 6], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    tokens, counts = gen.generate(tiny.params, tiny.cfg, prompts, jax.random.key(0), max_new_tokens=10)
    assert counts.tolist() == [10, 10, 10]
    for row, prompt in zip(tokens, prompts):
        assert row.tolist() == _greedy_by_full_forward(tiny, prompt, 10)


def test_eos_stops_each_sequence_and_pads(tiny):
    prompts = [[5, 9, 3, 7, 1, 2, 8], [4, 4, 6]]
    free, _ = gen.generate(tiny.params, tiny.cfg, prompts, jax.random.key(0), max_new_tokens=12)
    eos = int(free[0, 3])  # the first sequence's 4th greedy token becomes EOS
    tokens, counts = gen.generate(tiny.params, tiny.cfg, prompts, jax.random.key(0), max_new_tokens=12, eos_ids=(eos,))
    first_eos = list(free[0]).index(eos)
    assert counts[0] == first_eos + 1
    assert tokens[0, : first_eos + 1].tolist() == free[0, : first_eos + 1].tolist()
    assert (tokens[0, first_eos + 1:] == -1).all()
    n1 = list(free[1]).index(eos) + 1 if eos in free[1] else 12
    assert counts[1] == n1 and tokens[1, :n1].tolist() == free[1, :n1].tolist()


def test_first_token_distribution_at_temperature(tiny):
    """Sampled first tokens of 4000 copies of a prompt fit softmax(logits / T) (chi-square)."""
    prompt = [5, 9, 3, 7]
    temperature, n = 0.7, 4000
    tokens, _ = gen.generate(tiny.params, tiny.cfg, [prompt] * n, jax.random.key(1), max_new_tokens=1,
                             temperature=temperature)
    m = Transformer(tiny.cfg)
    h, _ = m.apply({"params": tiny.params}, jnp.asarray([prompt]), jnp.arange(4)[None])
    p = np.asarray(probs_from_logits(m.apply({"params": tiny.params}, h[0, -1], method=Transformer.logits), temperature),
                   np.float64)
    counts = np.bincount(tokens[:, 0], minlength=p.size)
    keep = p * n >= 5
    observed, expected = counts[keep], p[keep] * n
    if (~keep).any():
        observed, expected = np.append(observed, counts[~keep].sum()), np.append(expected, p[~keep].sum() * n)
    assert stats.chisquare(observed, expected / expected.sum() * n).pvalue > 1e-3


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    np.testing.assert_allclose(probs_from_logits(logits, 1.0, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs_from_logits(logits, 1.0, top_p=0.5), [1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs_from_logits(logits, 0.0), [1, 0, 0, 0])


def test_no_recompilation_across_prompts_and_temperatures(tiny):
    from bebop_jax import speculative

    gen.generate(tiny.params, tiny.cfg, [[1, 2, 3]], jax.random.key(0), max_new_tokens=5, temperature=1.0)
    before = speculative.decode._cache_size(), speculative.prefill._cache_size()
    gen.generate(tiny.params, tiny.cfg, [[7, 8, 9, 10, 11]], jax.random.key(3), max_new_tokens=5, temperature=0.5)
    assert (speculative.decode._cache_size(), speculative.prefill._cache_size()) == before


def test_bad_prompts_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(tiny.params, tiny.cfg, [[1], []], jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 has 120 tokens.*context holds 128"):
        gen.generate(tiny.params, tiny.cfg, [[1] * 120], jax.random.key(0), max_new_tokens=9)
