"""Runs a checks module (`python -m tests.X OUT_JSON`) on 8 fake CPU devices and returns its JSON.

XLA_FLAGS must be set before jax is imported, so the checks run in a subprocess; LLVM at -O0 halves
the compile time, which dominates, and both sides of every comparison share it.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_checks(module: str, out) -> dict:
    """`module` (e.g. "tests.rl_split_checks") run with 8 host devices, writing to `out` (a Path)."""
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
