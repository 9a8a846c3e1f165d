"""`bebop demo` (`make demo`): the whole Bebop pipeline on SmolLM2-135M-Instruct, sized for a 2-core CPU.

1. self-distillation: the policy's own answers to built-in math problems (token shards);
2. MTP heads (K=3, drafting from a frequent sub-vocabulary) trained on the frozen trunk as the paper
   does: a CE warm start, then e2e-TV; the baseline continues with CE instead, same budget;
3. `eval-acceptance` of both on held-out samples (alpha_k, expected accepted length, entropy slope), and
   of the heads shipped in the package (`SHIPPED`: trained the same way at scale, see their model card);
4. verification rules (rejection / greedy-draft / block) across temperatures, with the shipped heads;
5. plain vs speculative decoding speed with the shipped heads, measured side by side;
6. a few async RL steps with speculative rollouts per MTP strategy (frozen / online-ce / online-tv),
   starting from the shipped heads;
7. `bebop analyze`: the report (Markdown + figures), and a summary table printed here.
Every number is computed in the run; budgets come from configs/demo.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from bebop_jax.config import Config, load_config
from bebop_jax.math_prompts import make_problem
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.speculative import speculative_generate

SHIPPED = "smollm2-135m-instruct-e2e-tv"  # `checkpoint.SHIPPED_HEADS`: the heads the demo decodes with
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _prompts(model: LoadedModel, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [model.tokenizer.encode_prompt(make_problem(rng)[0], chat=True) for _ in range(n)]


def verify_modes(model: LoadedModel, heads: str, out: str, *, temperatures=(0.5, 1.0), num_draft: int = 3,
                 batch: int = 8, max_new_tokens: int = 64, seed: int = 1234) -> dict:
    """Acceptance of each verification rule at each temperature on math prompts; writes `out` (JSON).

    Sequences stop at EOS, as in the RL actor, whose rollouts then reuse this compilation (same shapes).
    """
    from bebop_jax.checkpoint import load_mtp_heads

    mtp_cfg, mtp_params, draft_ids = load_mtp_heads(heads, model.cfg)
    prompts = _prompts(model, batch, seed)
    result = {"heads": heads, "num_draft": num_draft, "modes": {}}
    for mode in ("rejection", "greedy_draft", "block"):
        rows = []
        for t in temperatures:
            r = speculative_generate(model.params, model.cfg, prompts, jax.random.key(seed), mtp_params=mtp_params,
                                     mtp_cfg=mtp_cfg, mode=mode, num_draft=num_draft, max_new_tokens=max_new_tokens,
                                     temperature=t, eos_ids=model.tokenizer.eos_token_ids, draft_ids=draft_ids)
            rows.append({"temperature": t, **r.metrics(num_draft),
                         "policy_entropy": float(r.entropies[r.tokens >= 0].mean())})
        result["modes"][mode] = rows
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def rollout_speed(model: LoadedModel, heads: str, out: str, *, settings=((1, 1.0),), num_draft: int = 3,
                  max_new_tokens: int = 64, repeats: int = 2, seed: int = 99) -> dict:
    """Plain vs speculative (rejection) tokens/s, alternating runs, EOS off; writes `out` (JSON)."""
    from bebop_jax.checkpoint import load_mtp_heads

    mtp_cfg, mtp_params, draft_ids = load_mtp_heads(heads, model.cfg)
    rows = []
    for batch, t in settings:
        prompts = _prompts(model, batch, seed)
        common = dict(max_new_tokens=max_new_tokens, temperature=t, eos_ids=())
        plain = lambda: speculative_generate(model.params, model.cfg, prompts, jax.random.key(seed), mode="none",  # noqa: E731
                                             **common)
        spec = lambda: speculative_generate(model.params, model.cfg, prompts, jax.random.key(seed),  # noqa: E731
                                            mtp_params=mtp_params, mtp_cfg=mtp_cfg, mode="rejection",
                                            num_draft=num_draft, draft_ids=draft_ids, **common)
        plain(), spec()  # compile
        times = {"plain": [], "spec": []}
        for _ in range(repeats):
            for name, fn in (("plain", plain), ("spec", spec)):
                t0 = time.perf_counter()
                rollout = fn()
                times[name].append(time.perf_counter() - t0)
        tokens = batch * max_new_tokens
        p, s = float(np.median(times["plain"])), float(np.median(times["spec"]))
        rows.append({"setting": f"batch {batch}, T={t:g}, K={num_draft}", "batch": batch, "temperature": t,
                     "plain_tokens_per_s": tokens / p, "spec_tokens_per_s": tokens / s, "speedup": p / s,
                     **rollout.metrics(num_draft)})
    result = {"heads": heads, "rows": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def run_demo(cfg: Config, out_dir: str = "runs/demo") -> str:
    """Runs the pipeline into `out_dir` and returns the report path."""
    from bebop_jax import eval_acceptance, pretrain_mtp
    from bebop_jax.analyze import analyze
    from bebop_jax.data import self_distill
    from bebop_jax.rl.loop import train_rl

    t_start = time.perf_counter()
    starts: dict[str, float] = {}  # stage -> seconds since the start when it began

    def stage(name):
        starts[name] = time.perf_counter() - t_start
        print(f"\n=== {name} ({starts[name]:.0f}s elapsed) ===", flush=True)

    stage("load SmolLM2-135M-Instruct")
    model = load_model(cfg.model.source, cfg.model.dtype)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=os.path.join(out_dir, "data")))
    if not os.path.isdir(os.path.join(cfg.data.dir, "heldout")):
        stage("self-distillation: the policy's answers to math problems")
        self_distill(cfg, model)
    heads = {}
    pc = dataclasses.replace(cfg.pretrain, cache_dir=os.path.join(out_dir, "hidden_cache"))
    warm = os.path.join(out_dir, "mtp", "ce_warm")
    stage("pretrain MTP heads: CE warm start")
    pretrain_mtp.train(dataclasses.replace(cfg, pretrain=dataclasses.replace(pc, loss="ce", run_dir=warm)), model)
    for loss in ("e2e_tv", "ce"):
        stage(f"pretrain MTP heads: continue with {loss}")
        run = os.path.join(out_dir, "mtp", loss)
        c = dataclasses.replace(cfg, pretrain=dataclasses.replace(pc, loss=loss, run_dir=run, init=warm))
        pretrain_mtp.train(c, model)
        stage(f"eval-acceptance of the {loss} heads")
        eval_acceptance.run(c, run, model=model)
        heads[loss] = run
    stage(f"eval-acceptance of the shipped heads ({SHIPPED})")
    eval_acceptance.run(cfg, SHIPPED, os.path.join(out_dir, "mtp", "shipped", "acceptance.json"), model=model)
    heads["shipped"] = SHIPPED
    stage("verification rules across temperatures (shipped heads)")
    verify_modes(model, SHIPPED, os.path.join(out_dir, "modes.json"), num_draft=cfg.speculative.num_draft,
                 batch=cfg.rl.prompts_per_step * cfg.rl.group_size, max_new_tokens=cfg.rl.max_new_tokens)
    stage("plain vs speculative decoding speed (shipped heads)")
    speed = rollout_speed(model, SHIPPED, os.path.join(out_dir, "speed.json"),
                          num_draft=cfg.speculative.num_draft, max_new_tokens=cfg.rl.max_new_tokens)
    rl = {}
    for strategy in ("frozen", "online-ce", "online-tv"):
        stage(f"async RL with speculative rollouts, shipped MTP heads {strategy}")
        c = dataclasses.replace(
            cfg, speculative=dataclasses.replace(cfg.speculative, mtp_checkpoint=SHIPPED),
            rl=dataclasses.replace(cfg.rl, mtp_strategy=strategy, run_dir=os.path.join(out_dir, "rl", strategy)))
        rl[strategy] = train_rl(c, model=model, progress=True)
    stage("report")
    report = analyze(out_dir)
    accept = {loss: json.load(open(os.path.join(out_dir, "mtp", loss, "acceptance.json"))) for loss in heads}
    print("\n" + "=" * 78)
    print("bebop-jax demo: SmolLM2-135M-Instruct, K=3 MTP heads, this machine's CPU")
    print("-" * 78)
    print(f"{'heads':<8} {'alpha_1':>8} {'alpha_2':>8} {'alpha_3':>8} {'E[len]':>8} {'slope/nat':>10}   (T=1, held out)")
    for loss, rep in accept.items():
        res = next(r for r in rep["results"] if r["temperature"] == 1.0)
        a = res["alpha"] + [float("nan")] * (3 - len(res["alpha"]))
        print(f"{loss:<8} {a[0]:>8.3f} {a[1]:>8.3f} {a[2]:>8.3f} {res['expected_length']:>8.3f} "
              f"{res['heads'][0]['fit']['slope']:>+10.4f}")
    for row in speed["rows"]:
        print(f"decoding {row['setting']}: plain {row['plain_tokens_per_s']:.1f} tok/s, speculative "
              f"{row['spec_tokens_per_s']:.1f} tok/s (x{row['speedup']:.2f}, acceptance {row['draft_acceptance_rate']:.2f})")
    for name, summary in rl.items():
        print(f"RL {name:<16} {summary['steps']} steps, {summary['wall_s'] / max(summary['steps'], 1):.1f} s/step, "
              f"acceptance {summary['acceptance'] if summary['acceptance'] is not None else float('nan'):.3f}")
    stage("done")
    names = list(starts)
    times = {a: round(starts[b] - starts[a], 1) for a, b in zip(names, names[1:])}  # stage -> seconds
    with open(os.path.join(out_dir, "stage_seconds.json"), "w") as f:
        json.dump(times, f, indent=2)
    print("stages: " + ", ".join(f"{name} {sec:.0f}s" for name, sec in times.items()))
    print(f"total {time.perf_counter() - t_start:.0f}s; report: {report}")
    return report


def main(config: str | None = None, overrides=(), out_dir: str = "runs/demo") -> None:
    run_demo(load_config(config or DEFAULT_CONFIG, overrides), out_dir)
