"""A built-in source of verifiable math problems: `make_problem(rng) -> (question, answer)`.

Grade-school arithmetic in a few templates (sums, differences, products, short word problems, linear
equations, remainders), each with an integer answer, so that a reward is an exact match. Used as the
prompt set of self-distillation (`bebop sample-data`) and by the RL math environment, which grades
answers (`bebop_jax.rl.environments.grade`).
Left out on purpose: fractions, units, multi-step proofs; no answer needs more than an integer.
"""

from __future__ import annotations

import numpy as np

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")
_ITEMS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "shells", "cards")


def _sum(rng):
    a, b, c = (int(x) for x in rng.integers(2, 100, 3))
    return f"What is {a} + {b} + {c}?", a + b + c


def _difference(rng):
    a, b = sorted(int(x) for x in rng.integers(10, 1000, 2))
    return f"What is {b} - {a}?", b - a


def _product(rng):
    a, b = int(rng.integers(2, 30)), int(rng.integers(2, 13))
    return f"What is {a} times {b}?", a * b


def _word(rng):
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    have, buy, give = int(rng.integers(5, 50)), int(rng.integers(2, 30)), int(rng.integers(1, 5))
    q = (f"{name} has {have} {item}. {name} buys {buy} more and then gives away {give}. "
         f"How many {item} does {name} have now?")
    return q, have + buy - give


def _equation(rng):
    x, a, b = int(rng.integers(-20, 21)), int(rng.integers(2, 10)), int(rng.integers(-30, 31))
    sign = "+" if b >= 0 else "-"
    return f"Solve for x: {a}x {sign} {abs(b)} = {a * x + b}.", x


def _remainder(rng):
    a, b = int(rng.integers(20, 500)), int(rng.integers(3, 13))
    return f"What is the remainder when {a} is divided by {b}?", a % b


_TEMPLATES = (_sum, _difference, _product, _word, _equation, _remainder)
INSTRUCTION = "Think step by step, then give the final answer as 'Answer: <number>'."


def make_problem(rng: np.random.Generator) -> tuple[str, str]:
    """One problem: (question text with the answer-format instruction, answer as a decimal string)."""
    question, answer = _TEMPLATES[rng.integers(len(_TEMPLATES))](rng)
    return f"{question} {INSTRUCTION}", str(answer)
