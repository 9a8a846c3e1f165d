"""RL environments behind one protocol: a task's chat messages -> completion -> reward, multi-turn capable.

- `MathEnv`: the built-in generator of `bebop_jax.math_prompts` (level `grade` or `easy`), or a GSM8K-format JSONL (`question`,
  `answer` whose final number follows `####`); reward 1 when the stated answer equals the reference as
  a number. Answer extraction prefers the last `\\boxed{...}`, then the last "answer ... N", then the
  last number, and tolerates `$`, thousands commas, decimals and a trailing period. An optional
  held-out split keyed by a hash of the question (`split="train" | "test"`) works for both sources.
- `CodeEnv`: a JSONL of `{"prompt", "tests", optional "entry_point"}` (HumanEval style: with an entry
  point the program ends with `check(<entry_point>)`), or five built-in problems; the code of the
  completion (its last ```python block, else the whole text) runs with the tests appended in
  `sandbox.run_python`; reward 1 iff the program runs to its end (every assert passes).
- `ToolEnv`: multi-turn calculator use: `<calc>EXPRESSION</calc>` is evaluated by an `ast` walker
  (numbers, + - * / // % ** and parentheses, with size limits, never `eval`) and answered with a user
  message `<result>VALUE</result>`; a reply without a call is the final answer. The actor should stop
  generation at `CALC_STOP`, or text after the call is kept in the conversation.
`make_environment(name, **kwargs)` builds one by name. A step never raises for a bad completion: every
failure is a reward of 0 with a reason in `info` (vocabulary in `REASONS`).
Left out on purpose: partial credit, LLM or fuzzy grading, symbolic math answers (fractions, LaTeX
expressions), stdin/stdout-style code problems, tools other than the calculator.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
import os
import re
import zlib
from fractions import Fraction
from typing import Protocol

import numpy as np

from bebop_jax.math_prompts import INSTRUCTION, LEVELS, make_problem
from bebop_jax.rl.sandbox import REASONS as SANDBOX_REASONS, Limits, run_python

REASONS = {
    "ok": "correct",
    "wrong": "an answer that differs from the reference",
    "no_answer": "no number in the answer",
    "tool_call": "the turn called the calculator; the episode goes on",
    "max_turns": "still calling the calculator at the last turn",
    "no_code": "an empty program",
    "tests_failed": "an uncaught exception, a failed assert included",
    **{k: v for k, v in SANDBOX_REASONS.items() if k not in ("ok", "error")},
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One prompt of an environment."""

    task_id: str
    messages: tuple[dict, ...]  # the chat so far, [{"role", "content"}]; the actor applies the chat template
    answer: str | None = None   # reference number (math, tool)
    tests: str | None = None    # unit-test source (code)


@dataclasses.dataclass(frozen=True)
class StepResult:
    reward: float               # in [0, 1]
    done: bool                  # False: the episode goes on from `messages`
    messages: tuple[dict, ...]  # the chat after this turn: the completion and any tool result included
    info: dict                  # {"correct": bool, "reason": a key of REASONS, ...}


class Environment(Protocol):
    name: str
    max_turns: int

    def sample_tasks(self, rng: np.random.Generator, n: int) -> list[Task]: ...

    def step(self, task: Task, messages: tuple[dict, ...], completion: str) -> StepResult: ...


def _assistant(messages, completion: str) -> tuple[dict, ...]:
    return (*messages, {"role": "assistant", "content": completion})


def _read_jsonl(path: str, keys: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) of each non-blank line; every row must be an object with `keys`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not JSON ({e})") from None
            if not isinstance(row, dict) or any(k not in row for k in keys):
                raise ValueError(f"{path} line {line_no}: expected an object with keys {keys}")
            rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path}: no problems")
    return rows


# ---- numeric answers ---------------------------------------------------------------------------------

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_NUMBER = re.compile(_NUM)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_STATED = re.compile(r"answer\b[^\d\n]{0,30}?(" + _NUM + ")", re.IGNORECASE)


def parse_number(text: str) -> str | None:
    """The first number in `text` without `$` and commas ('$1,234.50' -> '1234.50'), or None."""
    found = _NUMBER.search(text)
    return found.group().replace("$", "").replace(",", "") if found else None


def extract_answer(completion: str) -> str | None:
    """The stated answer: in the last \\boxed{}, else the last "answer ... N", else the last number."""
    text = completion.replace("\u2212", "-").replace("{,}", ",")
    for candidates in (_BOXED.findall(text), _STATED.findall(text), _NUMBER.findall(text)):
        numbers = [n for n in map(parse_number, candidates) if n is not None]
        if numbers:
            return numbers[-1]
    return None


def gsm8k_answer(solution: str) -> str | None:
    """The final number of a GSM8K solution, after its last '####' ('#### 1,234.' -> '1234'), or None."""
    _, sep, final = solution.rpartition("####")
    return parse_number(final.replace(" ", "")) if sep else None


def grade(completion: str, answer: str) -> tuple[float, dict]:
    """(reward, info) of a final answer against the reference number."""
    got = extract_answer(completion)
    if got is None:
        return 0.0, {"correct": False, "reason": "no_answer", "extracted": None}
    correct = Fraction(got) == Fraction(answer)
    return float(correct), {"correct": correct, "reason": "ok" if correct else "wrong", "extracted": got}


