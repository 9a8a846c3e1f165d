"""Where a speculative verify step's time goes, against a plain decode step, on SmolLM2-135M-Instruct.

    python benchmarks/spec_step_costs.py --mtp runs/mtp-compare/e2e_tv [--batch 1 8] [--num-draft 3]

Times, each jitted on its own at the engine's shapes (a real prefilled state of math prompts, the
heads' own draft vocabulary), the parts of one step of `speculative.decode`:
  plain step     trunk forward of 1 token + full LM head + sampling (what `mode=none` does per token)
  verify         trunk forward of K+1 tokens + full LM head + the target distributions with their
                 log-normalisers and entropies (`sampling.distribution`, one pass over V)
  draft          K MTP steps + the draft LM head + sampling (`speculative._draft`)
  rejection      `rejection_sample` (noise, acceptance tests, residual races over V)
  refresh        MTP step 1 over the K+1 accepted positions (`speculative._mtp_refresh`)
  token stats    log p of the emitted tokens (a gather and the log-normalisers)
and the whole engine per step (a `decode` run of --max-new-tokens, divided by its verify steps),
so "loop" = engine step - sum of parts is the while-loop's own bookkeeping. Ratios to the plain
step are what matter on a shared machine; the engine's speed-up is tokens per verify step x (plain
engine step / speculative engine step).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import sampling, speculative
from bebop_jax.checkpoint import load_mtp_heads
from bebop_jax.batching import cache_length_for, pad_prompts
from bebop_jax.math_prompts import make_problem
from bebop_jax.model import load_model
from bebop_jax.model.mtp import vocab_matrix
from bebop_jax.model.transformer import vocab_logits
from kernels_pallas.rejection_sampling import rejection_sample
from timing import median_seconds, write_result


def step_costs(model, mtp_cfg, mtp_params, draft_ids, batch: int, num_draft: int, max_new_tokens: int,
               temperature: float, repeats: int, seed: int = 0) -> dict:
    """Seconds of each part of one verify step at `batch` (see the module docstring) and their ratios."""
    cfg, params = model.cfg, model.params
    rng = np.random.default_rng(seed)
    prompts = [model.tokenizer.encode_prompt(make_problem(rng)[0], chat=True) for _ in range(batch)]
    tokens, lengths = pad_prompts(prompts)
    K, R = num_draft, num_draft + 1
    cache_len = cache_length_for(tokens.shape[1], max_new_tokens, extra=K + 2)
    temp = jnp.float32(temperature)
    static = dict(cfg=cfg, mtp_cfg=mtp_cfg, num_draft=K, greedy=False, top_p=1.0, eos_ids=())
    state = speculative.prefill(params, mtp_params, tokens, lengths, jax.random.key(seed), temp,
                                max_new_tokens=max_new_tokens, cache_len=cache_len, **static)
    ids = jnp.asarray(draft_ids, jnp.int32)
    forward, logits, embed, mtp_step = speculative._fns(cfg, mtp_cfg)
    key = jax.random.split(jax.random.key(seed + 1), batch)  # one key per row, as the engine keeps them
    positions = state.position[:, None] + jnp.arange(R, dtype=jnp.int32)
    # every weight is an argument, as in the engine (closed-over weights would be folded as constants)

    @jax.jit
    def plain_step(params, cache):
        hidden, cache = forward(params, state.tokens[:, :1], state.position[:, None], cache)
        dist = sampling.distribution(logits(params, hidden), temp)  # as the engine's mode='none' step
        return sampling.categorical(key, dist.probs), dist.log_norm, dist.entropy, cache

    @jax.jit
    def verify(params, cache):
        hidden, cache = forward(params, jnp.zeros((batch, R), jnp.int32), positions, cache)
        lg = logits(params, hidden)
        return hidden, lg, sampling.distribution(lg, temp), cache

    @jax.jit
    def draft(params, mtp_params, s, ids):
        w_draft = vocab_matrix(cfg, params)[ids]
        return speculative._draft(params, mtp_params, s, key, mtp_step=mtp_step,
                                  draft_logits=lambda h: vocab_logits(h, w_draft), embed=embed, num_draft=K,
                                  greedy_draft=False, temperature=temp, top_p=1.0, draft_ids=ids,
                                  vocab_size=cfg.vocab_size)

    @jax.jit
    def refresh(params, mtp_params, out, hidden, cache):
        return speculative._mtp_refresh(mtp_step, params, mtp_params, embed, mtp_cfg, out, hidden, positions + 1, cache)

    drafts, draft_probs, _ = draft(params, mtp_params, state, ids)
    hidden, target_logits, target, _ = verify(params, state.trunk_cache)
    reject = jax.jit(functools.partial(rejection_sample, mode="rejection", validate=False))
    out, _ = reject(drafts, draft_probs, target.probs, key)
    stats = jax.jit(lambda lg, toks, log_norm: sampling.token_logprob(lg, toks, temp, log_norm))

    parts = {
        "plain step": median_seconds(lambda: plain_step(params, state.trunk_cache), repeats),
        "verify": median_seconds(lambda: verify(params, state.trunk_cache), repeats),
        "draft": median_seconds(lambda: draft(params, mtp_params, state, ids), repeats),
        "rejection": median_seconds(lambda: reject(drafts, draft_probs, target.probs, key), repeats),
        "refresh": median_seconds(lambda: refresh(params, mtp_params, out, hidden, state.mtp_cache), repeats),
        "token stats": median_seconds(lambda: stats(target_logits, out, target.log_norm), repeats),
    }
    engine, tokens_per_step = {}, {}
    for name, k, rule in (("plain engine", 0, None), ("spec engine", K, 0)):
        run = functools.partial(speculative.decode, params, mtp_params if k else None, temperature=temp,
                                draft_ids=ids if k else None, rule=jnp.int32(rule or 0), cfg=cfg,
                                mtp_cfg=mtp_cfg if k else None, num_draft=k, greedy=False, top_p=1.0, eos_ids=())
        fresh = lambda: speculative.prefill(params, mtp_params if k else None, tokens, lengths,  # noqa: E731
                                            jax.random.key(seed), temp, max_new_tokens=max_new_tokens,
                                            cache_len=cache_len, **dict(static, mtp_cfg=mtp_cfg if k else None,
                                                                        num_draft=k))
        times, steps = [], 1
        for _ in range(repeats + 1):
            s0 = jax.block_until_ready(fresh())
            t0 = time.perf_counter()
            s1 = jax.block_until_ready(run(s0))
            times.append(time.perf_counter() - t0)
            steps = int(s1.step)
        engine[name] = float(np.median(times[1:])) / steps
        tokens_per_step[name] = float(np.sum(s1.num_tokens - 1)) / float(np.sum(s1.verify_steps))
    spec_parts = sum(v for k, v in parts.items() if k != "plain step")
    base = parts["plain step"]
    return dict(batch=batch, num_draft=K, draft_vocab=len(draft_ids), temperature=temperature,
                seconds=dict(parts, **engine, loop=engine["spec engine"] - spec_parts),
                ratio_to_plain_step={k: v / base for k, v in dict(parts, **engine).items()},
                tokens_per_step=tokens_per_step,
                speedup=tokens_per_step["spec engine"] * engine["plain engine"] / engine["spec engine"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--mtp", required=True, help="MTP heads trained on a draft vocabulary (pretrain-mtp run dir)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/spec_step_costs.json")
    args = ap.parse_args()
    model = load_model(args.model)
    mtp_cfg, mtp_params, draft_ids = load_mtp_heads(args.mtp, model.cfg)
    if draft_ids is None:
        raise SystemExit(f"{args.mtp}: heads without a draft vocabulary; this benchmark times the engine's "
                         "sub-vocabulary path (train heads with pretrain.draft_vocab > 0)")
    rows = []
    for batch in args.batch:
        row = step_costs(model, mtp_cfg, mtp_params, draft_ids, batch, args.num_draft, args.max_new_tokens,
                         args.temperature, args.repeats)
        rows.append(row)
        print(f"\nbatch {batch}, K={args.num_draft}, Vd={row['draft_vocab']}, T={args.temperature}")
        for name, sec in row["seconds"].items():
            ratio = row["ratio_to_plain_step"].get(name)
            print(f"  {name:<28} {sec * 1e3:8.2f} ms" + (f"   {ratio:5.2f} x plain step" if ratio is not None else ""))
        print(f"  tokens per verify step {row['tokens_per_step']['spec engine']:.2f}: engine speed-up "
              f"x{row['speedup']:.2f}", flush=True)
    write_result(args.out, model=args.model, mtp=args.mtp, rows=rows)


if __name__ == "__main__":
    main()
