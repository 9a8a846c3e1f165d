"""The draft losses (bebop_jax/losses.py) against a direct per-position computation in float64 numpy,
the identity alpha = sum min(p, q) = 1 - TV, the e2e-TV gradient against finite differences, and the
loss masks of bebop_jax/data.py (prompt, padding, packed segments, the row end)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax import losses
from bebop_jax.data import loss_masks

K, N, D, V = 3, 10, 8, 40
TAU = 0.8
_draft_loss = jax.jit(losses.draft_loss, static_argnums=(0, 6))  # (kind, ..., temperature): one compile per kind


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h_t = rng.normal(size=(K, N, D))
    h_d = h_t + 0.6 * rng.normal(size=(K, N, D))
    w = 0.9 * rng.normal(size=(V, D))
    targets = rng.integers(0, V, (K, N))
    masks = rng.random((K, N)) < 0.8
    masks[:, 0] = True  # origin 0 counts for every step, so the e2e chain has support
    return h_d, h_t, w, targets, masks


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _direct(kind, h_d, h_t, w, targets, masks, tau=TAU):
    """The DESIGN.md definitions, one position at a time, float64."""
    per = np.zeros((K, N))
    alpha = np.zeros((K, N))
    for k in range(K):
        for n in range(N):
            p, q = _softmax(w @ h_t[k, n] / tau), _softmax(w @ h_d[k, n] / tau)
            alpha[k, n] = np.minimum(p, q).sum()
            kl = np.sum(p * np.log(p / q))
            per[k, n] = {"ce": -np.log(q[targets[k, n]]), "kl": kl, "lk_lambda": kl,
                         "tv": 0.5 * np.abs(p - q).sum()}.get(kind, 0.0)
    mean = lambda x, m: (x * m).sum(-1) / np.maximum(m.sum(-1), 1)  # noqa: E731
    chain_mask = np.cumprod(masks, axis=0)
    chain = mean(np.cumprod(alpha, axis=0), chain_mask)  # [K]
    return _combine(kind, per, alpha, masks, chain), mean(alpha, masks), 1.0 + chain.sum()


def _combine(kind, per, alpha, counted, chain, masks=None):
    """The loss from per-position values per [K, N] (CE / KL / TV), alpha [K, N] and the chain [K]."""
    masks = counted if masks is None else masks
    mean = lambda x, m: (x * m).sum(-1) / np.maximum(m.sum(-1), 1)  # noqa: E731
    a = mean(alpha, masks)
    if kind == "e2e_tv":
        return -chain.mean()
    if kind == "lk_alpha":
        return -np.log(a).mean()
    if kind == "lk_lambda":
        lam = np.exp(-losses.LK_ETA * a)
        return (lam * mean(per, masks) + (1 - lam) * (1 - a)).mean()
    return mean(per, counted).mean()


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_losses_match_direct_computation(kind):
    h_d, h_t, w, targets, masks = _inputs()
    loss, metrics = _draft_loss(kind, *(jnp.asarray(x, jnp.float32) for x in (h_d, h_t)),
                                jnp.asarray(targets), jnp.asarray(masks), jnp.asarray(w, jnp.float32), TAU)
    want_loss, want_alpha, want_len = _direct(kind, h_d, h_t, w, targets, masks)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["alpha"]), want_alpha, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["expected_length"]), want_len, rtol=2e-5)
    assert 0.05 < want_alpha.min() and want_alpha.max() < 0.95  # a regime where the losses differ


def test_tv_loss_is_one_minus_alpha():
    h_d, h_t, w, targets, masks = _inputs(1)
    loss, metrics = _draft_loss("tv", *(jnp.asarray(x, jnp.float32) for x in (h_d, h_t)), jnp.asarray(targets),
                                jnp.asarray(masks), jnp.asarray(w, jnp.float32), TAU)
    np.testing.assert_allclose(float(loss), float(jnp.mean(1.0 - metrics["alpha"])), rtol=1e-6)


def test_alpha_is_sum_min_is_one_minus_tv():
    h_d, h_t, w, *_ = _inputs(2)
    alpha = np.asarray(losses.acceptance(jnp.asarray(h_d[0], jnp.float32), jnp.asarray(h_t[0], jnp.float32),
                                         jnp.asarray(w, jnp.float32), TAU))
    p, q = _softmax(h_t[0] @ w.T / TAU), _softmax(h_d[0] @ w.T / TAU)  # [N, V]
    np.testing.assert_allclose(alpha, np.minimum(p, q).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(alpha, 1.0 - 0.5 * np.abs(p - q).sum(-1), rtol=1e-5)
    # identical distributions accept always; disjoint supports never
    same = losses.acceptance(jnp.asarray(h_t[0], jnp.float32), jnp.asarray(h_t[0], jnp.float32),
                             jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(same), 1.0, rtol=1e-6)
    w2 = np.concatenate([np.eye(2) * 60.0, np.zeros((2, D - 2))], axis=1)  # two tokens, peaked logits
    hd, ht = np.zeros((1, D)), np.zeros((1, D))
    hd[0, 0], ht[0, 1] = 1.0, 1.0
    apart = losses.acceptance(jnp.asarray(hd, jnp.float32), jnp.asarray(ht, jnp.float32), jnp.asarray(w2, jnp.float32))
    assert float(apart[0]) < 1e-20


@pytest.mark.parametrize("kind", ["lk_alpha", "lk_lambda"])
def test_lk_gradients_match_finite_differences(kind):
    h_d, h_t, w, targets, masks = _inputs(9)
    args = (jnp.asarray(h_t, jnp.float32), jnp.asarray(targets), jnp.asarray(masks), jnp.asarray(w, jnp.float32))
    grad = np.asarray(jax.grad(lambda hd: losses.draft_loss(kind, hd, *args, TAU)[0])(jnp.asarray(h_d, jnp.float32)))
    v = np.random.default_rng(10).normal(size=h_d.shape)
    eps = 1e-4
    # lk_lambda's weight is a stop-gradient of alpha: hold it at its value at h_d
    lam = np.exp(-losses.LK_ETA * _direct("tv", h_d, h_t, w, targets, masks)[1])

    def value(hd):
        if kind == "lk_alpha":
            return _direct(kind, hd, h_t, w, targets, masks)[0]
        kl, a = _direct("kl", hd, h_t, w, targets, masks)[0:2]
        kl_per = np.array([_direct("kl", hd[k:k + 1].repeat(K, 0), h_t[k:k + 1].repeat(K, 0), w, targets,
                                   masks[k:k + 1].repeat(K, 0))[0] for k in range(K)])
        return np.mean(lam * kl_per + (1 - lam) * (1 - a))
    fd = (value(h_d + eps * v) - value(h_d - eps * v)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * v), fd, rtol=2e-3, atol=1e-6)


def test_e2e_tv_gradient_matches_finite_differences():
    """Directional derivatives of the f32 JAX gradient against central differences of the float64 definition;
    the chain couples the steps, so perturbing step 1's hidden state also moves steps 2 and 3's terms."""
    h_d, h_t, w, targets, masks = _inputs(3)
    grad = np.asarray(jax.grad(lambda hd: losses.draft_loss(
        "e2e_tv", hd, jnp.asarray(h_t, jnp.float32), jnp.asarray(targets), jnp.asarray(masks),
        jnp.asarray(w, jnp.float32), TAU)[0])(jnp.asarray(h_d, jnp.float32)), np.float64)
    rng = np.random.default_rng(4)
    eps = 1e-5
    for _ in range(4):
        v = rng.normal(size=h_d.shape)
        fd = (_direct("e2e_tv", h_d + eps * v, h_t, w, targets, masks)[0]
              - _direct("e2e_tv", h_d - eps * v, h_t, w, targets, masks)[0]) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * v), fd, rtol=2e-3, atol=1e-6)
    # step 1 alone: the gradient through the later factors of the chain is present
    v = np.zeros_like(h_d)
    v[0] = rng.normal(size=h_d[0].shape)
    fd = (_direct("e2e_tv", h_d + eps * v, h_t, w, targets, masks)[0]
          - _direct("e2e_tv", h_d - eps * v, h_t, w, targets, masks)[0]) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * v), fd, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_masked_positions_do_not_count(kind):
    h_d, h_t, w, targets, masks = _inputs(5)
    args = lambda hd, ht, tg: (jnp.asarray(hd, jnp.float32), jnp.asarray(ht, jnp.float32), jnp.asarray(tg),  # noqa: E731
                               jnp.asarray(masks), jnp.asarray(w, jnp.float32), TAU)
    base = float(_draft_loss(kind, *args(h_d, h_t, targets))[0])
    rng = np.random.default_rng(6)
    off = ~masks
    h_d2, h_t2, tg2 = h_d.copy(), h_t.copy(), targets.copy()
    h_d2[off] = rng.normal(size=h_d2[off].shape) * 5
    h_t2[off] = rng.normal(size=h_t2[off].shape) * 5
    tg2[off] = rng.integers(0, V, off.sum())
    if kind == "e2e_tv":  # the chain uses earlier steps' alphas only where all earlier steps count
        assert not np.all(np.cumprod(masks, 0) == masks)
    np.testing.assert_allclose(float(_draft_loss(kind, *args(h_d2, h_t2, tg2))[0]), base, rtol=1e-6)


def test_loss_masks_prompt_padding_segments_and_row_end():
    # one row of T=12: segment 1 = prompt [0,1,2] + completion [3,4,5]; segment 2 = prompt [6] +
    # completion [7,8,9]; positions 10, 11 padding
    seg = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    comp = np.array([[0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]], bool)
    masks = np.asarray(loss_masks(comp, seg, 3))  # [3, 1, 12]
    want = np.zeros((3, 12), bool)
    for k in (1, 2, 3):
        for t in range(12):
            s = t + k + 1
            want[k - 1, t] = s < 12 and seg[0, t] != 0 and seg[0, s] == seg[0, t] and comp[0, s]
    np.testing.assert_array_equal(masks[:, 0], want)
    # spelled out for k = 1 (target x_{t+2}): origins 1..3 of segment 1, origins 6..7 of segment 2
    np.testing.assert_array_equal(np.flatnonzero(masks[0, 0]), [1, 2, 3, 6, 7])
    np.testing.assert_array_equal(np.flatnonzero(masks[2, 0]), [0, 1])  # k = 3: x_{t+4} in segment 1


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_draft_subvocabulary_losses_match_direct_computation(kind):
    """Heads drafting from Vd of the V ids: alpha = sum over Vd of min(p, q) with p the FULL distribution
    (its mass outside Vd is lost), q normalised over Vd; CE counts only targets inside Vd; KL is to p
    renormalised over Vd."""
    h_d, h_t, w, targets, masks = _inputs(7)
    ids = np.sort(np.random.default_rng(8).choice(V, 25, replace=False))
    index = np.full(V, -1)
    index[ids] = np.arange(len(ids))
    sub_targets = index[targets]  # -1 outside the draft vocabulary
    logz = np.log(np.exp(np.einsum("knd,vd->knv", h_t, w) / TAU).sum(-1))  # [K, N]: p's full normaliser
    loss, metrics = _draft_loss(kind, *(jnp.asarray(x, jnp.float32) for x in (h_d, h_t)), jnp.asarray(sub_targets),
                                jnp.asarray(masks), jnp.asarray(w[ids], jnp.float32), TAU, None,
                                jnp.asarray(logz, jnp.float32))
    alpha, per = np.zeros((K, N)), np.zeros((K, N))
    for k in range(K):
        for n in range(N):
            p, q = _softmax(w @ h_t[k, n] / TAU)[ids], _softmax(w[ids] @ h_d[k, n] / TAU)
            alpha[k, n] = np.minimum(p, q).sum()
            p_renorm = p / p.sum()
            kl = np.sum(p_renorm * np.log(p_renorm / q))
            per[k, n] = {"ce": -np.log(q[max(sub_targets[k, n], 0)]), "kl": kl, "lk_lambda": kl,
                         "tv": 1.0 - alpha[k, n]}.get(kind, 0.0)
    mean = lambda x, m: (x * m).sum(-1) / np.maximum(m.sum(-1), 1)  # noqa: E731
    chain = mean(np.cumprod(alpha, 0), np.cumprod(masks, 0))
    counted = masks & (sub_targets >= 0) if kind == "ce" else masks
    want = _combine(kind, per, alpha, counted, chain, masks)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["alpha"]), mean(alpha, masks), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["expected_length"]), 1.0 + chain.sum(), rtol=2e-5)
    assert (sub_targets[masks] < 0).any() and (sub_targets[masks] >= 0).any()  # both kinds of target occur
    full_alpha = np.asarray(_draft_loss("tv", *(jnp.asarray(x, jnp.float32) for x in (h_d, h_t)),
                                        jnp.asarray(targets), jnp.asarray(masks), jnp.asarray(w, jnp.float32),
                                        TAU)[1]["alpha"])
    assert not np.allclose(full_alpha, mean(alpha, masks), rtol=1e-2)  # the sub-vocabulary changes alpha
