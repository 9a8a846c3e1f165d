"""Tests of rl/environments.py and rl/sandbox.py: answer extraction, GSM8K parsing, math, code and tool
rewards, and the sandbox against hostile programs (each ends with reward 0 and its reason, in its limits)."""

import json
import os
import sys
import uuid

import numpy as np
import pytest

from bebop_jax.math_prompts import INSTRUCTION
from bebop_jax.rl import environments as envs
from bebop_jax.rl.sandbox import Limits, run_python

LIMITS = Limits(wall_s=3.0, cpu_s=1, memory_mb=256, output_bytes=1 << 14)


def _user(text):
    return ({"role": "user", "content": text},)


# ---- math --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion,expected", [
    ("The answer is 42.", "42"),
    ("**Answer:** 1,234", "1234"),
    ("So we get \\boxed{42}. Check: 42 * 2 = 84", "42"),
    ("\\boxed{1{,}000}", "1000"),
    ("x = -3", "-3"),
    ("x = \u22125", "-5"),
    ("Answer: $1,234.50", "1234.50"),
    ("Answer: 5. (At first I got 4.)", "5"),
    ("The answer: 12 apples, since 3 * 4 = 12 and 12 - 0 = 12", "12"),
    ("3 + 4 = 7", "7"),
    ("I do not know.", None),
])
def test_extract_answer(completion, expected):
    assert envs.extract_answer(completion) == expected


def test_gsm8k_jsonl(tmp_path):
    rows = [{"question": "Q one?", "answer": "3 * 400 = 1200\n#### 1,234"},
            {"question": "Q two?", "answer": "#### $5"},
            {"question": "Q three?", "answer": "He pays 18.\n#### 18."},
            {"question": "Q four?", "answer": "####  -3 "}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    env = envs.MathEnv(source=str(path))
    assert env.problems == [(f"Q one? {INSTRUCTION}", "1234"), (f"Q two? {INSTRUCTION}", "5"),
                            (f"Q three? {INSTRUCTION}", "18"), (f"Q four? {INSTRUCTION}", "-3")]
    tasks = env.sample_tasks(np.random.default_rng(0), 8)
    assert len(tasks) == 8 and {t.answer for t in tasks} <= {"1234", "5", "18", "-3"}
    assert all(t.messages[0]["role"] == "user" and t.messages[0]["content"].endswith(INSTRUCTION) for t in tasks)

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "Q?", "answer": "no final number"}))
    with pytest.raises(ValueError, match="line 2: the answer has no number after '####'"):
        envs.MathEnv(source=str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        envs.MathEnv(source=str(path))


def test_math_reward_right_wrong_no_answer():
    env = envs.make_environment("math")
    task = env.sample_tasks(np.random.default_rng(1), 1)[0]
    completion = f"Let me think. **Answer:** {task.answer}"
    right = env.step(task, task.messages, completion)
    assert right.reward == 1.0 and right.done and right.info["correct"] and right.info["reason"] == "ok"
    assert right.messages == (*task.messages, {"role": "assistant", "content": completion})
    wrong = env.step(task, task.messages, f"Answer: {int(task.answer) + 1}")
    assert wrong.reward == 0.0 and wrong.info["reason"] == "wrong"
    assert env.step(task, task.messages, "No idea.").info["reason"] == "no_answer"


def test_math_split_is_disjoint():
    def questions(split):
        tasks = envs.MathEnv(split=split).sample_tasks(np.random.default_rng(2), 200)
        return {t.messages[0]["content"] for t in tasks}

    assert not questions("train") & questions("test")


# ---- code --------------------------------------------------------------------------------------------

SOLUTIONS = {
    "add": "def add(a, b):\n    return a + b\n",
    "is_palindrome": "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]\n",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)\n",
    "fizzbuzz": ("def fizzbuzz(n):\n    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' "
                 "if i % 5 == 0 else str(i) for i in range(1, n + 1)]\n"),
    "second_largest": ("def second_largest(nums):\n    s = sorted(set(nums))\n"
                       "    return s[-2] if len(s) > 1 else None\n"),
}


def _code_task(name):
    env = envs.CodeEnv(limits=LIMITS)
    tasks = {t.task_id: t for t in env.sample_tasks(np.random.default_rng(0), 60)}
    return env, tasks[f"code/{name}"]


@pytest.mark.parametrize("completion,code", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```\nor better\n```python\nx = 2\n```", "x = 2\n"),
    ("```bash\nls\n```\n```python\nx = 3\n```\n```text\nout\n```", "x = 3\n"),
    ("```python\ndef g():  # cut off by the token limit", "def g():  # cut off by the token limit"),
    ("def h(): pass", "def h(): pass"),
])
def test_extract_code(completion, code):
    assert envs.extract_code(completion) == code


