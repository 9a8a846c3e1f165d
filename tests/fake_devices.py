"""CPU device environments for the processes that tests start, and the checks modules run on 8 fake devices.

XLA_FLAGS must be set before jax is imported, so anything with its own device count runs in a subprocess.
Every process of the suite compiles with LLVM at -O0 (`tests/conftest.py` sets it for pytest's own): XLA:CPU's
compile time, which dominates the suite, falls by ~40%, and the fusions run up to ~1.7x slower (the matmuls are
library calls either way): `make test` 23 minutes against 30-32 at -O3. Both sides of every comparison share it.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_env(devices: int) -> dict:
    """os.environ for a subprocess on `devices` CPU devices, compiling as the suite does."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
                JAX_PLATFORMS="cpu")


def run_checks(module: str, out) -> dict:
    """`module` (e.g. "tests.rl_split_checks") run with 8 host devices, writing to `out` (a Path)."""
    proc = subprocess.run([sys.executable, "-m", module, str(out)], cwd=REPO, env=cpu_env(8), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
