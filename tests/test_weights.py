"""HF import/export: errors that name each bad tensor, sharded checkpoints, and exact round trips."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bebop_jax.model import export_hf, load_model
from bebop_jax.model.weights import WeightsError, load_hf, save_hf, undo_llama_cpp_permute


def _copy_with(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        conf = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(conf, f)
    tensors = edit(dict(load_file(os.path.join(src, "model.safetensors"))))
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def test_bad_tensors_are_each_named_and_nothing_loads(hf_tiny, tmp_path):
    _, path, _ = hf_tiny

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
        t["model.extra.weight"] = np.zeros((2, 2), np.float32)
        return t

    _copy_with(path, tmp_path / "bad", edit)
    with pytest.raises(WeightsError) as e:
        load_hf(str(tmp_path / "bad"))
    msg = str(e.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight: expected shape (48, 32)" in msg
    kv_rows = 2 * (16 if hf_tiny[0] == "qwen3" else 8)
    assert f"tensor model.layers.0.self_attn.k_proj.weight: expected shape ({kv_rows}, 32), found (3, 32)" in msg
    assert "unexpected tensor model.extra.weight with shape (2, 2)" in msg


def test_export_reimport_bit_exact_single_and_sharded(hf_tiny, tmp_path):
    _, path, _ = hf_tiny
    model = load_model(path)
    for name, shard in (("single", None), ("sharded", 20_000)):
        out = str(tmp_path / name)
        export_hf(model, out, max_shard_bytes=shard)
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == (shard is not None)
        again = load_model(out)
        assert again.cfg == model.cfg
        for a, b in zip(jax_leaves(model.params), jax_leaves(again.params)):
            np.testing.assert_array_equal(a, b)


def jax_leaves(params):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_export_loads_in_transformers_with_same_logits(hf_tiny, tmp_path, rng):
    import torch
    from transformers import AutoModelForCausalLM

    _, path, torch_model = hf_tiny
    out = str(tmp_path / "exported")
    export_hf(load_model(path), out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.tensor(rng.randint(0, 64, size=(1, 30)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), torch_model(tokens).logits.numpy(), atol=1e-6)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        load_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a registered model"):
        load_model(str(tmp_path / "nothing"))


def test_llama_cpp_permutation_inverse():
    """llama.cpp's convert script permutes rows as below; our inverse restores the HF order."""
    n_head, head_dim, d = 3, 8, 5
    w = np.arange(n_head * head_dim * d, dtype=np.float32).reshape(n_head * head_dim, d)
    permuted = w.reshape(n_head, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(undo_llama_cpp_permute(permuted, n_head), w)
    assert not np.array_equal(permuted, w)


def test_save_hf_rejects_nothing_silently(hf_tiny, tmp_path):
    """A parameter tree with a wrong shape cannot be exported as if it were fine."""
    _, path, _ = hf_tiny
    cfg, params = load_hf(path)
    params["layers_0"]["mlp"]["up"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightsError, match="layers_0/mlp/up"):
        save_hf(str(tmp_path / "x"), cfg, params)


def test_corrupt_gguf_files_are_one_line_errors(tmp_path):
    from bebop_jax import cli
    from bebop_jax.model import registered_path

    real = registered_path("smollm2-135m-instruct")
    truncated, foreign = tmp_path / "truncated.gguf", tmp_path / "foreign.gguf"
    with open(real, "rb") as f:
        truncated.write_bytes(f.read(1_000_000))  # a download cut short
    foreign.write_bytes(b"not a gguf file at all")
    for path in (truncated, foreign):
        with pytest.raises(WeightsError, match=f"{path} is not a readable GGUF file"):
            load_model(str(path))
        with pytest.raises(SystemExit, match=r"^error: .* is not a readable GGUF file \(.*\)$"):
            cli.main(["generate", "--model", str(path), "--prompt", "hi"])
