"""Tests of kernels_pallas/rejection_sampling.py: exactness in distribution (chi-square against the
target on a Markov chain), acceptance lengths, temperature-0 greedy, kernel-reference parity, errors."""

import functools

import jax
import numpy as np
import pytest
from scipy import stats

from kernels_pallas import rejection_sampling as rs

ALPHA = 1e-3  # chi-square significance: a correct sampler fails one test in a thousand per seed


def _key(seed):
    """An "rbg" key: the sampler takes any key, and XLA:CPU compiles threefry's bits ~10x slower."""
    return jax.random.key(seed, impl="rbg")


def _random_probs(rng, shape, scale):
    """Softmax of scale * N(0, 1) logits: peaked for large scale, flat for small."""
    x = np.exp(scale * rng.normal(size=shape))
    return x / x.sum(-1, keepdims=True)


def _categorical(rng, probs):
    """One sample per row of probs[N,V] by inverse CDF."""
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((rng.random((probs.shape[0], 1)) > cdf).sum(-1), probs.shape[-1] - 1)


def _markov_batch(rng, n, num_drafts, chain):
    """N verify steps of a Markov target (p0, P[prev]) and draft (q0, Q[prev]).

    d_1 ~ q0, d_{k+1} ~ Q[d_k]; draft_probs[:, k] is the q that drew d_{k+1}; target_probs[:, 0] = p0
    and target_probs[:, k] = P[d_k]: the target conditioned on the draft prefix, as a verify forward.
    """
    p0, p_table, q0, q_table = chain
    vocab = p0.size
    drafts = np.empty((n, num_drafts), np.int32)  # [N,K]
    draft_probs = np.empty((n, num_drafts, vocab))  # [N,K,V]
    for k in range(num_drafts):
        q = np.broadcast_to(q0, (n, vocab)) if k == 0 else q_table[drafts[:, k - 1]]
        draft_probs[:, k] = q
        drafts[:, k] = _categorical(rng, q)
    target_probs = np.concatenate([np.broadcast_to(p0, (n, 1, vocab)), p_table[drafts]], axis=1)  # [N,R,V]
    return drafts, draft_probs.astype(np.float32), target_probs.astype(np.float32)


def _random_chain(rng, vocab, scale):
    return (_random_probs(rng, vocab, scale), _random_probs(rng, (vocab, vocab), scale),
            _random_probs(rng, vocab, scale), _random_probs(rng, (vocab, vocab), scale))


def _chisquare_pvalue(codes, probs):
    """Goodness of fit of integer codes to probs (flattened); cells expecting < 5 counts are pooled."""
    expected = probs.ravel() / probs.sum() * codes.size
    observed = np.bincount(codes, minlength=expected.size)
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    return stats.chisquare(observed, expected).pvalue


def _lossless_pvalues(sampler, chain, num_drafts, seed, n=200_000):
    """p-values of the first emitted token against p0 and of the first two against p0(x1) P[x1](x2).

    A row that emitted one token is completed by a fresh sample from P[x1], as decoding would.
    """
    rng = np.random.default_rng(seed)
    p0, p_table = chain[0], chain[1]
    drafts, draft_probs, target_probs = _markov_batch(rng, n, num_drafts, chain)
    tokens, num_emitted = map(np.asarray, sampler(drafts, draft_probs, target_probs, _key(seed)))
    x1 = tokens[:, 0]
    x2 = np.where(num_emitted >= 2, tokens[:, 1], _categorical(rng, p_table[x1]))
    vocab = p0.size
    return _chisquare_pvalue(x1, p0), _chisquare_pvalue(x1 * vocab + x2, p0[:, None] * p_table)


