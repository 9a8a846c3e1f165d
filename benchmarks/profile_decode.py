"""Where a decode engine step's time goes, per XLA fusion, from a `jax.profiler` trace (SmolLM2, CPU).

    python benchmarks/profile_decode.py [--batch 8] [--num-draft 3] [--mtp smollm2-135m-instruct-e2e-tv] [--top 15]

Runs `speculative.decode` on math prompts (T=1, EOS off) once to compile, then once under
`jax.profiler.trace`, and prints the fusions (XLA:CPU thunks) with the largest total time per verify step,
with the HLO op each computes (`metadata op_name` of the compiled program), then the same totals per part
(op names with the layer index dropped: all 30 layers' MLP products as one line). Profiling slows the run:
the per-step total is for comparison between variants, not a speed. --num-draft 0 profiles plain decoding.
This is how session 12 found the draft heads' product materialising a [4096, 8, 576] broadcast.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import speculative
from bebop_jax.batching import cache_length_for, pad_prompts
from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.math_prompts import make_problem
from bebop_jax.model import load_model


def fusion_totals(trace_dir: str) -> dict[str, tuple[float, int]]:
    """{event name: (total microseconds, count)} of the complete events of the newest trace under trace_dir."""
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X":
            totals[e["name"]][0] += e["dur"]
            totals[e["name"]][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def op_group(op_name: str) -> str:
    """An HLO op's part of the program: its op_name with layer indices and the jit/while prefix dropped."""
    return re.sub(r"layers_\d+", "layers_*", op_name.replace("jit(decode)/while/body/", ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--mtp", default="smollm2-135m-instruct-e2e-tv", help="heads with a draft sub-vocabulary")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    model = load_model(args.model)
    K = args.num_draft
    mtp_cfg, mtp_params, ids = load_mtp_heads(args.mtp, model.cfg) if K else (None, None, None)
    rng = np.random.default_rng(0)
    tokens, lengths = pad_prompts([model.tokenizer.encode_prompt(make_problem(rng)[0], chat=True)
                                   for _ in range(args.batch)])
    static = dict(cfg=model.cfg, mtp_cfg=mtp_cfg, num_draft=K, greedy=False, top_p=1.0, eos_ids=())
    temp = jnp.float32(1.0)
    cache_len = cache_length_for(tokens.shape[1], args.max_new_tokens, extra=K + 2)
    draft_ids = None if ids is None else jnp.asarray(ids)
    fresh = lambda: jax.block_until_ready(speculative.prefill(  # noqa: E731
        model.params, mtp_params, tokens, lengths, jax.random.key(0), temp, max_new_tokens=args.max_new_tokens,
        cache_len=cache_len, **static))
    run = lambda s: speculative.decode(model.params, mtp_params, s, temp, draft_ids, jnp.int32(0), **static)  # noqa: E731
    jax.block_until_ready(run(fresh()))  # compile
    state = fresh()
    hlo = speculative.decode.lower(model.params, mtp_params, state, temp, draft_ids, jnp.int32(0),
                                   **static).compile().as_text()
    ops = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.-]+) = .*?op_name=\"([^\"]+)\"", hlo)}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(state))
        seconds = time.perf_counter() - t0
        jax.profiler.stop_trace()
        totals = fusion_totals(trace_dir)
    steps = int(out.step)
    print(f"batch {args.batch}, K={K}: {steps} steps, {seconds / steps * 1e3:.1f} ms per step under the profiler")
    fusions = {k: v for k, v in totals.items() if k in ops}
    for name, (us, count) in sorted(fusions.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {us / steps / 1e3:7.2f} ms/step  x{count / steps:4.1f}  {name:<28} {ops[name][:90]}")
    groups: dict[str, float] = collections.defaultdict(float)
    for name, (us, _) in fusions.items():
        groups[op_group(ops[name])] += us
    print(f"per part ({sum(groups.values()) / steps / 1e3:.1f} ms/step in fusions, layers summed):")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {us / steps / 1e3:7.2f} ms/step  {group}")


if __name__ == "__main__":
    main()
