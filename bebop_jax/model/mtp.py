"""Multi-token-prediction (MTP) draft heads, Qwen3-Next / DeepSeek-V3 structure, as vLLM serves them.

Step k = 1..K at origin position t (DESIGN.md, Model):

    h^0_t = the trunk's final hidden state at t, AFTER the final norm (what the LM head sees)
    h^k_t = Norm( Block( W_fc [ RMSNorm_e(E x_{t+k}) ; RMSNorm_h(h^{k-1}_t) ] ) )
    q^k_t = softmax( LMHead(h^k_t) / tau )   drafts x_{t+k+1}

E and LMHead are the trunk's (shared, frozen: they are not in these params). Each MTP layer holds
its own fc, the two pre-fc norms, one transformer Block of the trunk's family and the output norm;
with `num_layers < K` step k uses layer (k - 1) mod num_layers. The Block runs at position t + k
(the position of its input token) and keeps one KV cache per layer, indexed by position like the
trunk's, so at decode step k at origin t writes slot t + k.

Weight names on export: Qwen3-Next's `mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`,
`mtp.layers.0.*`, `mtp.norm` for one layer; with several layers the per-layer tensors are
`mtp.layers.{i}.{fc,pre_fc_norm_embedding,pre_fc_norm_hidden,norm}` (our extension). On import also
DeepSeek-V3's `model.layers.{L+i}.{eh_proj,enorm,hnorm,shared_head.norm}` + the block's own names.
Shape letters as in transformer.py.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.model import weights as weights_lib
from bebop_jax.model.transformer import (Block, KVCache, RMSNorm, TransformerConfig, empty_kv, linear, param_with_axes,
                                         rope_tables)


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Shape of the draft heads: K steps over `num_layers` distinct layers (reused cyclically)."""

    num_steps: int = 3
    num_layers: int = 1

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.num_layers <= self.num_steps:
            raise ValueError(f"num_layers must be in 1..num_steps={self.num_steps}, got {self.num_layers}")

    def layer_of(self, step: int) -> int:
        """Layer index of draft step `step` (1-based)."""
        return (step - 1) % self.num_layers


class MTPLayer(nn.Module):
    """One draft step: fuse the next token's embedding with the previous hidden state, one Block, norm."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, emb, h_prev, positions, cache: KVCache | None = None, segment_ids=None):
        """emb [B,T,D] (E x_{t+k}), h_prev [B,T,D] (h^{k-1}_t), positions [B,T] (t + k) -> (h^k [B,T,D], cache)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D = cfg.hidden_size
        e = RMSNorm(cfg.rms_norm_eps, dt, name="pre_fc_norm_embedding")(emb)
        h = RMSNorm(cfg.rms_norm_eps, dt, name="pre_fc_norm_hidden")(h_prev)
        fc = param_with_axes(self, "fc", (D, 2 * D), ("embed", "mtp_concat"))
        x = linear(jnp.concatenate([e, h], axis=-1), fc, dt)  # [B, T, D], embedding first
        cos, sin = rope_tables(cfg, positions)
        # the first origin (t = 0) writes slot 1: slot 0 holds no key, in training as in decoding
        x, cache = Block(cfg, first_slot=1, name="block")(x, cos, sin, positions, cache, segment_ids)
        return RMSNorm(cfg.rms_norm_eps, dt, name="norm")(x), cache


class MTPHeads(nn.Module):
    """`num_layers` MTPLayers; `step(k, ...)` runs draft step k (1-based) with layer (k-1) mod num_layers."""

    cfg: TransformerConfig
    mtp: MTPConfig

    def setup(self):
        self.layers = [MTPLayer(self.cfg, name=f"layers_{i}") for i in range(self.mtp.num_layers)]

    def __call__(self, emb, h_prev, positions, segment_ids=None):
        """Initialises every layer (flax init entry point); returns step 1's output."""
        outs = [layer(emb, h_prev, positions, None, segment_ids)[0] for layer in self.layers]
        return outs[0]

    def step(self, k: int, emb, h_prev, positions, cache=None, segment_ids=None):
        """Draft step k; step 1 takes the trunk's h^0 through `heads_input`, in training and decoding alike."""
        if k == 1:
            h_prev = heads_input(h_prev)
        return self.layers[self.mtp.layer_of(k)](emb, h_prev, positions, cache, segment_ids)