def test_code_builtin_problems_pass_with_correct_solutions():
    env = envs.CodeEnv(limits=LIMITS)
    tasks = {t.task_id: t for t in env.sample_tasks(np.random.default_rng(0), 60)}
    assert set(tasks) == {f"code/{name}" for name in SOLUTIONS}
    for name, solution in SOLUTIONS.items():
        result = env.step(tasks[f"code/{name}"], tasks[f"code/{name}"].messages, f"```python\n{solution}```")
        assert (result.reward, result.info["reason"]) == (1.0, "ok"), (name, result.info)


@pytest.mark.parametrize("completion,reason", [
    ("```python\ndef add(a, b):\n    return a - b\n```", "tests_failed"),
    ("```python\ndef add(a, b)\n    return a + b\n```", "syntax_error"),
    ("```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```", "early_exit"),
    ("```python\nimport os\nos._exit(0)\n```", "early_exit"),
    ("```python\n\n```", "no_code"),
    ("\x00\x01 garbage", "syntax_error"),
])
def test_code_failures_score_zero(completion, reason):
    env, task = _code_task("add")
    result = env.step(task, task.messages, completion)
    assert (result.reward, result.done, result.info["reason"]) == (0.0, True, reason), result.info


def test_code_jsonl_with_entry_point(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Write double(x).", "entry_point": "double",
                                "tests": "def check(candidate):\n    assert candidate(3) == 6\n"}) + "\n")
    env = envs.make_environment("code", source=str(path), limits=LIMITS)
    task = env.sample_tasks(np.random.default_rng(0), 1)[0]
    assert task.task_id == "code/code.jsonl:1" and task.tests.endswith("check(double)\n")
    assert env.step(task, task.messages, "def double(x):\n    return 2 * x").reward == 1.0
    assert env.step(task, task.messages, "def double(x):\n    return x").info["reason"] == "tests_failed"


# ---- the sandbox against hostile programs -------------------------------------------------------------

OUTSIDE_TMP = f"/tmp/outside_{uuid.uuid4().hex}"
OUTSIDE_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"outside_{uuid.uuid4().hex}")

HOSTILE = {
    "infinite_loop": ("while True:\n    pass", "timeout"),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])", "forbidden_process"),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)", "forbidden_process"),
    "memory_hog": ("x = bytearray(4 * 1024**3)", "memory"),
    "huge_output": ("while True:\n    print('x' * 1000)", "output_limit"),
    "write_tmp": (f"open({OUTSIDE_TMP!r}, 'w').write('x')", "forbidden_write"),
    "write_repo": (f"with open({OUTSIDE_REPO!r}, 'w') as f:\n    f.write('x')", "forbidden_write"),
    "write_via_dir_fd": ("import os\nd = os.open('/tmp', os.O_RDONLY)\n"
                         f"os.open({os.path.basename(OUTSIDE_TMP)!r}, os.O_WRONLY | os.O_CREAT, dir_fd=d)",
                         "forbidden_write"),
    "mkfifo": (f"import os\nos.mkfifo({OUTSIDE_TMP!r})", "forbidden_write"),
    "sqlite_uri": (f"import sqlite3\nsqlite3.connect('file:{OUTSIDE_TMP}?mode=rwc', uri=True)", "forbidden_write"),
    "network": ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "forbidden_network"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero_with_its_reason(name):
    source, reason = HOSTILE[name]
    env, task = _code_task("add")
    result = env.step(task, task.messages, f"```python\n{SOLUTIONS['add']}{source}\n```")
    assert (result.reward, result.info["reason"]) == (0.0, reason), result.info
    assert result.info["wall_s"] < LIMITS.wall_s + 1.0
    assert not os.path.exists(OUTSIDE_TMP) and not os.path.exists(OUTSIDE_REPO)


def test_sleeper_is_killed_at_the_wall_limit():
    limits = Limits(wall_s=1.0, cpu_s=5)
    result = run_python("import time\ntime.sleep(60)", limits)  # no CPU used: only the wall clock stops it
    assert result.reason == "timeout" and limits.wall_s <= result.wall_s < limits.wall_s + 1.0


def test_fork_bomb_is_stopped_at_its_first_fork():
    probe = run_python("import os\nos.fork()", LIMITS)  # one fork first: harmless if it got through
    assert probe.reason == "forbidden_process", probe
    env, task = _code_task("add")
    result = env.step(task, task.messages, "```python\nimport os\nwhile True:\n    os.fork()\n```")
    assert (result.reward, result.info["reason"]) == (0.0, "forbidden_process")
    assert result.info["wall_s"] < LIMITS.wall_s


