"""A tiny random chat model on disk (char-level tokenizer, ChatML-like template) and a toy environment,
for RL loop tests that must run the real actor, learner and checkpoints in seconds."""

from __future__ import annotations

import dataclasses
import string

import jax
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from bebop_jax.model.tokenizer import TextTokenizer, save_tokenizer
from bebop_jax.model.transformer import TransformerConfig, init_params
from bebop_jax.model.weights import save_hf
from bebop_jax.rl.environments import StepResult, Task

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


def make_tiny_chat_model(path: str, seed: int = 0) -> None:
    chars = list(string.digits + string.ascii_letters + " <>+-*/=?.:,!")
    vocab = {"<|end|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|end|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|end|>"])
    cfg = TransformerConfig(family="llama", vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
    params["embedding"] = params["embedding"] * 6  # peaked enough that samples differ in reward
    save_hf(path, cfg, params, eos_token_id=0)
    save_tokenizer(path, TextTokenizer(tok, None, (0,), TEMPLATE))


@dataclasses.dataclass
class DigitsEnv:
    """Reward = the fraction of digit characters in the answer (a dense, verifiable toy reward)."""

    name: str = "digits"
    max_turns: int = 1

    def sample_tasks(self, rng: np.random.Generator, n: int) -> list[Task]:
        return [Task(task_id=f"t{int(rng.integers(1000))}",
                     messages=({"role": "user", "content": f"say {int(rng.integers(100))}"},), answer=None, tests=None)
                for _ in range(n)]

    def step(self, task, messages, completion: str) -> StepResult:
        reward = sum(c.isdigit() for c in completion) / max(len(completion), 1)
        return StepResult(reward=reward, done=True,
                          messages=tuple(messages) + ({"role": "assistant", "content": completion},),
                          info={"correct": reward > 0.2, "reason": "ok"})
