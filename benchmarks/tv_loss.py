"""Fused acceptance (chunked, the CPU production path) against the plain reference.

For each vocabulary size: forward + backward (value_and_grad of mean alpha w.r.t. h_draft), compiled
temporary memory (XLA memory_analysis), median wall time and median CPU seconds of this process,
both paths compiled and timed side by side (repeats interleaved, so load from other processes hits
both alike; CPU seconds are steadier than wall time on a shared machine). Prints a table and the
ratios; writes JSON. Real sizes: N=4096 positions, D=576 (SmolLM2), V=49152 (SmolLM2) and 151936
(Qwen2). `--quick` runs small sizes.

    .venv/bin/python benchmarks/tv_loss.py [--quick] [--repeats 3] [--out PATH]
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels_pallas import tv_loss as tv  # noqa: E402

FULL = dict(n=4096, d=576, vocab_sizes=(49152, 151936))
QUICK = dict(n=512, d=576, vocab_sizes=(8192, 16384))


def _inputs(n, d, v):
    """h_draft, h_target [n, d], w_vocab [v, d] f32; draft near target, alpha around 0.5."""
    k = jax.random.split(jax.random.key(0), 3)
    h_t = jax.random.normal(k[0], (n, d))  # [n, d]
    h_d = h_t + 0.5 * jax.random.normal(k[1], (n, d))  # [n, d]
    w = jax.random.normal(k[2], (v, d)) / d ** 0.5 * 3.0  # [v, d], logits of scale ~3
    return h_d, h_t, w


def _compiled(implementation, block_sizes, args):
    """jit(value_and_grad(mean alpha w.r.t. h_draft)), compiled for args."""
    def loss(h_d, h_t, w):
        return tv.fused_acceptance(h_d, h_t, w, implementation=implementation,
                                   block_sizes=block_sizes).mean()
    return jax.jit(jax.value_and_grad(loss)).lower(*args).compile()


def _time_once(fn, args):
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_vocab(n, d, v, block_sizes, repeats):
    """One row of the table: temp bytes, median wall and CPU seconds, plain vs fused agreement.

    The gradient is compared in relative L2 norm: s = sign(q - p) flips at near-ties under f32
    rounding, so single entries differ between any two f32 evaluation orders (both paths are that
    far from an f64 evaluation).
    """
    args = _inputs(n, d, v)
    fns = {name: _compiled(impl, bs, args) for name, impl, bs in
           (("plain", "reference", None), ("fused", "chunked", block_sizes))}
    temp = {name: fn.memory_analysis().temp_size_in_bytes for name, fn in fns.items()}
    outs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, args))
    wall = {name: [t[0] for t in ts] for name, ts in times.items()}
    cpu = {name: [t[1] for t in ts] for name, ts in times.items()}
    (val_p, grad_p), (val_f, grad_f) = outs["plain"], outs["fused"]
    return dict(
        n=n, d=d, v=v,
        temp_bytes=temp, wall_s=wall, cpu_s=cpu,
        median_wall_s={name: statistics.median(t) for name, t in wall.items()},
        median_cpu_s={name: statistics.median(t) for name, t in cpu.items()},
        loss_abs_diff=float(abs(val_p - val_f)),
        grad_rel_l2=float(jnp.linalg.norm(grad_p - grad_f) / jnp.linalg.norm(grad_p)),
        mean_alpha=float(val_p))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and size")
    parser.add_argument("--block-n", type=int, default=tv.CHUNKED_BLOCK_SIZES.block_n)
    parser.add_argument("--block-v", type=int, default=tv.CHUNKED_BLOCK_SIZES.block_v)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "tv_loss.json"))
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    block_sizes = tv.BlockSizes(block_n=args.block_n, block_v=args.block_v)

    rows = []
    header = (f"{'N':>5} {'D':>4} {'V':>7} | {'plain MB':>9} {'fused MB':>9} {'ratio':>6} | "
              f"{'plain s':>8} {'fused s':>8} {'ratio':>6} | {'plain cpu':>9} {'fused cpu':>9} "
              f"{'ratio':>6} | {'grad L2':>7}")
    print(f"{jax.devices()[0].device_kind} x{os.cpu_count()}, jax {jax.__version__}, fused "
          f"{block_sizes}, repeats {args.repeats}, load average {os.getloadavg()[0]:.1f}")
    print(header)
    print("-" * len(header))
    for v in sizes["vocab_sizes"]:
        r = bench_vocab(sizes["n"], sizes["d"], v, block_sizes, args.repeats)
        r["mem_ratio"] = r["temp_bytes"]["fused"] / r["temp_bytes"]["plain"]
        r["wall_ratio"] = r["median_wall_s"]["fused"] / r["median_wall_s"]["plain"]
        r["cpu_ratio"] = r["median_cpu_s"]["fused"] / r["median_cpu_s"]["plain"]
        r["load_average"] = os.getloadavg()[0]
        rows.append(r)
        mb, wall, cpu = r["temp_bytes"], r["median_wall_s"], r["median_cpu_s"]
        print(f"{r['n']:>5} {r['d']:>4} {v:>7} | {mb['plain'] / 2**20:>9.1f} "
              f"{mb['fused'] / 2**20:>9.1f} {r['mem_ratio']:>6.3f} | {wall['plain']:>8.2f} "
              f"{wall['fused']:>8.2f} {r['wall_ratio']:>6.3f} | {cpu['plain']:>9.2f} "
              f"{cpu['fused']:>9.2f} {r['cpu_ratio']:>6.3f} | {r['grad_rel_l2']:>7.1e}", flush=True)
    print("ratios are fused / plain (targets: memory <= 0.125, time <= 1); cpu = seconds of CPU "
          "used by this process, steadier than wall time on a shared machine")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, platform=platform.platform(),
                       cpu_count=os.cpu_count(), jax=jax.__version__, quick=args.quick,
                       repeats=args.repeats, block_sizes=dataclasses.asdict(block_sizes),
                       rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
