"""The trunk: a decoder-only transformer of the Llama / Qwen2 / Qwen3 family in flax.linen.

`Transformer.apply(params, tokens, positions, cache)` is pure: the KV cache is a value passed in and
returned (one `KVCache` per layer, so each layer's buffers are updated in place under donation or
inside a `lax.while_loop`; no scan over layers, which copied the cache on CPU: MACHINE.md).

Cache layout: slot `s` of a sequence holds the keys/values of its token at absolute position `s`.
A forward writes its tokens' keys at their `positions[B, T]` and attends to every slot `<=` the
query's position, so each sequence of a ragged batch has its own length, and slots written by a
rejected speculative draft are simply overwritten later. Positions past the cache are dropped.

Family switches (all read from the checkpoint): q/k RMSNorm (Qwen3), q/k/v bias (Qwen2), tied or
untied LM head, RoPE theta and Llama-3 rope scaling, grouped-query attention.
Parameters and activations carry logical axis names; `bebop_jax.sharding` maps them to a mesh.

Shape letters: B batch, T tokens in this call, S cache slots, D model width, N query heads,
K key/value heads, G = N / K, H head dim, F MLP width, V vocabulary. Weight matrices are stored
[out, in], as HF checkpoints store them (`linear`).
Not here on purpose: dropout, MoE, sliding-window attention.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.placement import platform

Axes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the trunk; hashable, so it can be a static jit argument."""

    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys and values of one attention layer: k [B, K, H, S], v [B, K, S, H].

    Heads lead (as MaxText's kvcache orders them); keys are slot-minor so that q.k^T, which contracts
    H, is a plain matmul on both backends: with keys [B, K, S, H] XLA:CPU ran the scores of a decode
    step 4.8x slower (0.47 against 2.24 ms per SmolLM2 layer at batch 32, 384 slots)."""

    k: jax.Array
    v: jax.Array


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> tuple[KVCache, ...]:
    """An empty cache of `length` slots per sequence, one KVCache per layer."""
    return tuple(empty_kv(cfg, batch, length, dtype) for _ in range(cfg.num_layers))


def empty_kv(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> KVCache:
    """One layer's zero KVCache of `length` slots."""
    dtype = dtype or cfg.compute_dtype
    K, H = cfg.num_kv_heads, cfg.head_dim
    return KVCache(jnp.zeros((batch, K, H, length), dtype), jnp.zeros((batch, K, length, H), dtype))


# Logical axes of KVCache.k and KVCache.v.
CACHE_AXES = KVCache(k=("cache_batch", "cache_kv_heads", "head_dim", "cache_length"),
                     v=("cache_batch", "cache_kv_heads", "cache_length", "head_dim"))


def rope_inv_freq(cfg: TransformerConfig) -> np.ndarray:
    """Inverse frequencies [H/2] of rotate-half RoPE, with Llama-3 scaling when configured."""
    exponent = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(cfg.head_dim)
    inv = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)  # float32, as HF computes it
    rs = cfg.rope_scaling
    if rs is not None:
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(medium, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: TransformerConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] for integer positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF convention) on x [B, T, heads, H]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    xf = x.astype(jnp.float32)
    return (xf * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]).astype(x.dtype)


