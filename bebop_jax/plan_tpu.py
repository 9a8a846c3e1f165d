"""`bebop plan --accelerator v5p-64`: the run's steps compiled by the TPU compiler for a real slice.

The same steps, shapes and shardings as `bebop_jax.plan` (see there), compiled for the compile-only
devices of the slice's topology (`bebop_jax.tpu`) with the kernels a TPU backend selects (the Pallas
kernels, each inside shard_map), so the figures are the TPU compiler's:

- per-device bytes from `memory_analysis()`, FITS / DOES NOT FIT against the device's HBM as the
  topology's chip reports it (`tpu.chip_info`);
- which kernel implementation each step compiled: `pallas` where a Mosaic kernel is in the program,
  `jnp` where the step has none (learner, prefill);
- a roofline time per step, max(flops / peak bf16 FLOP/s, bytes accessed / HBM bandwidth), from
  `cost_analysis()` (every pallas_call carries a pl.CostEstimate, so the kernels count). The decode
  step is one verify step (`speculative.decode_step`, the body of the decode loop);
- for decode, the roofline time of a plain step (K = 0) against a K-draft verify step, K = 1..4, and
  the speed-up speculative decoding would then give at per-draft acceptance a: E[tokens per step] /
  (verify step / plain step), E[tokens] = 1 + a + ... + a^K.

Everything here is a compile-time prediction for a chip this host does not have, not a measurement.
"""

from __future__ import annotations

import dataclasses
import sys

from bebop_jax import plan, sharding, tpu
from bebop_jax.config import Config, ConfigError

ACCEPTANCES = (0.6, 0.8, 0.95)
MAX_DRAFTS = 4
GIB = plan.GIB


def roofline_seconds(flops: float, bytes_accessed: float, chip: tpu.ChipInfo) -> float:
    """max(flops / peak bf16 FLOP/s, bytes / HBM bytes/s) of one device."""
    return max(flops / chip.bf16_flops_per_s, bytes_accessed / chip.hbm_bytes_per_s)


def expected_tokens(alpha: float, num_draft: int) -> float:
    """Tokens per verify step with K drafts each accepted with probability alpha: 1 + a + ... + a^K."""
    return sum(alpha ** i for i in range(num_draft + 1))


@dataclasses.dataclass(frozen=True)
class SpecRow:
    """One decode variant: K drafts, its verify step's roofline seconds and the bytes that step moves."""

    num_draft: int
    seconds: float
    bytes_accessed: float
    floor: int  # per device: the weights and KV cache the step must read (`plan.read_floor`)

    def speedups(self, plain: "SpecRow") -> list[float]:
        return [expected_tokens(a, self.num_draft) / (self.seconds / plain.seconds) for a in ACCEPTANCES]


def _check_fits_unsharded_state(cfg: Config, acc: tpu.Accelerator, chip: tpu.ChipInfo, mesh, rules) -> None:
    """Raises ConfigError before any compile where the learner's parameters and optimizer state alone exceed
    a device's HBM."""
    if "learner" not in cfg.plan.steps:
        return
    counted = plan.counted_bytes(cfg, "learner", mesh, rules)
    state = counted["params"] + counted["optimizer"]
    if state > chip.hbm_bytes:
        raise ConfigError(f"config key 'plan.model': {cfg.plan.model}'s parameters and optimizer state need "
                          f"{state / GIB:.1f} GiB per device on {acc.name}, more than its {chip.hbm_bytes / GIB:.1f} "
                          f"GiB of HBM; choose a larger slice or raise mesh.fsdp")


def spec_table(cfg: Config, mesh, rules, chip: tpu.ChipInfo, plans: dict, lower_on) -> list[SpecRow]:
    """The decode step at K = 0..MAX_DRAFTS (the config's K reuses its plan), each one verify step."""
    base = plan.Shapes.from_config(cfg)
    rows = []
    for k in range(MAX_DRAFTS + 1):
        if k == base.num_draft and "decode" in plans:
            p = plans["decode"]
        else:
            print(f"plan: compiling decode at K={k} ...", file=sys.stderr, flush=True)
            p = plan.plan_step(cfg, "decode", mesh, rules, dataclasses.replace(base, num_draft=k), lower_on)
        rows.append(SpecRow(k, roofline_seconds(p.flops, p.bytes_accessed, chip), p.bytes_accessed,
                            p.floor))
    return rows


