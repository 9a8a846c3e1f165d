"""Tokenizers: rebuilt from GGUF metadata, or read from an HF directory, with the chat template.

GGUF files of the `gpt2` tokenizer model (byte-level BPE: SmolLM2, Qwen, Llama-3) carry the vocabulary,
merges, token types and a Jinja chat template; HF `tokenizers` rebuilds the same tokenizer from them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jinja2
import jinja2.sandbox
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (llama.cpp's names for the HF pre-tokenizers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@dataclasses.dataclass
class TextTokenizer:
    """Encodes and decodes text; renders chat messages with the model's own template."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages [{'role', 'content'}] -> prompt text, as the HF chat template renders it."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; run without --chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        token = lambda i: self.tokenizer.id_to_token(i) if i is not None else ""  # noqa: E731
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_token_id), eos_token=token(self.eos_token_ids[0]),
        )

    def encode_prompt(self, text: str, chat: bool) -> list[int]:
        """A user prompt as token ids; with `chat`, wrapped as one user turn of the chat template."""
        if chat:
            text = self.apply_chat_template([{"role": "user", "content": text}])
        return self.encode(text)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def tokenizer_from_gguf(reader) -> TextTokenizer:
    """Rebuilds the byte-level BPE tokenizer stored in a GGUF file's metadata."""
    from bebop_jax.model.weights import gguf_field

    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp token type CONTROL; 4 = USER_DEFINED
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == control]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    tok.add_special_tokens(specials)
    if added:
        tok.add_tokens(added)
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return TextTokenizer(tok, None if bos is None else int(bos), (int(eos),),
                         gguf_field(reader, "tokenizer.chat_template"))


def tokenizer_from_hf_dir(path: str) -> TextTokenizer | None:
    """tokenizer.json (+ tokenizer_config.json for the chat template and special ids), or None."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    tok = Tokenizer.from_file(file)
    conf = {}
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            conf = json.load(f)

    def token_id(name):
        value = conf.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return None if value is None else tok.token_to_id(value)

    eos = token_id("eos_token")
    return TextTokenizer(tok, token_id("bos_token"), () if eos is None else (eos,), conf.get("chat_template"))


def save_tokenizer(path: str, tokenizer: TextTokenizer) -> None:
    """Writes tokenizer.json and tokenizer_config.json (chat template, bos/eos) into an HF directory."""
    os.makedirs(path, exist_ok=True)
    tokenizer.tokenizer.save(os.path.join(path, "tokenizer.json"))
    name = lambda i: None if i is None else tokenizer.tokenizer.id_to_token(i)  # noqa: E731
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tokenizer.bos_token_id),
            "eos_token": name(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None,
            "chat_template": tokenizer.chat_template}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
