"""`sampling.categorical`: exact draws by a two-level inverse CDF (checked against the weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bebop_jax import sampling


@pytest.mark.parametrize("vocab,block", [(1000, 256), (517, 64), (49152, 256)])
def test_draws_follow_the_weights_and_never_hit_zeros(vocab, block):
    rng = np.random.default_rng(vocab)
    w = rng.gamma(0.3, size=vocab).astype(np.float32)
    w[rng.random(vocab) < 0.4] = 0.0  # whole stretches of zero weight, the padded tail included
    w[-3:] = 0.0
    w[:5] = 0.05 * w.sum()  # a few heavy tokens (~4% of the mass each) as in a peaked policy
    n = 40_000 if vocab <= 1000 else 4_000  # [n, V] weights: keep them under a GB
    draws = np.asarray(sampling.categorical(jax.random.key(0), jnp.broadcast_to(jnp.asarray(w), (n, vocab)),
                                            block=block))
    assert draws.dtype == np.int32 and draws.shape == (n,)
    assert np.all(w[draws] > 0), "drew a token of weight 0"
    p = w.astype(np.float64) / w.astype(np.float64).sum()
    heavy = p > 10 / n  # tokens expected often enough for a chi-square cell; the rest pooled
    observed = np.append(np.bincount(draws, minlength=vocab)[heavy], np.sum(~heavy[draws]))
    expected = n * np.append(p[heavy], p[~heavy].sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_leading_axes_and_independent_rows():
    w = jnp.ones((3, 4, 300))
    draws = sampling.categorical(jax.random.key(1), w)
    assert draws.shape == (3, 4)
    assert len(set(np.asarray(draws).ravel().tolist())) > 6  # rows draw with their own uniforms
    one_hot = jnp.zeros((2, 300)).at[0, 7].set(1.0).at[1, 299].set(2.0)
    assert np.asarray(sampling.categorical(jax.random.key(2), one_hot)).tolist() == [7, 299]


def test_draws_from_the_distribution_at_temperature_match_softmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=64).astype(np.float32) * 2)
    n, t = 30_000, 0.7
    probs = sampling.distribution(jnp.broadcast_to(logits, (n, 64)), t).probs
    draws = np.asarray(sampling.categorical(jax.random.key(3), probs))
    p = np.asarray(jax.nn.softmax(logits / t), np.float64)
    p /= p.sum()
    assert stats.chisquare(np.bincount(draws, minlength=64), n * p).pvalue > 1e-4


def test_recorded_logprobs_and_entropy_are_those_of_the_top_p_distribution():
    """With top_p < 1 the behaviour policy is the renormalised nucleus: its log-probs (the RL importance
    ratios' denominators) and entropy, not those of the full softmax."""
    logits = jnp.asarray([[3.0, 2.0, 1.0, -1.0, -2.0]])
    p = np.asarray(sampling.probs_from_logits(logits, 1.0, 0.8))[0]
    assert (p > 0).sum() == 2  # the nucleus: the two most likely tokens
    nucleus, full = sampling.distribution(logits, 1.0, top_p=0.8), sampling.distribution(logits, 1.0)
    logp = sampling.token_logprob(logits, jnp.asarray([1]), 1.0, nucleus.log_norm)
    np.testing.assert_allclose(float(logp[0]), np.log(p[1]), rtol=1e-6)
    np.testing.assert_allclose(float(nucleus.entropy[0]), -np.sum(p[p > 0] * np.log(p[p > 0])), rtol=1e-6)
    full_logp = sampling.token_logprob(logits, jnp.asarray([1]), 1.0, full.log_norm)
    assert float(logp[0]) > float(full_logp[0]) + 0.1  # renormalised: more likely than under the full softmax


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_distribution_statistics_equal_a_float64_log_softmax(temperature, top_p):
    """The one-pass probabilities, log-normaliser and entropy equal their float64 definitions (at T=0:
    one-hot probabilities, statistics at T=1); token log-probs follow from the log-normaliser."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 4, 700)) * 4).astype(np.float32)
    t = temperature or 1.0
    z = logits.astype(np.float64) / t
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:  # the nucleus: the most likely tokens whose mass before them is < top_p
        order = np.argsort(-p, axis=-1)
        before = np.cumsum(np.take_along_axis(p, order, -1), -1) - np.take_along_axis(p, order, -1)
        keep = np.zeros_like(p, bool)
        np.put_along_axis(keep, order, before < top_p, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    dist = sampling.distribution(jnp.asarray(logits), temperature, top_p)
    support = p > 0
    entropy = -np.sum(np.where(support, p * np.log(np.where(support, p, 1.0)), 0.0), -1)
    np.testing.assert_allclose(np.asarray(dist.entropy), entropy, atol=2e-5)
    want_probs = np.eye(700)[logits.argmax(-1)] if temperature == 0.0 else p
    np.testing.assert_allclose(np.asarray(dist.probs), want_probs, atol=1e-6)
    tokens = p.argmax(-1)  # in the support
    logp = np.asarray(sampling.token_logprob(jnp.asarray(logits), jnp.asarray(tokens), temperature, dist.log_norm))
    np.testing.assert_allclose(logp, np.log(np.take_along_axis(p, tokens[..., None], -1)[..., 0]), atol=2e-5)