CASES = {"peaked": dict(vocab=5, num_drafts=3, scale=3.0), "flat": dict(vocab=6, num_drafts=2, scale=0.5)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", rs.MODES)
def test_emitted_tokens_follow_target(mode, case):
    cfg = CASES[case]
    chain = _random_chain(np.random.default_rng(1), cfg["vocab"], cfg["scale"])
    sampler = functools.partial(rs.rejection_sample, mode=mode)
    p_first, p_pair = _lossless_pvalues(sampler, chain, cfg["num_drafts"], seed=2)
    assert p_first > ALPHA and p_pair > ALPHA, (p_first, p_pair)


def _always_accept(drafts, draft_probs, target_probs, key):
    """Biased: emits every draft and a bonus from p_{K+1}."""
    bonus = _categorical(np.random.default_rng(3), target_probs[:, -1])
    return np.concatenate([drafts, bonus[:, None]], axis=1), np.full(len(drafts), drafts.shape[1] + 1)


def _resample_from_target(drafts, draft_probs, target_probs, key):
    """Biased: the correct accept test, but the correction drawn from p_k instead of max(p_k - q_k, 0)."""
    rng = np.random.default_rng(3)
    rows = np.arange(len(drafts))[:, None]
    steps = np.arange(drafts.shape[1])[None, :]
    ratio = target_probs[rows, steps, drafts] / draft_probs[rows, steps, drafts]  # [N,K]
    num_accepted = np.cumprod(rng.random(drafts.shape) <= ratio, axis=1).sum(1)
    correction = _categorical(rng, target_probs[rows[:, 0], num_accepted])
    tokens = np.where(steps < num_accepted[:, None], drafts, correction[:, None])
    return tokens, num_accepted + 1


@pytest.mark.parametrize("sampler", [_always_accept, _resample_from_target])
def test_chisquare_check_rejects_biased_samplers(sampler):
    cfg = CASES["peaked"]
    chain = _random_chain(np.random.default_rng(1), cfg["vocab"], cfg["scale"])
    p_first, p_pair = _lossless_pvalues(sampler, chain, cfg["num_drafts"], seed=2)
    assert p_first < ALPHA and p_pair < ALPHA, (p_first, p_pair)


def _mean_accepted(mode, drafts, draft_probs, target_probs, seed):
    """Mean and standard error of the number of accepted drafts (num_emitted - 1)."""
    _, num_emitted = rs.rejection_sample(drafts, draft_probs, target_probs, _key(seed), mode=mode)
    accepted = np.asarray(num_emitted) - 1.0
    return accepted.mean(), accepted.std() / np.sqrt(accepted.size)


def _independent_batch(rng, n, p_rows, q_rows):
    """Drafts independent of the prefix: d_k ~ q_k, the same p_k, q_k for every sequence."""
    drafts = np.stack([_categorical(rng, np.broadcast_to(q, (n, q.size))) for q in q_rows], axis=1)
    return (drafts.astype(np.int32), np.broadcast_to(q_rows, (n,) + q_rows.shape).astype(np.float32),
            np.broadcast_to(p_rows, (n,) + p_rows.shape).astype(np.float32))


def test_accepted_length_matches_analytic_and_block_is_no_worse():
    rng = np.random.default_rng(4)
    num_drafts, vocab, n = 3, 5, 200_000  # the shapes of CASES["peaked"]: compiled once
    p_rows = _random_probs(rng, (num_drafts + 1, vocab), 1.0)
    q_rows = _random_probs(rng, (num_drafts, vocab), 1.0)
    batch = _independent_batch(rng, n, p_rows, q_rows)
    alpha = np.minimum(p_rows[:num_drafts], q_rows).sum(-1)  # [K]
    mean_rejection, se_rejection = _mean_accepted("rejection", *batch, seed=5)
    assert abs(mean_rejection - np.cumprod(alpha).sum()) < 5 * se_rejection
    mean_block, se_block = _mean_accepted("block", *batch, seed=5)
    assert mean_block > mean_rejection - 4 * np.hypot(se_rejection, se_block)


def test_block_beats_rejection_on_paper_example():
    """Sun et al. Sec. 3: p = (1/3, 2/3), q = (2/3, 1/3), K = 2: 10/9 accepted per step token by token,
    11/9 with block verification."""
    p_rows, q_rows = np.array([[1 / 3, 2 / 3]] * 3), np.array([[2 / 3, 1 / 3]] * 2)
    batch = _independent_batch(np.random.default_rng(6), 100_000, p_rows, q_rows)
    for mode, expected in (("rejection", 10 / 9), ("block", 11 / 9)):
        mean, se = _mean_accepted(mode, *batch, seed=7)
        assert abs(mean - expected) < 5 * se, (mode, mean, expected)


@pytest.mark.parametrize("implementation", ["reference", "pallas_interpret"])
@pytest.mark.parametrize("mode", rs.MODES)
def test_temperature_zero_is_greedy(mode, implementation):
    rng = np.random.default_rng(8)
    batch, num_drafts, vocab = 32, 3, 7
    argmax = rng.integers(0, vocab, (batch, num_drafts + 1))  # [B,R]
    drafts = np.where(rng.random((batch, num_drafts)) < 0.7, argmax[:, :num_drafts],
                      rng.integers(0, vocab, (batch, num_drafts)))
    eye = np.eye(vocab, dtype=np.float32)
    tokens, num_emitted = rs.rejection_sample(drafts.astype(np.int32), eye[drafts], eye[argmax],
                                              _key(9), mode=mode, implementation=implementation)
    matches = np.cumprod(drafts == argmax[:, :num_drafts], axis=1).sum(1)  # [B]
    np.testing.assert_array_equal(num_emitted, matches + 1)
    for b, n in enumerate(matches):
        np.testing.assert_array_equal(tokens[b], list(drafts[b, :n]) + [argmax[b, n]] + [-1] * (num_drafts - n))


@pytest.mark.parametrize("mode", rs.MODES)
def test_pallas_kernel_matches_reference(mode):
    rng = np.random.default_rng(10)
    batch, num_drafts, vocab = 4, 3, 300  # 300 = 2 * 128 + 44: three blocks, the last one padded
    target_probs = _random_probs(rng, (batch, num_drafts + 1, vocab), 1.5).astype(np.float32)
    draft_probs = _random_probs(rng, (batch, num_drafts, vocab), 1.5).astype(np.float32)
    draft_probs[1] = target_probs[1, :num_drafts]  # zero residual mass: the fallback race on p
    drafts = np.stack([_categorical(rng, draft_probs[:, k]) for k in range(num_drafts)], 1).astype(np.int32)
    reference = jax.jit(functools.partial(rs.rejection_sample_reference, mode=mode))
    kernel = jax.jit(functools.partial(rs._rejection_sample_pallas, mode=mode,
                                       block_sizes=rs.BlockSizes(block_v=128), interpret=True))
    for seed in range(3):
        want = reference(drafts, draft_probs, target_probs, _key(seed))
        got = kernel(drafts, draft_probs, target_probs, _key(seed))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("mode", ["rejection", "block"])
def test_identical_draft_and_target_accepts_everything(mode):
    rng = np.random.default_rng(11)
    target_probs = _random_probs(rng, (32, 4, 7), 3.0).astype(np.float32)  # the shapes of the T=0 test
    drafts = np.stack([_categorical(rng, target_probs[:, k]) for k in range(3)], 1).astype(np.int32)
    _, num_emitted = rs.rejection_sample(drafts, target_probs[:, :3], target_probs, _key(12), mode=mode)
    assert (np.asarray(num_emitted) == 4).all()


@pytest.mark.parametrize("mode", ["rejection", "block"])
def test_zero_residual_falls_back_to_target(mode):
    """q >= p everywhere but q(d) >> p(d) (sums within tolerance): rejections find max(p - q, 0) = 0
    and must sample from p, never from the all-zero residual."""
    p = np.float32([0.0001, 0.5999, 0.4, 0.0])
    q = np.float32([0.001, 0.5999, 0.4, 0.0])
    n = 20_000
    tokens, num_emitted = rs.rejection_sample(np.zeros((n, 1), np.int32), np.tile(q, (n, 1, 1)),
                                              np.tile(p, (n, 2, 1)), _key(15), mode=mode)
    corrections = np.asarray(tokens)[np.asarray(num_emitted) == 1, 0]
    assert corrections.size > 0.85 * n and not (corrections == 3).any()
    share = (corrections == 1).mean()
    assert abs(share - 0.5999) < 5 * np.sqrt(0.24 / corrections.size), share


def test_kernel_lowers_for_tpu():
    """The Pallas-to-Mosaic lowering (block shapes, ops) runs on CPU; compiling needs a TPU."""
    batch, num_drafts, vocab = 8, 3, 1000
    args = (np.zeros((batch, num_drafts), np.int32), np.full((batch, num_drafts, vocab), 1 / vocab, np.float32),
            np.full((batch, num_drafts + 1, vocab), 1 / vocab, np.float32), _key(0))
    for mode in rs.MODES:
        kernel = jax.jit(functools.partial(rs._rejection_sample_pallas, mode=mode, block_sizes=rs.BlockSizes(512)))
        assert "tpu_custom_call" in kernel.trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def test_runs_under_jit():
    rng = np.random.default_rng(13)
    drafts, draft_probs, target_probs = _markov_batch(rng, 32, 3, _random_chain(rng, 7, 1.0))
    jitted = jax.jit(rs.rejection_sample, static_argnames=("mode", "implementation", "validate"))
    key = _key(14)
    want = rs.rejection_sample(drafts, draft_probs, target_probs, key, mode="block")
    got = jitted(drafts, draft_probs, target_probs, key, mode="block")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="target_probs"):
        jitted(drafts, draft_probs, target_probs[:, :3], key)