# ---- math --------------------------------------------------------------------------------------------


def _in_split(text: str, split: str, test_fraction: float) -> bool:
    """A fixed split by question: the test part is the questions whose hash falls below the fraction."""
    return split == "all" or (zlib.crc32(text.encode()) % 10_000 < test_fraction * 10_000) == (split == "test")


def _load_gsm8k(path: str) -> list[tuple[str, str]]:
    problems = []
    for line_no, row in _read_jsonl(path, ("question", "answer")):
        answer = gsm8k_answer(str(row["answer"]))
        if answer is None:
            raise ValueError(f"{path} line {line_no}: the answer has no number after '####'")
        problems.append((f"{str(row['question']).strip()} {INSTRUCTION}", answer))
    return problems


class MathEnv:
    """Single-turn verifiable math: the built-in generator or a GSM8K-format JSONL."""

    name = "math"
    max_turns = 1

    def __init__(self, source: str = "builtin", split: str = "all", test_fraction: float = 0.1, level: str = "grade"):
        if split not in ("all", "train", "test") or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"split must be all|train|test and 0 < test_fraction < 1, got {split!r}, {test_fraction}")
        if level not in LEVELS:
            raise ValueError(f"math level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.split, self.test_fraction, self.level = split, test_fraction, level
        self.problems = None
        if source != "builtin":
            self.problems = [p for p in _load_gsm8k(source) if _in_split(p[0], split, test_fraction)]
            if not self.problems:
                raise ValueError(f"{source}: no problems in split {split!r}")

    def _problem(self, rng: np.random.Generator) -> tuple[str, str]:
        if self.problems is not None:
            return self.problems[rng.integers(len(self.problems))]
        while True:
            question, answer = make_problem(rng, self.level)
            if _in_split(question, self.split, self.test_fraction):
                return question, answer

    def sample_tasks(self, rng: np.random.Generator, n: int) -> list[Task]:
        tasks = []
        for _ in range(n):
            question, answer = self._problem(rng)
            tasks.append(Task(f"math/{zlib.crc32(question.encode()):08x}",
                              ({"role": "user", "content": question},), answer=answer))
        return tasks

    def step(self, task: Task, messages: tuple[dict, ...], completion: str) -> StepResult:
        reward, info = grade(completion, task.answer)
        return StepResult(reward, True, _assistant(messages, completion), info)


# ---- code --------------------------------------------------------------------------------------------

CODE_INSTRUCTION = "Reply with the complete Python code in one ```python block."
BUILTIN_CODE_PROBLEMS = (  # (name, prompt, tests)
    ("add", "Write a Python function `add(a, b)` that returns the sum of the integers a and b.",
     "assert add(2, 3) == 5\nassert add(-4, 4) == 0\nassert add(10**12, 1) == 10**12 + 1\n"),
    ("is_palindrome", "Write a Python function `is_palindrome(s)` that returns True when the string s reads "
     "the same forwards and backwards, ignoring case.",
     "assert is_palindrome('Level')\nassert is_palindrome('')\nassert not is_palindrome('abca')\n"),
    ("count_vowels", "Write a Python function `count_vowels(s)` that returns how many of the characters of "
     "the string s are vowels (a, e, i, o, u, either case).",
     "assert count_vowels('Hello World') == 3\nassert count_vowels('xyz') == 0\nassert count_vowels('AEIOU') == 5\n"),
    ("fizzbuzz", "Write a Python function `fizzbuzz(n)` that returns a list of the strings for 1..n: 'Fizz' for "
     "multiples of 3, 'Buzz' for multiples of 5, 'FizzBuzz' for both, else the number.",
     "assert fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']\nassert fizzbuzz(15)[-1] == 'FizzBuzz'\n"
     "assert fizzbuzz(0) == []\n"),
    ("second_largest", "Write a Python function `second_largest(nums)` that returns the second largest "
     "distinct value of a list of integers, or None when there is none.",
     "assert second_largest([3, 1, 4, 1, 5]) == 4\nassert second_largest([2, 2]) is None\n"
     "assert second_largest([-1, -7]) == -7\n"),
)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last ```python (or unlabelled) block of the completion, an unclosed one included; else all of it."""
    blocks = [body for label, body in _FENCE.findall(completion) if label.lower() in ("", "python", "python3", "py")]
    return blocks[-1] if blocks else completion


def _load_code(path: str) -> list[tuple[str, str, str]]:
    problems = []
    for line_no, row in _read_jsonl(path, ("prompt", "tests")):
        tests = row["tests"] + (f"\n\ncheck({row['entry_point']})\n" if row.get("entry_point") else "")
        problems.append((f"{os.path.basename(path)}:{line_no}", row["prompt"], tests))
    return problems


class CodeEnv:
    """Single-turn code with unit tests, run in the sandbox."""

    name = "code"
    max_turns = 1

    def __init__(self, source: str = "builtin", limits: Limits = Limits()):
        self.problems = BUILTIN_CODE_PROBLEMS if source == "builtin" else _load_code(source)
        self.limits = limits

    def sample_tasks(self, rng: np.random.Generator, n: int) -> list[Task]:
        tasks = []
        for i in rng.integers(len(self.problems), size=n):
            name, prompt, tests = self.problems[i]
            tasks.append(Task(f"code/{name}", ({"role": "user", "content": f"{prompt} {CODE_INSTRUCTION}"},),
                              tests=tests))
        return tasks

    def step(self, task: Task, messages: tuple[dict, ...], completion: str) -> StepResult:
        code = extract_code(completion)
        if not code.strip():
            return StepResult(0.0, True, _assistant(messages, completion), {"correct": False, "reason": "no_code"})
        result = run_python(f"{code}\n\n{task.tests}", self.limits)
        reason = "tests_failed" if result.reason == "error" else result.reason
        info = {"correct": result.ok, "reason": reason, "wall_s": result.wall_s, "stderr": result.stderr[-500:]}
        return StepResult(float(result.ok), True, _assistant(messages, completion), info)


# ---- tool use: a calculator ----------------------------------------------------------------------------

CALC_STOP = "</calc>"
TOOL_INSTRUCTION = ("You have a calculator. To use it, write <calc>EXPRESSION</calc> with numbers, + - * / // % ** "
                    "and parentheses, and stop; the result comes back as <result>VALUE</result>. When you know "
                    "the answer, reply with 'Answer: <number>' and no calculator call.")
MAX_EXPRESSION_CHARS = 200
MAX_DIGITS = 30  # no operand or result may reach 10**MAX_DIGITS
_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    """An expression the calculator refuses: its message is shown to the model."""


def _checked(value):
    if isinstance(value, complex):
        raise CalcError("the result is not a real number")
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) >= 10**MAX_DIGITS:
        raise CalcError(f"a number has {MAX_DIGITS} digits or more")
    return value


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and right * math.log10(abs(left)) >= MAX_DIGITS:
            raise CalcError(f"a number has {MAX_DIGITS} digits or more")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError(f"a number has {MAX_DIGITS} digits or more") from None
    raise CalcError(f"{type(node).__name__} is not allowed: only numbers, + - * / // % ** and parentheses")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, evaluated safely; CalcError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise CalcError("not an arithmetic expression") from None
    return _evaluate(tree.body)


def _calculator_reply(expression: str) -> str:
    try:
        value = calculate(expression)
    except CalcError as e:
        return f"<result>error: {e}</result>"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"<result>{value if isinstance(value, int) else f'{value:.12g}'}</result>"


def _tool_problem(rng: np.random.Generator) -> tuple[str, int]:
    a, b, c = int(rng.integers(100, 10_000)), int(rng.integers(100, 1000)), int(rng.integers(10, 1000))
    if rng.integers(2):
        return f"What is {a} * {b} - {c}?", a * b - c
    return (f"A warehouse has {b} crates with {a} bolts in each, and {c} loose bolts. "
            "How many bolts are there in all?", a * b + c)


class ToolEnv:
    """Multi-turn arithmetic with a calculator tool."""

    name = "tool"
    stop = CALC_STOP  # the actor cuts each completion after this text (the tool answers, not the model)

    def __init__(self, source: str = "builtin", max_turns: int = 3):
        if source != "builtin" or max_turns < 1:
            raise ValueError(f"ToolEnv has only source='builtin' and needs max_turns >= 1, got {source!r}, {max_turns}")
        self.max_turns = max_turns

    def sample_tasks(self, rng: np.random.Generator, n: int) -> list[Task]:
        tasks = []
        for _ in range(n):
            question, answer = _tool_problem(rng)
            tasks.append(Task(f"tool/{zlib.crc32(question.encode()):08x}",
                              ({"role": "user", "content": f"{TOOL_INSTRUCTION}\n\n{question}"},), answer=str(answer)))
        return tasks

    def step(self, task: Task, messages: tuple[dict, ...], completion: str) -> StepResult:
        messages = _assistant(messages, completion)
        call = _CALL.search(completion)
        if call is None:
            reward, info = grade(completion, task.answer)
            return StepResult(reward, True, messages, info)
        if sum(m["role"] == "assistant" for m in messages) >= self.max_turns:
            return StepResult(0.0, True, messages, {"correct": False, "reason": "max_turns"})
        reply = {"role": "user", "content": _calculator_reply(call.group(1))}
        return StepResult(0.0, False, (*messages, reply), {"correct": False, "reason": "tool_call"})


ENVIRONMENTS = {"math": MathEnv, "code": CodeEnv, "tool": ToolEnv}


def make_environment(name: str, **kwargs) -> Environment:
    """An environment by name ("math", "code", "tool"), built with its keyword arguments."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; expected one of {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name](**kwargs)


def env_options(rl, split: str | None) -> dict:
    """Keyword arguments of the config's environment (its source; the math level; a split if given)."""
    options = {"source": rl.env_source} if rl.env_source else {}
    if rl.environment == "math":
        options["level"] = rl.math_level
    return options if split is None else dict(options, split=split)