def init_mtp_params(cfg: TransformerConfig, mtp: MTPConfig, key: jax.Array) -> dict:
    """Random MTP parameters (plain arrays)."""
    x = jnp.zeros((1, 1, cfg.hidden_size), cfg.compute_dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(MTPHeads(cfg, mtp).init(key, x, x, pos))["params"]


def init_mtp_cache(cfg: TransformerConfig, mtp: MTPConfig, batch: int, length: int) -> tuple[KVCache, ...]:
    """One empty KV cache per MTP layer, laid out as the trunk's (`transformer.KVCache`)."""
    return tuple(empty_kv(cfg, batch, length) for _ in range(mtp.num_layers))


def mtp_logical_axes(cfg: TransformerConfig, mtp: MTPConfig) -> dict:
    """Logical axis names of the MTP parameters, as PartitionSpecs shaped like the params."""
    x = jnp.zeros((1, 1, cfg.hidden_size), cfg.compute_dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: MTPHeads(cfg, mtp).init(jax.random.key(0), x, x, pos))
    return nn.get_partition_spec(abstract)["params"]


def vocab_matrix(cfg: TransformerConfig, trunk_params: dict) -> jax.Array:
    """The LM head as W [V, D] (logits = W h): the tied embedding or the untied head."""
    return trunk_params["embedding"] if cfg.tie_word_embeddings else trunk_params["lm_head"]


def heads_input(trunk_hidden: jax.Array) -> jax.Array:
    """h^0 as the heads see it, in training (`trunk_cache` stores it in bf16) and in decoding alike:
    rounded to bf16, in the input's dtype. [..., D] -> [..., D]."""
    return trunk_hidden.astype(jnp.bfloat16).astype(trunk_hidden.dtype)


def teacher_forced_hidden(cfg: TransformerConfig, mtp: MTPConfig, mtp_params: dict, trunk_hidden, embeddings,
                          positions, segment_ids=None) -> list[jax.Array]:
    """All K draft hidden states under teacher forcing, for training and evaluation.

    trunk_hidden [B,T,D]: h^0; embeddings [B,T,D]: E x_t of the same sequence; positions [B,T].
    Returns [h^1, ..., h^K], each [B,T,D]; h^k at index t drafts x_{t+k+1}. Step k takes E x_{t+k},
    the sequence shifted left by k (its last k entries see a zero embedding and must be masked).
    """
    heads = MTPHeads(cfg, mtp)
    out, h = [], trunk_hidden
    for k in range(1, mtp.num_steps + 1):
        emb = jnp.pad(embeddings[:, k:], ((0, 0), (0, k), (0, 0)))  # [B,T,D]: E x_{t+k}
        h, _ = heads.apply({"params": mtp_params}, k, emb, h, positions + k, None, segment_ids, method=MTPHeads.step)
        out.append(h)
    return out


# ---------------------------------------------------------------------------------------------
# Weights: Qwen3-Next `mtp.*` names (export and import), DeepSeek-V3 names (import)


def _layer_tensor_map(cfg: TransformerConfig, mtp: MTPConfig, style: str):
    """Yields (hf_name, path in mtp params, hf_shape, to_ours, to_hf) for the MTP tensors."""
    D = cfg.hidden_size
    block_cfg = dataclasses.replace(cfg, num_layers=1, tie_word_embeddings=True)
    same = weights_lib.Layout()
    for i in range(mtp.num_layers):
        ours = (f"layers_{i}",)
        if style == "deepseek":
            prefix = f"model.layers.{cfg.num_layers + i}"
            names = {"fc": f"{prefix}.eh_proj.weight", "e": f"{prefix}.enorm.weight", "h": f"{prefix}.hnorm.weight",
                     "norm": f"{prefix}.shared_head.norm.weight"}
            block_prefix = prefix
        else:
            single = mtp.num_layers == 1
            base = "mtp" if single else f"mtp.layers.{i}"
            names = {"fc": f"{base}.fc.weight", "e": f"{base}.pre_fc_norm_embedding.weight",
                     "h": f"{base}.pre_fc_norm_hidden.weight", "norm": f"{base}.norm.weight"}
            block_prefix = f"mtp.layers.{i}"
        yield names["fc"], ours + ("fc",), (D, 2 * D), same, same
        yield names["e"], ours + ("pre_fc_norm_embedding", "scale"), (D,), same, same
        yield names["h"], ours + ("pre_fc_norm_hidden", "scale"), (D,), same, same
        yield names["norm"], ours + ("norm", "scale"), (D,), same, same
        for hf_name, path, shape, to_ours, to_hf in weights_lib.hf_tensor_map(block_cfg):
            if not hf_name.startswith("model.layers.0."):
                continue
            yield (hf_name.replace("model.layers.0", block_prefix), ours + ("block",) + path[1:], shape, to_ours, to_hf)


def mtp_params_to_hf_tensors(cfg: TransformerConfig, mtp: MTPConfig, params: dict) -> dict[str, np.ndarray]:
    """MTP params -> Qwen3-Next-named float32 tensors (to write beside the trunk's)."""
    out = {}
    for hf_name, path, shape, _, to_hf in _layer_tensor_map(cfg, mtp, "qwen3_next"):
        node = params
        for part in path:
            node = node[part]
        out[hf_name] = np.ascontiguousarray(to_hf(np.asarray(node, np.float32)))
        if out[hf_name].shape != shape:
            raise weights_lib.WeightsError(f"MTP parameter {'/'.join(path)} has shape {np.shape(node)}, "
                                           f"cannot be written as {hf_name} {shape}")
    return out


def mtp_params_from_hf_tensors(cfg: TransformerConfig, tensors: dict[str, np.ndarray]) -> tuple[MTPConfig, dict]:
    """Finds Qwen3-Next `mtp.*` or DeepSeek-V3 MTP tensors and returns (MTPConfig with K = num_layers, params)."""
    if any(n.startswith("mtp.") for n in tensors):
        style = "qwen3_next"
        layers = {int(n.split(".")[2]) for n in tensors if n.startswith("mtp.layers.")}
    else:
        style = "deepseek"
        layers = {int(n.split(".")[2]) - cfg.num_layers for n in tensors
                  if n.startswith("model.layers.") and n.endswith(".eh_proj.weight")}
    if not layers:
        raise weights_lib.WeightsError("no MTP tensors found (expected Qwen3-Next mtp.* or DeepSeek eh_proj names)")
    mtp = MTPConfig(num_steps=len(layers), num_layers=len(layers))
    problems, params = [], {}
    for hf_name, path, shape, to_ours, _ in _layer_tensor_map(cfg, mtp, style):
        if hf_name not in tensors:
            problems.append(f"missing tensor {hf_name}: expected shape {shape}")
        elif tuple(tensors[hf_name].shape) != shape:
            problems.append(f"tensor {hf_name}: expected shape {shape}, found {tuple(tensors[hf_name].shape)}")
        else:
            node = params
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = np.ascontiguousarray(to_ours(np.asarray(tensors[hf_name], np.float32)))
    if problems:
        raise weights_lib.WeightsError("MTP weights do not match the trunk:\n  " + "\n  ".join(problems))
    return mtp, params