def _valid_inputs():
    target_probs = np.full((2, 3, 4), 0.25, np.float32)
    return dict(draft_tokens=np.array([[0, 1], [2, 3]], np.int32), draft_probs=target_probs[:, :2].copy(),
                target_probs=target_probs)


@pytest.mark.parametrize("change, message", [
    (dict(draft_tokens=np.array([0, 1], np.int32)), r"draft_tokens: expected shape \[B, K\].*found \(2,\)"),
    (dict(draft_tokens=np.zeros((2, 2), np.float32)), r"draft_tokens: expected an integer dtype, found float32"),
    (dict(draft_tokens=np.array([[0, 1], [2, 4]], np.int32)), r"draft_tokens: expected ids in \[0, 4\).*4\]"),
    (dict(target_probs=np.full((2, 2, 4), 0.25, np.float32)),
     r"target_probs: expected shape \[B, K\+1, V\] = \(2, 3, V\).*found \(2, 2, 4\)"),
    (dict(draft_probs=np.full((2, 2, 5), 0.2, np.float32)),
     r"draft_probs: expected shape \[B, K, V\] = \(2, 2, 4\).*found \(2, 2, 5\)"),
    (dict(draft_probs=np.full((3, 2, 4), 0.25, np.float32)),
     r"draft_probs: expected shape \[B, K, V\] = \(2, 2, 4\).*found \(3, 2, 4\)"),
    (dict(target_probs=np.full((2, 3, 4), 0.3, np.float32)), r"target_probs: expected probabilities summing to 1"),
    (dict(draft_probs=np.tile(np.float32([0.5, 0.6, -0.1, 0.0]), (2, 2, 1))),
     r"draft_probs: expected non-negative probabilities, found minimum -0.1"),
    (dict(mode="typical"), r"mode: expected one of .*found 'typical'"),
])
def test_invalid_inputs_name_the_argument(change, message):
    kwargs = {**_valid_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        rs.rejection_sample(key=_key(0), **kwargs)


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match=r"BlockSizes.block_v: expected a positive multiple of 128, found 100"):
        rs.BlockSizes(block_v=100)
