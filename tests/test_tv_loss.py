"""Tests of kernels_pallas/tv_loss.py: chunked jnp path and Pallas kernels (interpret mode) against
the plain reference, values and gradients; padding, temperature, mask, bf16, errors, and that the
chunked path's compiled temporaries stay far below one [N, V] array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import tv_loss as tv

N, D, V = 20, 16, 300  # neither N nor V a multiple of the blocks below
SMALL = tv.BlockSizes(block_n=8, block_v=128)  # 3 row blocks x 3 vocab blocks
FUSED = ("chunked", "pallas_interpret")


def _inputs(seed=0, n=N, d=D, v=V, dtype=jnp.float32, spread=0.7):
    """h_draft, h_target [n, d], w_vocab [v, d]: a draft near the target, logits of scale ~3."""
    k = jax.random.split(jax.random.key(seed), 3)
    h_t = jax.random.normal(k[0], (n, d))  # [n, d]
    h_d = h_t + spread * jax.random.normal(k[1], (n, d))  # [n, d]
    w = 0.8 * jax.random.normal(k[2], (v, d))  # [v, d]
    return tuple(x.astype(dtype) for x in (h_d, h_t, w))


def _rel_err(x, ref):
    return float(jnp.abs(x.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())


def _weighted_loss(impl, **kw):
    """(h_draft, h_target, w_vocab) -> sum_n c_n alpha_n with distinct cotangents c_n."""
    def loss(h_d, h_t, w):
        kwargs = dict(kw, implementation=impl) if impl != "definition" else kw
        fn = tv.fused_acceptance_reference if impl == "definition" else tv.fused_acceptance
        alpha = fn(h_d, h_t, w, **kwargs)  # [N]
        return (alpha * jnp.linspace(-1.0, 2.0, alpha.shape[0])).sum()
    return loss


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_forward_matches_reference(impl, temperature):
    """V = 300 leaves 84 zero rows of padded W in the last block: parity needs them masked."""
    h_d, h_t, w = _inputs()
    ref = tv.fused_acceptance_reference(h_d, h_t, w, temperature=temperature)  # [N]
    alpha = tv.fused_acceptance(h_d, h_t, w, temperature=temperature, block_sizes=SMALL,
                                implementation=impl)
    assert alpha.shape == (N,) and alpha.dtype == jnp.float32
    assert _rel_err(alpha, ref) <= 1e-5
    assert 1e-3 < float(ref.min()) and float(ref.max()) < 0.99  # a non-degenerate regime


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("grad_wrt_vocab", [False, True])
def test_gradients_match_reference(impl, grad_wrt_vocab):
    h_d, h_t, w = _inputs(seed=1)
    kw = dict(temperature=0.8, grad_wrt_vocab=grad_wrt_vocab)
    want = jax.grad(_weighted_loss("definition", **kw), argnums=(0, 1, 2))(h_d, h_t, w)
    got = jax.grad(_weighted_loss(impl, block_sizes=SMALL, **kw), argnums=(0, 1, 2))(h_d, h_t, w)
    assert _rel_err(got[0], want[0]) <= 2e-5
    assert not jnp.any(got[1]) and not jnp.any(want[1])  # h_target: stopped
    if grad_wrt_vocab:
        assert _rel_err(got[2], want[2]) <= 2e-5
    else:
        assert not jnp.any(got[2]) and not jnp.any(want[2])


def test_analytic_gradient_formula():
    """d alpha_n / d z_q = -q (s - <s, q>) / (2T) with z_q = W h_d (before 1/T), s = sign(q - p)."""
    h_d, h_t, w = _inputs(seed=2)
    temperature = 0.7
    jac = jax.jacrev(lambda z: jnp.minimum(
        jax.nn.softmax(h_t @ w.T / temperature), jax.nn.softmax(z / temperature)).sum(-1))
    z_d = h_d @ w.T  # [N, V]
    by_autodiff = jnp.einsum("nnv->nv", jac(z_d))  # d alpha_n / d z_q[n]
    p, q = jax.nn.softmax(h_t @ w.T / temperature), jax.nn.softmax(z_d / temperature)
    s = jnp.sign(q - p)
    analytic = -q * (s - (s * q).sum(-1, keepdims=True)) / (2 * temperature)
    assert _rel_err(analytic, by_autodiff) <= 1e-5


def test_default_blocks_single_vocab_block():
    """The CPU default tiles the whole vocabulary (passes share one logits tile); also dispatch."""
    h_d, h_t, w = _inputs(seed=3, n=37)
    loss = _weighted_loss(None)  # implementation=None -> chunked on CPU, CHUNKED_BLOCK_SIZES
    want = jax.value_and_grad(_weighted_loss("definition"))(h_d, h_t, w)
    got = jax.value_and_grad(loss)(h_d, h_t, w)
    assert abs(float(got[0] - want[0])) <= 1e-5 * abs(float(want[0]))
    assert _rel_err(got[1], want[1]) <= 2e-5


@pytest.mark.parametrize("impl", FUSED)
def test_bf16_inputs(impl):
    h_d, h_t, w = _inputs(seed=4, dtype=jnp.bfloat16)
    kw = dict(grad_wrt_vocab=True)
    alpha = tv.fused_acceptance(h_d, h_t, w, block_sizes=SMALL, implementation=impl, **kw)
    assert _rel_err(alpha, tv.fused_acceptance_reference(h_d, h_t, w)) <= 1e-3
    want = jax.grad(_weighted_loss("definition", **kw), argnums=(0, 2))(h_d, h_t, w)
    got = jax.grad(_weighted_loss(impl, block_sizes=SMALL, **kw), argnums=(0, 2))(h_d, h_t, w)
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16 and _rel_err(g, r) <= 3e-2


@pytest.mark.parametrize("impl", FUSED)
def test_mask_zeroes_alpha_and_gradient(impl):
    h_d, h_t, w = _inputs(seed=5)
    mask = jnp.arange(N) % 3 != 0  # [N]
    h_d = jnp.where(mask[:, None], h_d, jnp.nan)  # masked rows may hold garbage
    kw = dict(block_sizes=SMALL, implementation=impl, grad_wrt_vocab=True)
    alpha = tv.fused_acceptance(h_d, h_t, w, mask=mask, **kw)
    ref = tv.fused_acceptance_reference(h_d, h_t, w)
    assert not jnp.any(alpha[~mask]) and _rel_err(alpha[mask], ref[mask]) <= 1e-5
    g_d, g_w = jax.grad(lambda a, c: tv.fused_acceptance(a, h_t, c, mask=mask, **kw).sum(),
                        argnums=(0, 1))(h_d, w)
    assert not jnp.any(g_d[~mask])
    keep = np.flatnonzero(mask)  # the kept rows alone, through the reference
    want_d, want_w = jax.grad(
        lambda a, c: tv.fused_acceptance_reference(a, h_t[keep], c, grad_wrt_vocab=True).sum(),
        argnums=(0, 1))(h_d[keep], w)
    assert _rel_err(g_d[keep], want_d) <= 2e-5 and _rel_err(g_w, want_w) <= 2e-5


def test_identity_and_range():
    """alpha = 1 - 0.5 sum |p - q|, in [0, 1]: ~1 for equal states, ~0 for unrelated peaked ones."""
    h_d, h_t, w = _inputs(seed=6, spread=2.0)
    alpha = tv.fused_acceptance(h_d, h_t, w, block_sizes=SMALL, implementation="chunked")
    p, q = jax.nn.softmax(h_t @ w.T), jax.nn.softmax(h_d @ w.T)  # [N, V]
    np.testing.assert_allclose(alpha, 1 - 0.5 * jnp.abs(p - q).sum(-1), atol=2e-6)
    same = tv.fused_acceptance(h_t, h_t, w, block_sizes=SMALL, implementation="chunked")
    far = tv.fused_acceptance(10 * h_d, -10 * h_t, w, block_sizes=SMALL, implementation="chunked")
    for a in (alpha, same, far):
        assert bool(jnp.all((a >= 0) & (a <= 1 + 1e-6)))
    np.testing.assert_allclose(same, 1.0, atol=1e-6)
    assert float(far.max()) < 1e-3


@pytest.mark.parametrize("call, match", [
    (lambda a, b, w: tv.fused_acceptance(a, b, w[:, :-1]), "w_vocab must be"),
    (lambda a, b, w: tv.fused_acceptance(a, b[:-1], w), "h_target must have"),
    (lambda a, b, w: tv.fused_acceptance(a[0], b, w), "h_draft must be a 2-D"),
    (lambda a, b, w: tv.fused_acceptance(a, b, w, mask=jnp.ones(3, bool)), "mask must be"),
    (lambda a, b, w: tv.fused_acceptance(a, b, w, temperature=0.0), "temperature must be"),
    (lambda a, b, w: tv.fused_acceptance(a, b, w, implementation="cuda"), "implementation must"),
    (lambda a, b, w: tv.fused_acceptance(a, b, w, block_sizes=(8, 128)), "block_sizes must be"),
    (lambda a, b, w: tv.BlockSizes(block_n=0), r"block_sizes\.block_n must be a positive"),
    (lambda a, b, w: tv.BlockSizes(block_v=2.0), r"block_sizes\.block_v must be a positive"),
    (lambda a, b, w: tv.fused_acceptance(a, b, w, block_sizes=tv.BlockSizes(12, 128),
                                         implementation="pallas_interpret"),
     r"block_sizes\.block_n must be a multiple of 8"),
    (lambda a, b, w: tv.fused_acceptance(a, b, w, block_sizes=tv.BlockSizes(8, 100),
                                         implementation="pallas"),
     r"block_sizes\.block_v must be a multiple of 128"),
])
def test_validation_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(*_inputs())


def test_chunked_temp_memory_is_tiled():
    """Forward + backward of the chunked path: temporaries far below one [N, V] f32 array."""
    n, d, v = 512, 64, 16384
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (n, d), (v, d))]

    def temp_bytes(impl, **kw):
        step = jax.value_and_grad(lambda *a: tv.fused_acceptance(*a, implementation=impl,
                                                                 **kw).mean())
        return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes

    one_logits = n * v * 4
    assert temp_bytes("reference") >= 2 * one_logits  # the plain path holds [N, V] arrays
    vocab_tiles = temp_bytes("chunked", block_sizes=tv.BlockSizes(block_n=128, block_v=1024))
    assert vocab_tiles <= one_logits / 8, (vocab_tiles, one_logits)
    row_tiles = temp_bytes("chunked", block_sizes=tv.BlockSizes(block_n=16, block_v=1 << 20))
    assert row_tiles <= one_logits / 4, (row_tiles, one_logits)