def param_with_axes(module: nn.Module, name: str, shape: tuple[int, ...], axes: Axes, init=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32: y = x / rms(x) * scale."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over an explicit KV cache.

    first_slot: the cache's first slot that holds a key (slots before it are never attended): 0 for the
    trunk; 1 for the MTP step-1 layer, whose first origin t = 0 writes slot t + 1.
    """

    cfg: TransformerConfig
    first_slot: int = 0

    @nn.compact
    def __call__(self, x, cos, sin, positions, cache: KVCache | None, segment_ids=None):
        """x [B, T, D] -> (y [B, T, D], updated cache or None)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # [out, in] as the checkpoint stores them (see `linear`); heads split out of the output axis
        wq = param_with_axes(self, "wq", (N, H, D), ("q_heads", "head_dim", "embed"))
        wk = param_with_axes(self, "wk", (K, H, D), ("kv_heads", "head_dim", "embed"))
        wv = param_with_axes(self, "wv", (K, H, D), ("kv_heads", "head_dim", "embed"))
        wo = param_with_axes(self, "wo", (D, N, H), ("embed", "q_heads", "head_dim"))
        B, T = x.shape[:2]
        q = linear(x, wq.reshape(N * H, D), dt).reshape(B, T, N, H)
        k = linear(x, wk.reshape(K * H, D), dt).reshape(B, T, K, H)
        v = linear(x, wv.reshape(K * H, D), dt).reshape(B, T, K, H)
        if cfg.qkv_bias:
            q = q + param_with_axes(self, "bq", (N, H), ("q_heads", "head_dim"), nn.initializers.zeros).astype(dt)
            k = k + param_with_axes(self, "bk", (K, H), ("kv_heads", "head_dim"), nn.initializers.zeros).astype(dt)
            v = v + param_with_axes(self, "bv", (K, H), ("kv_heads", "head_dim"), nn.initializers.zeros).astype(dt)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, dt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            keys, values, key_pos = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), positions  # S = T
            valid = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
            if segment_ids is not None:
                valid &= segment_ids[:, None, :] == segment_ids[:, :, None]
        else:
            batch_idx = jnp.arange(x.shape[0])[:, None]  # [B, 1]
            # indexed at (b, ..., positions[b, t]) both updates are [B, T, K, H], k's own layout
            cache = KVCache(
                k=cache.k.at[batch_idx, :, :, positions].set(k.astype(cache.k.dtype), mode="drop"),
                v=cache.v.at[batch_idx, :, positions].set(v.astype(cache.v.dtype), mode="drop"),
            )
            cache = KVCache(nn.with_logical_constraint(cache.k, CACHE_AXES.k),
                            nn.with_logical_constraint(cache.v, CACHE_AXES.v))
            keys, values = cache.k.astype(dt), cache.v.astype(dt)
            slots = jnp.arange(keys.shape[3])  # [S]
            valid = (slots[None, None, :] <= positions[:, :, None]) & (slots >= self.first_slot)  # [B, T, S]

        G = N // K
        # queries of a KV head as the rows of one matmul: [B, K, T*G, H] (head n = k * G + g)
        qg = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
        scores = jnp.matmul(qg, keys, preferred_element_type=jnp.float32) / math.sqrt(H)  # [B, K, T*G, S]
        valid = jnp.repeat(valid, G, axis=1)[:, None]  # [B, 1, T*G, S]
        scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.matmul(probs, values)  # [B, K, T*G, H]
        out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
        if platform() == "cpu":  # one [D, N*H] matrix (a bitcast of wo): contracting (N, H) as two axes, XLA:CPU
            # transposed and copied all of wo in every layer of every decode step (+15% of a SmolLM2 step's bytes)
            y = linear(out.reshape(B, T, N * H), wo.reshape(D, N * H), dt)
        else:  # on a TPU the reshape is a copy of wo ((8, 128) tiles over (N, H) are not tiles over (D, N*H)):
            y = jnp.einsum("...NH,DNH->...D", out, wo.astype(dt))  # +34 MB a layer per Qwen3-8B verify step
        return y, cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, F = cfg.hidden_size, cfg.intermediate_size
        gate = param_with_axes(self, "gate", (F, D), ("mlp", "embed"))
        up = param_with_axes(self, "up", (F, D), ("mlp", "embed"))
        down = param_with_axes(self, "down", (D, F), ("embed", "mlp"))
        h = jax.nn.silu(linear(x, gate, dt)) * linear(x, up, dt)  # [B, T, F]
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return linear(h, down, dt)


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)). first_slot: `Attention`'s."""

    cfg: TransformerConfig
    first_slot: int = 0

    @nn.compact
    def __call__(self, x, cos, sin, positions, cache, segment_ids=None):
        cfg = self.cfg
        h, cache = Attention(cfg, self.first_slot, name="attn")(
            RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="attn_norm")(x), cos, sin, positions, cache, segment_ids
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache


