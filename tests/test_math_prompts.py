"""The built-in math problems: deterministic per seed, integer answers that are right, graded by the RL env."""

import re

import numpy as np

from bebop_jax.math_prompts import INSTRUCTION, make_problem


def _solve(question: str) -> int:
    """An independent solver for the templates, from the question text alone."""
    q = question.replace(INSTRUCTION, "")
    nums = [int(n) for n in re.findall(r"-?\d+", q)]
    if "remainder" in q:
        return nums[0] % nums[1]
    if "Solve for x" in q:
        a, b, c = nums[0], nums[1], nums[2]
        b = -b if " - " in q else b
        return (c - b) // a
    if "times" in q:
        return nums[0] * nums[1]
    if "gives away" in q:
        return nums[0] + nums[1] - nums[2]
    if " - " in q:
        return nums[0] - nums[1]
    return sum(nums)


def test_problems_are_deterministic_and_answers_right():
    a = [make_problem(np.random.default_rng(3)) for _ in range(1)]
    b = [make_problem(np.random.default_rng(3)) for _ in range(1)]
    assert a == b
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(300):
        question, answer = make_problem(rng)
        assert question.endswith(INSTRUCTION) and int(answer) == _solve(question), question
        kinds.add(question.split()[0] + question.split()[2])
    assert len(kinds) >= 5  # the templates all occur


def test_the_rl_grader_accepts_the_instructed_format():
    from bebop_jax.rl.environments import grade

    rng = np.random.default_rng(1)
    question, answer = make_problem(rng)
    assert grade(f"Let me think. Answer: {answer}", answer)[0] == 1.0
    assert grade(f"Answer: {int(answer) + 1}", answer)[0] == 0.0


def test_easy_level_is_one_small_operation_and_its_answers_are_right():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        question, answer = make_problem(rng, "easy")
        nums = [int(n) for n in re.findall(r"-?\d+", question.replace(INSTRUCTION, ""))]
        assert len(nums) == 2 and all(0 < n < 20 for n in nums), question
        assert int(answer) == _solve(question), question
        kinds.add(question.split()[3])
    assert kinds == {"+", "-", "times"}


def test_unknown_level_is_refused_with_the_choices():
    import pytest

    from bebop_jax.rl.environments import MathEnv

    with pytest.raises(ValueError, match="easy"):
        make_problem(np.random.default_rng(0), "hard")
    with pytest.raises(ValueError, match="grade"):
        MathEnv(level="hard")
    env = MathEnv(level="easy")
    task = env.sample_tasks(np.random.default_rng(0), 1)[0]
    assert len(re.findall(r"\d+", task.messages[0]["content"])) == 2
