"""A built-in source of verifiable math problems: `make_problem(rng) -> (question, answer)`.

Two levels, each a few templates with an integer answer, so that a reward is an exact match:
- `grade` (default): grade-school arithmetic (three-term sums, differences up to 1000, products,
  short word problems, linear equations, remainders);
- `easy`: one operation on numbers below 20 (sums, differences, single-digit products). A 135M model
  solves ~10% of these at T=1 and almost none of `grade`: the level at which GRPO gets a signal.
Used as the prompt set of self-distillation (`bebop sample-data`) and by the RL math environment,
which grades answers (`bebop_jax.rl.environments.grade`).
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


def _small_sum(rng):
    a, b = (int(x) for x in rng.integers(1, 20, 2))
    return f"What is {a} + {b}?", a + b


def _small_difference(rng):
    a, b = sorted(int(x) for x in rng.integers(1, 20, 2))
    return f"What is {b} - {a}?", b - a


def _small_product(rng):
    a, b = (int(x) for x in rng.integers(2, 10, 2))
    return f"What is {a} times {b}?", a * b


LEVELS = {"grade": (_sum, _difference, _product, _word, _equation, _remainder),
          "easy": (_small_sum, _small_difference, _small_product)}
INSTRUCTION = "Think step by step, then give the final answer as 'Answer: <number>'."


def make_problem(rng: np.random.Generator, level: str = "grade") -> tuple[str, str]:
    """One problem of `level` (a key of LEVELS): (question with the answer-format instruction, answer as text)."""
    if level not in LEVELS:
        raise ValueError(f"math level must be one of {', '.join(LEVELS)}, got {level!r}")
    templates = LEVELS[level]
    question, answer = templates[rng.integers(len(templates))](rng)
    return f"{question} {INSTRUCTION}", str(answer)
