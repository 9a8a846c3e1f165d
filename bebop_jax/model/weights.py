"""Weights in and out: HF safetensors (Llama, Qwen2, Qwen3) and GGUF (llama.cpp) files.

One table, `hf_tensor_map`, names every HF tensor with its place in our parameter tree and the
reshape between the two layouts; import and export both walk it, so they cannot drift apart.
A checkpoint whose tensors are missing, unexpected or mis-shaped raises `WeightsError` listing each
one with the expected and found shape, before anything is returned (nothing half-loaded).

GGUF: tensors are dequantized with `gguf.quants.dequantize` and renamed to HF names; llama.cpp's
permutation of the Q/K rows (for its interleaved RoPE) is undone, so the HF rotate-half RoPE applies.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from bebop_jax.model.transformer import RopeScaling, TransformerConfig


class WeightsError(ValueError):
    """A checkpoint that does not match the architecture it declares."""


# ---------------------------------------------------------------------------------------------
# Name and layout table


class Layout:
    """The map from an HF tensor to ours: HF's [out, in] matrices are kept as they are, with at most one
    axis split into (heads, head_dim). Called on a whole array it converts it; `read` reads one block of
    ours through a reader of HF blocks, so a device's shard costs only the HF rows and columns it holds."""

    def __init__(self, split_axis: int | None = None, head_dim: int = 1):
        self.split_axis, self.head_dim = split_axis, head_dim

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if self.split_axis is None:
            return a
        ax = self.split_axis
        return a.reshape(a.shape[:ax] + (a.shape[ax] // self.head_dim, self.head_dim) + a.shape[ax + 1:])

    def shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Our shape of an HF tensor of `hf_shape`."""
        shape = tuple(hf_shape)
        if self.split_axis is None:
            return shape
        ax = self.split_axis
        return shape[:ax] + (shape[ax] // self.head_dim, self.head_dim) + shape[ax + 1:]

    def read(self, read_hf: Callable[[tuple[slice, ...]], np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
        """Block `index` (contiguous slices over our axes, starts and stops given) of ours, as float32."""
        index, sub = list(index), None
        if self.split_axis is not None:  # (heads, head_dim) -> the rows heads * head_dim of one HF axis
            ax, h = self.split_axis, self.head_dim
            heads, sub = index[ax], index[ax + 1]
            index[ax:ax + 2] = [slice(heads.start * h, heads.stop * h)]
        a = self(np.asarray(read_hf(tuple(index)), np.float32))
        if sub is not None:
            a = a[(slice(None),) * (self.split_axis + 1) + (sub,)]
        return a


def hf_tensor_map(cfg: TransformerConfig) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...], Layout, Callable]]:
    """Yields (hf_name, param_path, hf_shape, to_ours, to_hf) for every tensor of the architecture."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = Layout()

    def heads_out(heads):  # HF [heads*H, D] <-> ours [heads, H, D]
        return Layout(split_axis=0, head_dim=H), lambda a: a.reshape(heads * H, D)

    yield "model.embed_tokens.weight", ("embedding",), (V, D), same, same
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", (f"layers_{i}",)
        attn = ours + ("attn",)
        yield f"{hf}.self_attn.q_proj.weight", attn + ("wq",), (N * H, D), *heads_out(N)
        yield f"{hf}.self_attn.k_proj.weight", attn + ("wk",), (K * H, D), *heads_out(K)
        yield f"{hf}.self_attn.v_proj.weight", attn + ("wv",), (K * H, D), *heads_out(K)
        yield (f"{hf}.self_attn.o_proj.weight", attn + ("wo",), (D, N * H),
               Layout(split_axis=1, head_dim=H), lambda a: a.reshape(D, N * H))
        if cfg.qkv_bias:
            for name, heads in (("q", N), ("k", K), ("v", K)):
                yield (f"{hf}.self_attn.{name}_proj.bias", attn + (f"b{name}",), (heads * H,),
                       Layout(split_axis=0, head_dim=H), lambda a, h=heads: a.reshape(h * H))
        if cfg.qk_norm:
            yield f"{hf}.self_attn.q_norm.weight", attn + ("q_norm", "scale"), (H,), same, same
            yield f"{hf}.self_attn.k_norm.weight", attn + ("k_norm", "scale"), (H,), same, same
        yield f"{hf}.mlp.gate_proj.weight", ours + ("mlp", "gate"), (F, D), same, same
        yield f"{hf}.mlp.up_proj.weight", ours + ("mlp", "up"), (F, D), same, same
        yield f"{hf}.mlp.down_proj.weight", ours + ("mlp", "down"), (D, F), same, same
        yield f"{hf}.input_layernorm.weight", ours + ("attn_norm", "scale"), (D,), same, same
        yield f"{hf}.post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (D,), same, same
    yield "model.norm.weight", ("final_norm", "scale"), (D,), same, same
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head",), (V, D), same, same


class LazyTensors(Mapping):
    """Named tensors read one at a time: shapes known up front (file headers), each tensor read as
    float32 numpy when indexed, so a loader holds one tensor in host memory, not the checkpoint;
    `read_block` reads a block of one (safetensors: only those bytes), `bytes_read` counts what was read."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray],
                 read_block: Callable[[str, tuple[slice, ...]], np.ndarray] | None = None):
        self.shapes, self._read, self.bytes_read = shapes, read, 0
        self._read_block, self._last = read_block or self._block_of_whole, (None, None)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        out = np.asarray(self._read(name), np.float32)
        self.bytes_read += out.size * 4
        return out

    def read_block(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._read_block(name, index), np.float32)

    def _block_of_whole(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Without a block reader (GGUF: quantised blocks), the last tensor read stays on the host for
        the blocks of the other devices."""
        if self._last[0] != name:
            self._last = (None, None)  # one tensor on the host at a time
            self._last = (name, self[name])
        return self._last[1][index]

    def __contains__(self, name) -> bool:  # from the headers: Mapping's default would read the tensor
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _shape(tensors, name: str) -> tuple[int, ...]:
    return tuple(tensors.shapes[name]) if isinstance(tensors, LazyTensors) else tuple(np.shape(tensors[name]))


def params_from_hf_tensors(cfg: TransformerConfig, tensors, source: str = "checkpoint", place=None) -> dict:
    """HF-named tensors (a dict or `LazyTensors`) -> our parameter tree. Raises WeightsError on any
    mismatch, checked from the shapes before any tensor is read.

    place(path, shape, read_block) -> leaf (optional): builds each parameter (our `shape`) from blocks,
    read_block(index) -> the float32 block of ours at `index` (a tuple of slices; e.g. a device's shard
    on a mesh, so each process reads only what its devices hold); by default float32 numpy. Tensors are
    read and converted one at a time.
    """
    problems, expected = [], {}
    for hf_name, path, shape, to_ours, _ in hf_tensor_map(cfg):
        expected[hf_name] = (path, to_ours)
        if hf_name not in tensors:
            problems.append(f"missing tensor {hf_name}: expected shape {shape}")
        elif _shape(tensors, hf_name) != shape:
            problems.append(f"tensor {hf_name}: expected shape {shape}, found {_shape(tensors, hf_name)}")
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for name in sorted(set(tensors) - set(expected) - ignorable):
        if "rotary_emb.inv_freq" not in name and not name.startswith("mtp."):  # MTP heads: load_mtp_heads
            problems.append(f"unexpected tensor {name} with shape {_shape(tensors, name)}")
    if problems:
        raise WeightsError(f"{source} does not match the {cfg.family} architecture it declares:\n  " + "\n  ".join(problems))
    params = {}
    for hf_name, (path, to_ours) in expected.items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if place is None:
            node[path[-1]] = np.ascontiguousarray(to_ours(np.asarray(tensors[hf_name], dtype=np.float32)))
            continue
        shape = to_ours.shape(_shape(tensors, hf_name))
        if isinstance(tensors, LazyTensors):
            block = functools.partial(to_ours.read, functools.partial(tensors.read_block, hf_name))
        else:
            block = functools.partial(to_ours.read, lambda index, a=tensors[hf_name]: np.asarray(a)[index])
        node[path[-1]] = place(path, shape, block)
    return params


def params_to_hf_tensors(cfg: TransformerConfig, params: dict) -> dict[str, np.ndarray]:
    """Our parameter tree -> HF-named float32 numpy tensors."""
    out = {}
    for hf_name, path, shape, _, to_hf in hf_tensor_map(cfg):
        node = params
        for part in path:
            node = node[part]
        try:
            out[hf_name] = np.ascontiguousarray(to_hf(np.asarray(node, dtype=np.float32)))
        except ValueError:
            out[hf_name] = None
        if out[hf_name] is None or out[hf_name].shape != shape:
            raise WeightsError(f"parameter {'/'.join(path)} has shape {np.shape(node)}; "
                               f"it cannot be written as {hf_name} of shape {shape}")
    return out


# ---------------------------------------------------------------------------------------------
# HF config.json


_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_hf(hf: dict, dtype: str = "float32") -> TransformerConfig:
    """Architecture from an HF `config.json` dict (Llama, Qwen2, Qwen3)."""
    family = hf.get("model_type")
    if family not in _FAMILIES:
        raise WeightsError(f"model_type {family!r} is not supported; supported: {', '.join(_FAMILIES)}")
    num_heads = hf["num_attention_heads"]
    rope_scaling = None
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 4 / 5 spelling
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type == "llama3":
        rope_scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                                   int(rs["original_max_position_embeddings"]))
    elif rope_type not in (None, "default"):
        raise WeightsError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
    return TransformerConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=float(hf.get("rope_theta", rs.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        dtype=dtype,
    )


def config_to_hf(cfg: TransformerConfig, bos_token_id: int | None = None, eos_token_id=None) -> dict:
    """An HF `config.json` dict that transformers loads as the same architecture."""
    hf = {
        "architectures": [_FAMILIES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": "float32",
    }
    if cfg.family == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = False
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                              "high_freq_factor": rs.high_freq_factor,
                              "original_max_position_embeddings": rs.original_max_position_embeddings}
    if bos_token_id is not None:
        hf["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    return hf


# ---------------------------------------------------------------------------------------------
# safetensors files


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
    elif os.path.isfile(single):
        files = [single]
    else:
        raise WeightsError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    for file in files:
        if not os.path.isfile(file):
            raise WeightsError(f"shard {file} listed in the index does not exist")
    return files


def read_safetensors_dir(path: str) -> LazyTensors:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`,
    read lazily (headers now, each tensor as float32 when indexed; bf16 included, through JAX)."""
    from safetensors import SafetensorError, safe_open

    where, shapes = {}, {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    where[name], shapes[name] = file, tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file} is not a readable safetensors file ({e})") from None

    def read(name: str) -> np.ndarray:
        with safe_open(where[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)

    def read_block(name: str, index: tuple[slice, ...]) -> np.ndarray:  # reads only the block's bytes
        with safe_open(where[name], framework="flax") as f:
            out = np.asarray(f.get_slice(name)[index], dtype=np.float32)
        tensors.bytes_read += out.size * 4
        return out

    tensors = LazyTensors(shapes, read, read_block)
    return tensors


def load_hf(path: str, dtype: str = "float32", place=None) -> tuple[TransformerConfig, dict]:
    """(architecture, params) from an HF directory with config.json and safetensors weights, one tensor
    at a time; `place` as in `params_from_hf_tensors` (it may be a function of the architecture:
    `place(cfg)` returning the per-parameter function)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise WeightsError(f"{path} has no config.json")
    with open(config_file) as f:
        cfg = config_from_hf(json.load(f), dtype)
    return cfg, params_from_hf_tensors(cfg, read_safetensors_dir(path), source=path,
                                       place=None if place is None else place(cfg))


def save_hf(path: str, cfg: TransformerConfig, params: dict, *, bos_token_id=None, eos_token_id=None,
            extra_tensors: dict[str, np.ndarray] | None = None, max_shard_bytes: int | None = None) -> None:
    """Writes config.json and model.safetensors (or shards plus the index when over max_shard_bytes)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, bos_token_id, eos_token_id), f, indent=2)
    tensors = params_to_hf_tensors(cfg, params) | dict(extra_tensors or {})
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = arr, size + arr.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------------------------
# GGUF


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def gguf_field(reader, key: str, default=None):
    """One metadata value of a GGUFReader (scalars, strings and arrays), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def undo_llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's Q/K row permutation: w [n_head*H, D] back to HF's rotate-half order."""
    out_dim, in_dim = w.shape
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def load_gguf(path: str, dtype: str = "float32", place=None):
    """(architecture, params, GGUFReader) from a llama-architecture GGUF file, dequantized to f32 one
    tensor at a time; `place` as in `load_hf`."""
    import gguf

    if not os.path.isfile(path):
        raise WeightsError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
        arch = gguf_field(reader, "general.architecture")
    except (ValueError, OSError, IndexError, KeyError) as e:  # what gguf raises on a truncated or foreign file
        raise WeightsError(f"{path} is not a readable GGUF file ({e})") from None
    if arch not in ("llama", "qwen2", "qwen3"):
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    get = lambda k, d=None: gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_head = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = len(gguf_field(reader, "tokenizer.ggml.tokens"))
    cfg = TransformerConfig(
        family=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // n_head))),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        max_position_embeddings=int(get("context_length", 4096)),
        dtype=dtype,
    )
    by_name, shapes = {}, {}
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            hf_name = "model.embed_tokens.weight"
        elif t.name == "output.weight":
            hf_name = "lm_head.weight"
        elif t.name == "output_norm.weight":
            hf_name = "model.norm.weight"
        else:
            _, layer, kind, suffix = t.name.split(".")
            if kind not in _GGUF_LAYER_NAMES:
                raise WeightsError(f"{path}: unknown GGUF tensor {t.name}")
            hf_name = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
        by_name[hf_name], shapes[hf_name] = t, tuple(int(d) for d in reversed(t.shape))  # GGUF: fastest dim first

    def read(hf_name: str) -> np.ndarray:  # dequantised one tensor at a time (the data is memory-mapped)
        t = by_name[hf_name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shapes[hf_name])
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            w = undo_llama_cpp_permute(w, n_head if kind == "attn_q" else n_kv)
        return w

    return cfg, params_from_hf_tensors(cfg, LazyTensors(shapes, read), source=path,
                                       place=None if place is None else place(cfg)), reader