@pytest.mark.parametrize("source", [
    "import os\nos.remove(PATH)",
    "import os\nos.rename(PATH, 'mine.txt')",
    "import os\nos.symlink(PATH, 'link')\nopen('link', 'w').write('changed')",
])
def test_sandbox_keeps_files_outside_intact(tmp_path, source):
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    result = run_python(source.replace("PATH", repr(str(keep))), LIMITS)
    assert result.reason == "forbidden_write" and keep.read_text() == "original"


def test_sandbox_allows_work_inside_its_directory():
    source = ("import os, shutil, sqlite3, tempfile\n"
              "open('a.txt', 'w').write('hi')\nos.makedirs('d/e')\nshutil.rmtree('d')\nos.mkfifo('fifo')\n"
              "with tempfile.TemporaryDirectory() as t:\n    open(os.path.join(t, 'x'), 'w').write('y')\n"
              "open(os.devnull, 'w').write('z')\nsqlite3.connect(':memory:').execute('create table t(x)')\n"
              "print(open('a.txt').read(), os.environ['HOME'] == os.getcwd(), "
              "set(os.environ) <= {'HOME', 'TMPDIR', 'LC_CTYPE'})")  # LC_CTYPE: Python's own locale coercion
    result = run_python(source, LIMITS)
    assert result.ok and result.reason == "ok" and result.stdout == "hi True True\n", result


def test_sandbox_never_raises(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    result = run_python("print(1)", LIMITS)
    assert not result.ok and result.reason == "sandbox_error"


# ---- tool use ----------------------------------------------------------------------------------------


def test_tool_two_turn_conversation():
    env = envs.make_environment("tool")
    task = envs.Task("tool/t", _user("What is 12 * 34?"), answer="408")
    first = env.step(task, task.messages, "Let me use the calculator. <calc>12*34</calc>")
    assert (first.reward, first.done, first.info["reason"]) == (0.0, False, "tool_call")
    assert first.messages[-1] == {"role": "user", "content": "<result>408</result>"}
    assert first.messages[-2]["role"] == "assistant" and len(first.messages) == 3
    second = env.step(task, first.messages, "Answer: 408")
    assert (second.reward, second.done, second.info["correct"]) == (1.0, True, True)


def test_tool_ends_at_max_turns():
    env = envs.ToolEnv(max_turns=3)
    task = envs.Task("tool/t", _user("What is 2 + 2?"), answer="4")
    messages = task.messages
    for _ in range(3):
        result = env.step(task, messages, "<calc>2+2</calc>")
        messages = result.messages
    assert (result.reward, result.done, result.info["reason"]) == (0.0, True, "max_turns")


@pytest.mark.parametrize("expression,value", [
    ("(2 + 3) * 4 - 10 / 4", 17.5), ("7 // 2", 3), ("-2 ** 2", -4), ("2 ** -1", 0.5), ("17 % 5", 2),
    ("4821 * 379 + 1234", 4821 * 379 + 1234),
])
def test_calculator_values(expression, value):
    assert envs.calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('touch /tmp/pwned')", "9**9**9", "10**100", "2**200", "(1).__class__",
    "a + 1", "'a' * 3", "[1] * 10", "1 / 0", "(-8) ** 0.5", "1e308 * 10", "True + 1", "1" * 300,
])
def test_calculator_refuses_unsafe_expressions(expression):
    with pytest.raises(envs.CalcError):
        envs.calculate(expression)
    env = envs.ToolEnv()
    task = envs.Task("tool/t", _user("?"), answer="0")
    reply = env.step(task, task.messages, f"<calc>{expression}</calc>").messages[-1]["content"]
    assert reply.startswith("<result>error: ") and not os.path.exists("/tmp/pwned")


def test_tool_tasks_are_solvable():
    env = envs.ToolEnv()
    for task in env.sample_tasks(np.random.default_rng(3), 10):
        assert envs.TOOL_INSTRUCTION in task.messages[0]["content"]
        assert env.step(task, task.messages, f"Answer: {int(task.answer):,}").reward == 1.0


def test_make_environment_names():
    assert {name: envs.make_environment(name).name for name in ("math", "code", "tool")} == {
        "math": "math", "code": "code", "tool": "tool"}
    with pytest.raises(ValueError, match="unknown environment 'chess'"):
        envs.make_environment("chess")
