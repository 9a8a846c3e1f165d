"""The built-in general chat prompts: deterministic per seed, varied, and a `data.prompts` source of their own."""

import numpy as np

from bebop_jax import chat_prompts
from bebop_jax import data as data_lib


def test_chat_prompts_are_deterministic_varied_and_filled():
    draw = lambda seed: [chat_prompts.make_prompt(np.random.default_rng([seed, i])) for i in range(2000)]  # noqa: E731
    prompts = draw(0)
    assert prompts == draw(0) and prompts != draw(1)
    assert len(set(prompts)) > 900  # ~2.9k distinct prompts in all: 2000 draws repeat few
    assert not any("{" in p or "}" in p for p in prompts)
    openings = {" ".join(p.split()[:2]) for p in prompts}
    assert len(openings) >= 15  # the templates all occur, not a few of them


def test_chat_is_a_prompt_source_in_a_mix():
    mixed = data_lib.load_prompts("math:easy,chat", 40, seed=0)
    chat = [m[0]["content"] for m in mixed[1::2]]
    math = [m[0]["content"] for m in mixed[0::2]]
    assert all(m[0]["role"] == "user" and len(m) == 1 for m in mixed)
    assert chat == [m[0]["content"] for m in data_lib.load_prompts("math:easy,chat", 40, seed=0)[1::2]]
    assert all(any(c.isdigit() for c in q) for q in math) and not any(c.isdigit() for q in chat for c in q)
    assert len(set(chat)) == len(chat)