class Transformer(nn.Module):
    """The trunk. `__call__` gives normed hidden states; `logits` applies the LM head."""

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = param_with_axes(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = [Block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param_with_axes(self, "lm_head", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))

    def __call__(self, tokens, positions, cache=None, segment_ids=None):
        """tokens, positions [B, T] int32; cache: tuple of KVCache or None (full causal forward).

        Returns (hidden [B, T, D] after the final norm, i.e. what the LM head sees; updated cache).
        segment_ids [B, T] (optional, cache-free path only) keeps packed sequences apart.
        """
        x = self.embed(tokens)
        cos, sin = rope_tables(self.cfg, positions)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, positions, None if cache is None else cache[i], segment_ids)
            new_cache.append(layer_cache)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def embed(self, tokens):
        """tokens [...] -> embeddings [..., D] in the compute dtype."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.compute_dtype)

    def logits(self, hidden):
        """hidden [..., D] -> logits [..., V] in float32."""
        w = self.embedding if self.cfg.tie_word_embeddings else self.lm_head  # [V, D]
        return vocab_logits(hidden, w, self.cfg.compute_dtype)


# Rows for which `linear` takes the weight-on-the-left dot on CPU (see there).
FEW_ROWS = (2, 64)


def linear(x, w, compute_dtype=jnp.float32, out_dtype=None):
    """x [..., I] and a weight stored [O, I] (as checkpoints store it) -> x W^T [..., O], in compute_dtype
    or, given out_dtype, accumulated and returned in out_dtype.

    On XLA:CPU a dot of a few rows against a [I, O] matrix, or against [O, I] contracted as x W^T, runs
    at 2-3x the time of reading W (`benchmarks/few_row_linear.py`: 20.6 ms at 4 rows where 1 row takes
    7.7); written as (W x^T)^T, one dot with W on the left, it reads W near memory speed (9.7 ms). The
    optimization barrier keeps XLA from folding the transpose back into the dot, which would swap the
    operands again. Other row counts use the plain dot, on CPU over x flattened to [rows, I] (its gradient
    ran 16% faster than with [B, T, I]); other platforms (`placement.platform()`) take the einsum as written.
    """
    rows = math.prod(x.shape[:-1])
    w = w.astype(compute_dtype)
    if platform() != "cpu":
        return jnp.einsum("...I,OI->...O", x, w, preferred_element_type=out_dtype)
    flat = x.reshape(rows, x.shape[-1]).astype(compute_dtype)  # 2-D: the gradient's dots are 2-D too (16% faster)
    if FEW_ROWS[0] <= rows <= FEW_ROWS[1]:
        out = jax.lax.optimization_barrier(jnp.einsum("OI,RI->OR", w, flat, preferred_element_type=out_dtype)).T
    else:
        out = jnp.einsum("RI,OI->RO", flat, w, preferred_element_type=out_dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])


def vocab_logits(hidden, w_vocab, compute_dtype=jnp.float32):
    """hidden [..., D] and one row per vocabulary entry w_vocab [V, D] -> logits [..., V] in float32.

    The one definition of the LM head's product (the model, the losses, the draft heads, the learner):
    `linear` with float32 accumulation. On CPU its few-row path is what a verify step's K+1 positions
    and a small batch need; the fused multiply-reduce used before was no faster for the [V, D] head
    (`benchmarks/lm_head.py`) and, for the draft heads' gathered [Vd, D] rows inside the decode loop,
    XLA materialised W broadcast over the rows ([4096, 8, 576] at batch 8) and took ~10 ms per draft.
    """
    return linear(hidden, w_vocab, compute_dtype, out_dtype=jnp.float32)


def init_params(cfg: TransformerConfig, key: jax.Array) -> dict:
    """Random parameters (plain arrays, logical-axis boxes removed) for tests and tiny runs."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(cfg).init(key, tokens, tokens)
    variables = nn.meta.unbox(variables)
    return variables["params"]


def logical_axes(cfg: TransformerConfig) -> dict:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs shaped like params."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens))
    return nn.get_partition_spec(abstract)["params"]
