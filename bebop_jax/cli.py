"""The `bebop` command line: `bebop COMMAND [--config FILE] [flags] [section.key=value ...]`.

Flags are shorthands for config keys (`--temperature 0.7` is `generate.temperature=0.7`); the order
of precedence is dataclass defaults < YAML file < flags < `key=value` overrides. The whole config
is validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bebop_jax.config import Config, ConfigError, load_config

# flag -> (config key, argparse kwargs)
_GENERATE_FLAGS = {
    "--model": ("model.source", dict(help="registered name, HF directory or .gguf file")),
    "--dtype": ("model.dtype", dict(help="compute dtype: float32 | bfloat16")),
    "--max-new-tokens": ("generate.max_new_tokens", dict(type=int)),
    "--temperature": ("generate.temperature", dict(type=float, help="0 = greedy")),
    "--top-p": ("generate.top_p", dict(type=float)),
    "--seed": ("generate.seed", dict(type=int)),
    "--chat": ("generate.chat", dict(action="store_const", const="true", help="wrap prompts in the chat template")),
    "--speculative": ("speculative.mode", dict(action="store_const", const="rejection",
                                               help="draft with MTP heads, verify by rejection sampling")),
    "--mode": ("speculative.mode", dict(help="none | rejection | greedy_draft | block")),
    "--mtp": ("speculative.mtp_checkpoint", dict(help="MTP heads: a pretrain-mtp run dir or an HF dir with mtp.*")),
    "--num-draft": ("speculative.num_draft", dict(type=int, help="K drafts per verify step")),
    "--draft-vocab": ("speculative.draft_vocab", dict(type=int, help="draft from this many ids (0 = all)")),
}


def _add_config_args(parser: argparse.ArgumentParser, flags: dict) -> None:
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    for flag, (key, kwargs) in flags.items():
        if kwargs.get("action") is None:
            kwargs = {"metavar": flag.lstrip("-").upper().replace("-", "_"), **kwargs}
        parser.add_argument(flag, dest=key, default=None, **kwargs)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _config_from_args(args: argparse.Namespace, flags: dict) -> Config:
    overrides = [f"{key}={getattr(args, key)}" for key, _ in flags.values() if getattr(args, key) is not None]
    return load_config(args.config, overrides + list(args.overrides))


def cmd_generate(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, _GENERATE_FLAGS)
    prompts = args.prompt or []
    if not prompts:
        raise SystemExit("error: give at least one --prompt")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise SystemExit(f"error: prompt {i} is empty")
    spec = cfg.speculative
    if spec.mode != "none" and spec.mtp_checkpoint is None:
        raise SystemExit(f"error: --mode {spec.mode} drafts with MTP heads: give --mtp RUN_DIR_OR_HF_DIR")
    _lead_only(cfg, "generate", lambda: _generate(cfg, prompts))


def _lead_only(cfg: Config, stage: str, fn) -> None:
    """A stage with one output (printed text, one directory): under `--worker=all` on a pod every process
    joins jax.distributed, process 0 runs it and the others wait for it (`distributed.lead_only`)."""
    from bebop_jax.distributed import initialize, lead_only

    initialize(cfg.mesh)
    lead_only(stage, fn)


def _generate(cfg: Config, prompts: list[str]) -> None:
    import jax
    import numpy as np

    from bebop_jax.checkpoint import load_mtp_heads
    from bebop_jax.batching import check_lengths
    from bebop_jax.model import load_model
    from bebop_jax.speculative import speculative_generate

    g, spec = cfg.generate, cfg.speculative
    t0 = time.perf_counter()
    model = load_model(cfg.model.source, cfg.model.dtype)
    tok = model.tokenizer
    if tok is None:
        raise SystemExit(f"error: {model.source} has no tokenizer (tokenizer.json); cannot encode a text prompt")
    ids = [tok.encode_prompt(p, g.chat) for p in prompts]
    max_len = min(cfg.model.max_seq_len, model.cfg.max_position_embeddings)
    try:
        check_lengths(np.array([len(i) for i in ids]), g.max_new_tokens, max_len)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    mtp_cfg = mtp_params = draft_ids = None
    if spec.mode != "none":
        mtp_cfg, mtp_params, draft_ids = load_mtp_heads(spec.mtp_checkpoint, model.cfg)
        if spec.draft_vocab and draft_ids is not None:
            raise SystemExit(f"error: the heads at {spec.mtp_checkpoint} draft from their own {len(draft_ids)}-id "
                             "vocabulary; --draft-vocab applies to full-vocabulary heads only")
        if spec.draft_vocab:  # BPE ids are merge-ordered, a proxy for frequency when no counts are at hand
            draft_ids = np.union1d(np.arange(min(spec.draft_vocab, model.cfg.vocab_size)), tok.eos_token_ids)
    print(f"loaded {model.source} ({model.cfg.family}, {model.cfg.num_layers} layers) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    kw = dict(mtp_params=mtp_params, mtp_cfg=mtp_cfg, mode=spec.mode, num_draft=spec.num_draft,
              max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, eos_ids=tok.eos_token_ids,
              max_seq_len=max_len, draft_ids=draft_ids, compact=spec.compact, max_rows=spec.max_rows)
    key = jax.random.key(g.seed)
    t0 = time.perf_counter()
    try:
        speculative_generate(model.params, model.cfg, ids, key, **kw)  # compile (and warm up) once
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rollout = speculative_generate(model.params, model.cfg, ids, key, **kw)
    elapsed = time.perf_counter() - t0
    for prompt, row, n in zip(prompts, rollout.tokens, rollout.num_tokens):
        print(f"### prompt: {prompt}\n{tok.decode(row[:n])}\n")
    total = int(rollout.num_tokens.sum())
    print(f"{total} tokens in {elapsed:.2f}s: {total / elapsed:.1f} tokens/s "
          f"(batch {len(prompts)}, mode {spec.mode}, compile + first run {compile_s:.1f}s)")
    if spec.mode != "none":
        metrics = rollout.metrics(spec.num_draft)
        print("  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))


def cmd_export(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, {"--model": _GENERATE_FLAGS["--model"]})
    _lead_only(cfg, "export", lambda: _export(cfg, args))


def _export(cfg: Config, args: argparse.Namespace) -> None:
    from bebop_jax.model import export_hf, load_model

    model = load_model(cfg.model.source)
    max_shard_bytes = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    if args.heads_only and (args.mtp is None or not args.out.endswith(".safetensors")):
        raise SystemExit("error: --heads-only writes the --mtp heads to a .safetensors file: give both")
    if args.mtp is None:
        export_hf(model, args.out, max_shard_bytes=max_shard_bytes)
        print(f"wrote {args.out} (HF safetensors, config.json, tokenizer)")
        return
    from bebop_jax.checkpoint import export_hf_with_mtp, load_mtp_heads, save_heads_file

    mtp, params, draft_ids = _user_errors(lambda: load_mtp_heads(args.mtp, model.cfg))
    if args.heads_only:
        save_heads_file(args.out, model.cfg, mtp, params, draft_ids, model=cfg.model.source)
        print(f"wrote {args.out} (the heads alone, bf16: {mtp.num_layers} MTP layer(s), K={mtp.num_steps}, "
              f"{'full vocabulary' if draft_ids is None else f'{len(draft_ids)} draft ids'}, "
              f"{os.path.getsize(args.out) / 2**20:.1f} MB)")
        return
    export_hf_with_mtp(model, mtp, params, args.out, max_shard_bytes=max_shard_bytes, draft_ids=draft_ids)
    print(f"wrote {args.out} (HF safetensors with {mtp.num_layers} MTP layer(s) as mtp.*, K={mtp.num_steps}, "
          "config.json, tokenizer)")


_BOOL_OFF = dict(action="store_const", const="false")
_SAMPLE_FLAGS = {
    "--model": _GENERATE_FLAGS["--model"],
    "--data-dir": ("data.dir", dict(help="where the token shards go: {dir}/train, {dir}/heldout")),
    "--prompts": ("data.prompts", dict(help="'math' (built-in generator) or a JSONL file of prompts / messages")),
    "--num-prompts": ("data.num_prompts", dict(type=int)),
    "--heldout-prompts": ("data.heldout_prompts", dict(type=int)),
    "--max-new-tokens": ("data.max_new_tokens", dict(type=int)),
    "--temperature": ("data.temperature", dict(type=float, help="rollout temperature of the samples")),
    "--seed": ("data.seed", dict(type=int)),
}
_PRETRAIN_FLAGS = {
    "--model": _GENERATE_FLAGS["--model"],
    "--data-dir": _SAMPLE_FLAGS["--data-dir"],
    "--corpus": ("data.corpus", dict(help="train on a .txt / .jsonl corpus instead of {data.dir}/train")),
    "--loss": ("pretrain.loss", dict(help="ce | kl | tv | e2e_tv | lk_alpha | lk_lambda")),
    "--steps": ("pretrain.steps", dict(type=int)),
    "--batch-size": ("pretrain.batch_size", dict(type=int)),
    "--learning-rate": ("pretrain.learning_rate", dict(type=float)),
    "--run-dir": ("pretrain.run_dir", dict(help="checkpoints/, tb/ and summary.json go here; resumes if present")),
    "--no-cache-hidden": ("pretrain.cache_hidden", dict(**_BOOL_OFF, help="run the trunk in every step")),
}
_EVAL_FLAGS = {
    "--model": _GENERATE_FLAGS["--model"],
    "--data-dir": ("data.dir", dict(help="held-out samples are read from {dir}/heldout")),
    "--temperatures": ("eval.temperatures", dict(type=lambda s: f"[{s}]", help="comma-separated, e.g. 1.0,0.7,0.5")),
}


def _user_errors(fn):
    """Runs fn, turning the errors of bad input (missing files, mismatched runs, a diverged loss) into messages."""
    try:
        return fn()
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_sample_data(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, _SAMPLE_FLAGS)
    from tqdm import tqdm

    from bebop_jax.data import self_distill
    from bebop_jax.model import load_model

    from bebop_jax.distributed import initialize

    initialize(cfg.mesh)  # under --worker=all each process samples its share of the prompts
    d = cfg.data
    model = load_model(cfg.model.source, cfg.model.dtype)
    if model.tokenizer is None:
        raise SystemExit(f"error: {model.source} has no tokenizer; cannot encode prompts")
    t0 = time.perf_counter()
    import jax

    with tqdm(total=d.num_prompts + d.heldout_prompts, desc="self-distillation", unit="prompt",
              disable=jax.process_index() != 0) as bar:
        splits = _user_errors(lambda: self_distill(cfg, model, progress=bar.update))
    for name, seqs in splits.items():
        new = sum(len(t) for t in seqs.tokens) - int(seqs.prompt_lengths.sum())
        print(f"{name}: {len(seqs)} sequences, {new} completion tokens -> {d.dir}/{name}")
    print(f"sampled in {time.perf_counter() - t0:.1f}s")


def cmd_pretrain_mtp(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, _PRETRAIN_FLAGS)
    from bebop_jax.distributed import Preempted, initialize
    from bebop_jax.pretrain_mtp import train

    initialize(cfg.mesh)  # before any other JAX call: on a pod, every process joins one set of devices
    try:
        summary = _user_errors(lambda: train(cfg))
    except Preempted as e:
        print(e, file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    summary.pop("history")
    print(json.dumps(summary, indent=2))


def cmd_eval_acceptance(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, _EVAL_FLAGS)
    import jax

    from bebop_jax.distributed import barrier, initialize
    from bebop_jax.eval_acceptance import default_report_path, run

    initialize(cfg.mesh)  # under --worker=all each process scores its share of the held-out rows
    report = _user_errors(lambda: run(cfg, args.heads, args.out))
    if jax.process_count() > 1:
        barrier("eval-acceptance written")
    if jax.process_index() != 0:
        return
    for res in report["results"]:
        alphas = "  ".join(f"alpha_{k + 1}={a:.3f}" for k, a in enumerate(res["alpha"]))
        slope = res["heads"][0]["fit"]["slope"]
        print(f"T={res['temperature']:g}: {alphas}  E[accepted length]={res['expected_length']:.3f}  "
              f"d alpha_1 / d H = {slope:+.3f} per nat")
    print(f"wrote {args.out or default_report_path(args.heads)} and .png")


_RL_FLAGS = {
    "--model": _GENERATE_FLAGS["--model"],
    "--mode": _GENERATE_FLAGS["--mode"],
    "--mtp": _GENERATE_FLAGS["--mtp"],
    "--num-draft": _GENERATE_FLAGS["--num-draft"],
    "--steps": ("rl.steps", dict(type=int, help="learner updates")),
    "--loop": ("rl.loop", dict(help="async | sync")),
    "--run-dir": ("rl.run_dir", dict(help="checkpoints, tensorboard, metrics.jsonl, curves.png")),
}


def cmd_rl(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, _RL_FLAGS)
    from bebop_jax.distributed import initialize
    from bebop_jax.rl.loop import train_rl

    initialize(cfg.mesh)  # before any other JAX call: on a pod, every process joins one set of devices
    summary = _user_errors(lambda: train_rl(cfg))
    print(json.dumps(summary, indent=2))


_PLAN_FLAGS = {
    "--devices": ("plan.devices", dict(type=int, help="devices of the target slice (v5p: chips)")),
    "--hbm-gib": ("plan.hbm_gib", dict(type=float, help="memory per device in GiB (v5p: 95)")),
    "--accelerator": ("plan.accelerator", dict(help="compile for this TPU slice on the TPU compiler (v5litepod-8, "
                                                    "v5p-64, v6e-16, ...; needs libtpu: pip install -e '.[tpu]')")),
}


def cmd_plan(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args, _PLAN_FLAGS)
    from bebop_jax.plan import run

    _user_errors(lambda: run(cfg))


def cmd_demo(args: argparse.Namespace) -> None:
    from bebop_jax.demo import DEFAULT_CONFIG, run_demo

    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    _user_errors(lambda: run_demo(cfg, args.out))


def cmd_analyze(args: argparse.Namespace) -> None:
    from bebop_jax.analyze import analyze

    if not os.path.isdir(args.run):
        raise SystemExit(f"error: run directory '{args.run}' does not exist")
    _lead_only(Config(), "analyze", lambda: print(f"wrote {analyze(args.run)}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bebop", description="bebop-jax: MTP speculative rollouts for LLM RL")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from prompts (plain or speculative decoding)")
    _add_config_args(gen, _GENERATE_FLAGS)
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="write a model as an HF safetensors directory")
    _add_config_args(exp, {"--model": _GENERATE_FLAGS["--model"]})
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--max-shard-mb", type=int, default=None, help="shard the weights (index form)")
    exp.add_argument("--mtp", default=None, help="also write MTP heads (a pretrain-mtp run dir) as mtp.* tensors")
    exp.add_argument("--heads-only", action="store_true",
                     help="write only the --mtp heads, as one bf16 .safetensors file (--out FILE) that "
                          "`--mtp FILE` loads, checked against the model")
    exp.set_defaults(func=cmd_export)

    sample = sub.add_parser("sample-data", help="self-distillation: sample the policy on prompts into token shards")
    _add_config_args(sample, _SAMPLE_FLAGS)
    sample.set_defaults(func=cmd_sample_data)

    pre = sub.add_parser("pretrain-mtp", help="train MTP draft heads on the frozen trunk (resumes a run dir)")
    _add_config_args(pre, _PRETRAIN_FLAGS)
    pre.set_defaults(func=cmd_pretrain_mtp)

    ev = sub.add_parser("eval-acceptance", help="per-head acceptance and expected length on held-out samples")
    _add_config_args(ev, _EVAL_FLAGS)
    ev.add_argument("--heads", required=True, help="a pretrain-mtp run dir, or an HF dir with mtp.* tensors")
    ev.add_argument("--out", default=None, help="JSON report path (default: in the heads' run directory, beside a heads file, or "
                    "runs/eval-acceptance/NAME/ for shipped heads); PNG beside it")
    ev.set_defaults(func=cmd_eval_acceptance)

    rl = sub.add_parser("rl", help="GRPO/PPO with speculative rollouts, async actor/learner (resumes a run dir)")
    _add_config_args(rl, _RL_FLAGS)
    rl.set_defaults(func=cmd_rl)

    plan = sub.add_parser("plan", help="per-device memory of the run's real-size steps, compiled on a fake mesh")
    _add_config_args(plan, _PLAN_FLAGS)
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M-Instruct (~15 min on a 2-core CPU)")
    demo.add_argument("--config", help="YAML config (default configs/demo.yaml)")
    demo.add_argument("--out", default="runs/demo", help="output directory (data, heads, RL runs, report)")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    demo.set_defaults(func=cmd_demo)

    an = sub.add_parser("analyze", help="Markdown report with figures from the runs under a directory")
    an.add_argument("--run", required=True, help="a directory of runs (e.g. runs/demo)")
    an.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except (FileNotFoundError, ValueError) as e:
        from bebop_jax.model.weights import WeightsError

        if isinstance(e, (WeightsError, FileNotFoundError)):  # a missing or corrupt model or heads file: one line
            raise SystemExit(f"error: {e}") from None
        raise


if __name__ == "__main__":
    main()
