"""Parity of the Flax trunk with HF transformers (torch, CPU) on tiny random checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bebop_jax.model import load_model
from bebop_jax.model.transformer import Transformer, init_cache, init_params, logical_axes

T = 40  # > the llama3 rope scaling's original context (16), so scaled frequencies are exercised


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, cache):
    m = Transformer(cfg)
    hidden, cache = m.apply({"params": params}, tokens, positions, cache)
    return m.apply({"params": params}, hidden, method=Transformer.logits), cache


def _jax_logits(model, tokens, positions, cache=None):
    return _forward(model.cfg, model.params, tokens, positions, cache)


def test_full_forward_matches_transformers(hf_tiny, rng):
    family, path, torch_model = hf_tiny
    model = load_model(path)
    assert model.cfg.family == family
    tokens = rng.randint(0, 64, size=(3, T))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(T), (3, T))
    logits, _ = _jax_logits(model, jnp.asarray(tokens), positions)
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-4


def test_cached_prefill_then_decode_equals_full_forward(hf_tiny, rng):
    _, path, torch_model = hf_tiny
    model = load_model(path)
    tokens = rng.randint(0, 64, size=(2, T))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    prefill = 25
    cache = init_cache(model.cfg, 2, 64)
    pos = jnp.broadcast_to(jnp.arange(prefill), (2, prefill))
    logits, cache = _jax_logits(model, jnp.asarray(tokens[:, :prefill]), pos, cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, T):
        step_logits, cache = _jax_logits(model, jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), cache)
        steps.append(np.asarray(step_logits))
    assert np.abs(np.concatenate(steps, axis=1) - ref).max() <= 1e-4


def test_ragged_batch_each_sequence_own_cache_length(hf_tiny, rng):
    """Two sequences at different positions in one cached call equal their separate runs."""
    _, path, _ = hf_tiny
    model = load_model(path)
    a, b = rng.randint(0, 64, size=12), rng.randint(0, 64, size=7)
    full_a, _ = _jax_logits(model, jnp.asarray(a[None]), jnp.arange(12)[None])
    full_b, _ = _jax_logits(model, jnp.asarray(b[None]), jnp.arange(7)[None])
    padded = np.zeros((2, 11), np.int32)
    padded[0, :11], padded[1, :6] = a[:11], b[:6]
    cache = init_cache(model.cfg, 2, 32)
    _, cache = _jax_logits(model, jnp.asarray(padded), jnp.broadcast_to(jnp.arange(11), (2, 11)), cache)
    # next token of each: a[11] at position 11, b[6] at position 6 (overwriting b's prompt padding)
    step, _ = _jax_logits(model, jnp.asarray([[a[11]], [b[6]]]), jnp.asarray([[11], [6]]), cache)
    np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(full_a[0, 11]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(full_b[0, 6]), atol=1e-5)


def test_segment_ids_keep_packed_sequences_apart(hf_tiny, rng):
    _, path, _ = hf_tiny
    model = load_model(path)
    a, b = rng.randint(0, 64, size=9), rng.randint(0, 64, size=6)
    m = Transformer(model.cfg)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    positions = jnp.asarray(np.concatenate([np.arange(9), np.arange(6)])[None])
    segments = jnp.asarray(np.array([0] * 9 + [1] * 6)[None])
    h_packed, _ = m.apply({"params": model.params}, packed, positions, segment_ids=segments)
    h_b, _ = m.apply({"params": model.params}, jnp.asarray(b[None]), jnp.arange(6)[None])
    np.testing.assert_allclose(np.asarray(h_packed[0, 9:]), np.asarray(h_b[0]), atol=1e-5)


def test_bf16_compute_close_to_f32(hf_tiny, rng):
    _, path, _ = hf_tiny
    f32, bf16 = load_model(path), load_model(path, dtype="bfloat16")
    tokens = jnp.asarray(rng.randint(0, 64, size=(1, 16)))
    pos = jnp.arange(16)[None]
    a, _ = _jax_logits(f32, tokens, pos)
    b, _ = _jax_logits(bf16, tokens, pos)
    assert b.dtype == jnp.float32
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05 * np.abs(np.asarray(a)).max() + 0.02


def test_params_carry_logical_axes(hf_tiny):
    _, path, _ = hf_tiny
    cfg = load_model(path).cfg
    axes = logical_axes(cfg)
    assert tuple(axes["embedding"]) == ("vocab", "embed")
    assert tuple(axes["layers_0"]["attn"]["wq"]) == ("q_heads", "head_dim", "embed")
    assert tuple(axes["layers_0"]["mlp"]["down"]) == ("embed", "mlp")
    shapes = jax.tree.map(lambda a: a.shape, init_params(cfg, jax.random.key(0)))
    assert shapes == jax.tree.map(lambda a: a.shape, load_model(path).params)


@pytest.mark.parametrize("fn", ["linear", "vocab_logits"])
@pytest.mark.parametrize("shape", [(1,), (1, 4), (3, 5), (70,), (2, 3, 7)])
def test_few_row_products_equal_the_plain_product_on_every_path(fn, shape):
    """x W^T for W stored [out, in], values and gradient, on every CPU path: the weight-on-the-left dot
    (2..64 rows) and the plain dot; `vocab_logits` (float32 out) is `linear`."""
    from bebop_jax.model import transformer

    product = getattr(transformer, fn)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((*shape, 24)).astype(np.float32)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    got = np.asarray(jax.jit(product)(x, w))
    want = np.einsum("...i,oi->...o", x.astype(np.float64), w.astype(np.float64))
    assert got.shape == (*shape, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda w_: jnp.sum(jnp.sin(product(x, w_))))(w)  # the barrier has a gradient
    want_grad = np.einsum("ro,ri->oi", np.cos(want).reshape(-1, 40), x.reshape(-1, 24).astype(np.float64))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-4)


def test_linear_puts_the_weight_on_the_left_for_few_rows_on_cpu():
    """Between FEW_ROWS rows the dot has W as its left operand and a barrier keeps it so."""
    from bebop_jax.model.transformer import FEW_ROWS, linear

    w = jnp.zeros((40, 24))
    for rows, plain in ((1, True), (FEW_ROWS[0], False), (FEW_ROWS[1], False), (FEW_ROWS[1] + 1, True)):
        jaxpr = jax.make_jaxpr(linear)(jnp.zeros((rows, 24)), w).jaxpr
        dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
        assert (dot.invars[0] is jaxpr.invars[0]) == plain, rows  # the activations on the left: the plain dot
        assert any(e.primitive.name == "optimization_barrier" for e in jaxpr.eqns) != plain, rows


@pytest.mark.parametrize("rows", [1, 4])
def test_decode_step_never_copies_a_weight(rows):
    """A cached decode step on CPU reads each weight in place: no transpose or copy in the compiled program
    makes an array as large as a weight matrix (the attention output projection contracted as (N, H) once
    made XLA:CPU re-lay wo out in every layer of every step). Arrays here: weights >= 4096 elements,
    activations and the donated cache <= 1024."""
    import re

    from bebop_jax.model.transformer import TransformerConfig

    cfg = TransformerConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    params = init_params(cfg, jax.random.key(0))
    cache = init_cache(cfg, 1, 8)
    tokens = jnp.zeros((1, rows), jnp.int32)
    positions = jnp.arange(rows, dtype=jnp.int32)[None]
    step = jax.jit(lambda p, t, pos, c: Transformer(cfg).apply({"params": p}, t, pos, c), donate_argnums=3)
    hlo = step.lower(params, tokens, positions, cache).compile().as_text()
    moved = [(op, dims) for dims, op in re.findall(r"= f32\[([0-9,]*)\]\S* (transpose|copy)\(", hlo)
             if np.prod([int(d) for d in dims.split(",") if d]) >= 4096]
    assert not moved, moved