def format_report(cfg: Config, acc: tpu.Accelerator, chip: tpu.ChipInfo, plans: list[plan.StepPlan],
                  spec: list[SpecRow]) -> str:
    model = plan.architecture(cfg.plan.model, cfg.model.dtype)
    data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, acc.chips)
    hbm = chip.hbm_bytes
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"bebop plan: {cfg.plan.model} ({model.num_layers} layers) on {acc.name} = {chip.kind} x {acc.chips} "
             f"devices (data={data} x fsdp={fsdp} x tensor={tensor}), {hbm / GIB:.1f} GiB HBM, "
             f"{chip.hbm_bytes_per_s / 1e12:.2f} TB/s, {chip.bf16_flops_per_s / 1e12:.0f} bf16 TFLOP/s each",
             f"the TPU compiler's figures for {chip.kind} (libtpu, compile-only devices): a compile-time prediction, "
             f"not a measurement; compute {model.dtype}, learner parameters and optimizer state float32, the actor "
             f"decodes from {model.dtype} weights; GiB per device", ""]
    header = ("step", "shape", "params", "optimizer", "kv cache", "in/out", "temporaries", "total", "HBM", "verdict",
              "kernels", "GFLOP", "GB moved", "roofline ms", "bound", "compiled at", "compile s")
    table = [header]
    for p in plans:
        t_flops, t_bytes = p.flops / chip.bf16_flops_per_s, p.bytes_accessed / chip.hbm_bytes_per_s
        table.append((p.name, p.shape, gib(p.params), gib(p.optimizer), gib(p.kv_cache), gib(p.io),
                       gib(p.temporaries), gib(p.total), f"{100 * p.total / hbm:.0f}%",
                       "FITS" if p.total <= hbm else "DOES NOT FIT", "pallas" if p.pallas else "jnp",
                       f"{p.flops / 1e9:.1f}", f"{p.bytes_accessed / 1e9:.2f}", f"{1e3 * max(t_flops, t_bytes):.2f}",
                       "memory" if t_bytes >= t_flops else "compute",
                       " and ".join(map(str, p.compiled_layers)) + " layers" if p.compiled_layers else "heads only",
                       f"{p.compile_seconds:.0f}"))
    lines += plan.columns(table, left=(0, 1, 9, 10, 14, 15))
    lines.append("kernels: pallas = the Pallas kernels compiled in (decode: rejection sampling; mtp: fused acceptance); "
                 "jnp = the step has no kernel. decode is one verify step (the decode loop's body).")
    if spec:
        plain = spec[0]
        lines += ["", f"speculative decoding on {chip.kind} (roofline per verify step, "
                      f"{plan.Shapes.from_config(cfg).describe('decode').split(', K=')[0]}): "
                      "predicted speed-up over plain decoding at per-draft acceptance "
                      + " / ".join(map(str, ACCEPTANCES))]
        table = [("K", "step ms", "x plain step", "GB moved", "/ floor")
                 + tuple(f"speed-up @{a}" for a in ACCEPTANCES)]
        for row in spec:
            table.append((str(row.num_draft), f"{1e3 * row.seconds:.3f}", f"{row.seconds / plain.seconds:.2f}",
                          f"{row.bytes_accessed / 1e9:.2f}", f"{row.bytes_accessed / row.floor:.2f}")
                         + tuple(f"x{s:.2f}" for s in row.speedups(plain)))
        lines += plan.columns(table, left=())
        lines.append("GB moved: HBM traffic by the compiled program's memory spaces (`plan.hbm_traffic`); floor: the "
                     "weights and KV cache the step must read (the heads' only when it drafts; an untied input "
                     "embedding by the rows it looks up)")
        depths = next(p.compiled_layers for p in plans if p.name == "decode")  # spec exists only with decode
        if len(depths) == 2:
            lines.append(f"extrapolated from {depths[0]} and {depths[1]} layers: the compiler prefetches and fuses a "
                         "program this shallow differently, so these rows can be off by 10-30% and out of order in K; "
                         "plan.compile_layers=[] compiles the full depth, the faithful table")
    return "\n".join(lines)


def run(cfg: Config, out=None) -> tuple[list[plan.StepPlan], list[SpecRow]]:
    """Plans every step of `cfg` on the TPU compiler for `plan.accelerator` and prints the report. Bad input
    (accelerator, mesh, a model that cannot fit, libtpu missing) raises ConfigError before any compile."""
    acc = tpu.accelerator(cfg.plan.accelerator)
    try:
        tpu.require_libtpu()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = plan.architecture(cfg.plan.model, cfg.model.dtype)
    plan.Shapes.from_config(cfg)
    try:
        sharding.mesh_shape(cfg.mesh, acc.chips)
    except ValueError as e:
        raise ConfigError(f"config key 'mesh': {e} on {acc.name} ({acc.chips} devices)") from None
    devices = tpu.compile_only_devices(acc)
    chip = tpu.chip_info(devices[0])
    meshes = {name: plan.plan_mesh(cfg, model, devices, name) for name in plan.STEPS}
    _check_fits_unsharded_state(cfg, acc, chip, *meshes["learner"])
    plans = []
    for name in cfg.plan.steps:
        print(f"plan: compiling {name} for {acc.name} ...", file=sys.stderr, flush=True)
        plans.append(plan.plan_step(cfg, name, *meshes[name], lower_on=devices[0]))
    by_name = {p.name: p for p in plans}
    spec = spec_table(cfg, *meshes["decode"], chip, by_name, devices[0]) if "decode" in by_name else []
    print(format_report(cfg, acc, chip, plans, spec), file=out or sys.stdout, flush=True)
    return plans, spec

