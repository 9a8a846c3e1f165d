"""The RL learner against its matmul FLOP floor, on SmolLM2-135M-Instruct at the RL config's batch.

    python benchmarks/learner_floor.py [--config configs/smollm2-135m-rl.yaml] [--repeats 3] [--out FILE]

Measured side by side in one process (f32, medians):
  matmul rate   GFLOP/s of jitted f32 matmuls at the trunk's shapes ([B*L, D] x [D, F] and [B*L, F] x [F, D])
                and of a 1024^3 one; the best of them is the rate the floor is taken at
  learner step  what the RL loop spends per update (`rl.loop`): `learner.learner_step` on prompts_per_step x
                group_size rows of max_prompt_tokens + max_new_tokens tokens (random tokens; the completion
                half is the loss mask), pi_prox from its own forward; and, as the loop ran before, with a
                separate pi_prox forward first
  floor         the matmul FLOPs of that work (every dot_general of its jaxprs, gradients included)
                divided by the matmul rate
  length buckets the same step on the rows cut to each of `rl.length_buckets` lengths (what the loop ran with
                rl.share_prefix=false when the batch's answers end early: `learner.trim_trajectories`), seconds
                and ratio to the full length
  shared prefix the same step with each task's prompt run once for its group_size rows (`share_prefixes`,
                what the loop runs by default; the rows of a group share their max_prompt_tokens prompt tokens),
                seconds, its own floor, and the ratio to the whole-row step
Prints step / floor (issue 16's target: <= 1.7) and the first call's compile seconds. Writes JSON.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import load_config
from bebop_jax.model import load_model
from bebop_jax.rl.learner import (LearnerSettings, Trajectories, bucket_length, init_learner, learner_step,
                                  policy_logprobs, share_prefixes)
from timing import median_seconds, write_result


def dot_flops(jaxpr) -> int:
    """2 x (output size) x (contracted size), summed over every dot_general of a jaxpr and its sub-jaxprs
    (a scan's body times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        if eqn.primitive.name == "while":
            raise ValueError("dot_flops: a while loop's trip count is unknown")
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeat * dot_flops(sub)
    return total


def matmul_gflops(rows: int, d: int, f: int, repeats: int) -> dict[str, float]:
    key = jax.random.key(0)
    shapes = {f"{rows}x{d}x{f}": (rows, d, f), f"{rows}x{f}x{d}": (rows, f, d), "1024x1024x1024": (1024, 1024, 1024)}
    out = {}
    mm = jax.jit(jnp.matmul)
    for name, (m, k, n) in shapes.items():
        a, b = jax.random.normal(key, (m, k)), jax.random.normal(key, (k, n))
        out[name] = 2 * m * k * n / median_seconds(lambda: mm(a, b), repeats) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-135m-rl.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/learner_floor.json")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    rl = cfg.rl
    model = load_model(cfg.model.source, "float32")
    mcfg = model.cfg
    B, P, N = rl.prompts_per_step * rl.group_size, rl.max_prompt_tokens, rl.max_new_tokens
    L = P + N
    rng = np.random.default_rng(0)
    settings = LearnerSettings(temperature=rl.temperature, clip_eps=rl.clip_eps, is_cap=rl.is_cap,
                               kl_coef=rl.kl_coef, learning_rate=rl.learning_rate)
    tokens = rng.integers(0, mcfg.vocab_size, (B, L))
    tokens[:, :P] = np.repeat(tokens[::rl.group_size, :P], rl.group_size, axis=0)  # a group shares its prompt
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(np.arange(L)[None, :] >= P).repeat(B, axis=0)
    behaviour = policy_logprobs(model.params, tokens, cfg=mcfg, temperature=settings.temperature)[0]
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=jnp.where(mask, behaviour, 0.0),
                        rewards=jnp.asarray(rng.integers(0, 2, B), jnp.float32),
                        group_ids=jnp.asarray(np.arange(B) // rl.group_size, jnp.int32),
                        policy_version=jnp.zeros((B,), jnp.int32))
    state = init_learner(jax.tree.map(jnp.array, model.params), settings)
    static = dict(cfg=mcfg, settings=settings, num_groups=rl.prompts_per_step)

    def prox(params):
        return policy_logprobs(params, tokens, cfg=mcfg, temperature=settings.temperature)[0]

    t0 = time.perf_counter()
    compiled = learner_step.lower(state, traj, None, None, **static).compile()
    compile_s = time.perf_counter() - t0
    with_prox = learner_step.lower(state, traj, prox(state.params), None, **static).compile()
    flops = dot_flops(jax.make_jaxpr(lambda s: learner_step(s, traj, None, None, **static))(state).jaxpr)
    holder = {"state": state}

    def update(separate_prox: bool):
        s = holder["state"]
        s, metrics = with_prox(s, traj, prox(s.params), None) if separate_prox else compiled(s, traj, None, None)
        holder["state"] = s
        return metrics["loss"]

    step_s = median_seconds(lambda: update(False), args.repeats)
    step_prox_s = median_seconds(lambda: update(True), args.repeats)
    rates = matmul_gflops(B * L, mcfg.hidden_size, mcfg.intermediate_size, max(args.repeats, 5))
    rate = max(rates.values())
    floor_s = flops / (rate * 1e9)
    print(f"batch {B} x {L} tokens, {flops / 1e12:.3f} TFLOP of matmuls per update")
    print("f32 matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    print(f"learner step {step_s:.2f} s, floor {floor_s:.2f} s at {rate:.0f} GFLOP/s: step / floor {step_s / floor_s:.2f}")
    print(f"with a separate pi_prox forward (the loop before): {step_prox_s:.2f} s, {step_prox_s / floor_s:.2f} x floor")
    print(f"first compile of learner_step: {compile_s:.1f} s")
    buckets = {}
    for cut in sorted({bucket_length(f, L, rl.length_buckets) for f in range(1, L + 1)} - {L}):
        short = traj.replace(tokens=tokens[:, :cut], loss_mask=mask[:, :cut], behaviour_logprobs=traj.behaviour_logprobs[:, :cut])
        step = learner_step.lower(state, short, None, None, **static).compile()

        def update_short():
            holder["state"], metrics = step(holder["state"], short, None, None)  # noqa: B023 (called here)
            return metrics["loss"]

        buckets[cut] = median_seconds(update_short, args.repeats)
    buckets[L] = step_s
    print("length buckets (rl.length_buckets=%d): " % rl.length_buckets
          + ", ".join(f"{cut} tokens {t:.2f} s (x{t / step_s:.2f})" for cut, t in buckets.items()))
    shared = jax.tree.map(jnp.asarray, share_prefixes(jax.device_get(traj), rl.prompts_per_step, rl.length_buckets))
    t0 = time.perf_counter()
    shared_step = learner_step.lower(state, shared, None, None, **static).compile()
    shared_compile_s = time.perf_counter() - t0
    shared_flops = dot_flops(jax.make_jaxpr(lambda s: learner_step(s, shared, None, None, **static))(state).jaxpr)

    def update_shared():
        holder["state"], metrics = shared_step(holder["state"], shared, None, None)
        return metrics["loss"]

    shared_s = median_seconds(update_shared, args.repeats)
    step_again_s = median_seconds(lambda: update(False), args.repeats)  # whole rows again, beside it
    shared_floor_s = shared_flops / (rate * 1e9)
    print(f"shared prefix ({rl.prompts_per_step} prompts x {shared.prefix.width} + {B} x {shared.prefix.suffix} "
          f"tokens): {shared_s:.2f} s against {step_again_s:.2f} s for whole rows just before (x{step_again_s / shared_s:.2f} "
          f"faster); {shared_flops / 1e12:.3f} TFLOP, floor {shared_floor_s:.2f} s, step / floor "
          f"{shared_s / shared_floor_s:.2f}; compile {shared_compile_s:.1f} s")
    write_result(args.out, model=cfg.model.source, batch=B, tokens_per_row=L, matmul_tflop=flops / 1e12,
                 matmul_gflops=rates, step_s=step_s, step_with_prox_forward_s=step_prox_s, floor_s=floor_s,
                 step_over_floor=step_s / floor_s, compile_s=compile_s, bucket_step_s=buckets,
                 shared_prefix={"prefix": [rl.prompts_per_step, shared.prefix.width], "suffix": [B, shared.prefix.suffix],
                                "step_s": shared_s, "whole_rows_step_s": step_again_s,
                                "speedup": step_again_s / shared_s, "matmul_tflop": shared_flops / 1e12,
                                "floor_s": shared_floor_s, "step_over_floor": shared_s / shared_floor_s,
                                "compile_s": shared_compile_s})


if __name__ == "__main__":
    main()
