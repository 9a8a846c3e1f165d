"""`bebop plan`: does a run fit? Per-device memory of its real-size steps, compiled ahead of time.

Each step is lowered from `jax.ShapeDtypeStruct`s (no weights are allocated) with the shardings the run
would use, on a fake mesh of `plan.devices` CPU devices, and compiled; XLA's `memory_analysis()` of
the compiled per-device program gives its argument, output, aliased and temporary bytes:

    learner  `rl.learner.learner_step`: trunk forward + backward + AdamW on one RL batch [rows, length]
             (with rl.share_prefix, each task's prompt, max_prompt_tokens wide, runs once for its rows)
    prefill  `speculative.prefill`: one rollout batch of prompts into a fresh KV cache
    decode   `speculative.decode_step`: one step of the verify loop (K drafts, from pretrain.draft_vocab ids
             when > 0, one trunk forward of K + 1 tokens over the KV cache, rejection sampling); its state,
             KV cache included, is donated
    mtp      `pretrain_mtp.train_step`: the MTP heads on cached trunk hidden states (on the rows of a
             draft sub-vocabulary of pretrain.draft_vocab ids when > 0)

Shapes come from the run's config: RL rows = rl.prompts_per_step x rl.group_size (single-turn),
length and cache as the actor pads them, K = speculative.num_draft, the MTP step at
pretrain.batch_size x pretrain.seq_len with every position an origin. Parameters, optimizer state and
KV cache are also counted from their shardings; "in/out" is the rest of the arguments and the outputs
not aliased to donated arguments; the total is arguments + outputs - aliased + temporaries.

The trunk is compiled at its full depth (unrolled: Qwen3-8B's 36-layer learner step compiles in
~1 min with LLVM at -O0, which leaves buffer assignment unchanged). `plan.compile_layers: [a, b]`
compiles two small depths instead and extrapolates every size linearly, which is faster but
approximate: on Qwen3-8B, [2, 4] predicts the 36-layer learner and decode to 0.1% and prefill 8% low.
The numbers are XLA:CPU's buffer assignment: the TPU compiler fuses differently and uses the
Pallas kernels (the CPU program uses their jnp paths), so leave headroom. This is the fallback:
`plan.accelerator` (`--accelerator v5p-64`) compiles the same steps with the TPU compiler for that
slice instead (`bebop_jax.plan_tpu`). The rollout steps (prefill, decode) run on the actor's mesh
(`sharding.rl_meshes`: data x tensor, no fsdp), the others on the learner's (`mesh.*`).

`run` needs the fake devices before jax initialises (XLA_FLAGS=--xla_force_host_platform_device_count)
and re-executes itself in a subprocess when the current process lacks them.
Not here on purpose: the reference policy of rl.kl_coef > 0, multi-turn environments (they multiply
the learner rows by their turns).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bebop_jax import sharding
from bebop_jax.config import Config, ConfigError, load_config, to_dict
from bebop_jax.batching import cache_length_for
from bebop_jax.model.mtp import MTPConfig
from bebop_jax.model.transformer import CACHE_AXES, KVCache, TransformerConfig
from bebop_jax.model.weights import config_from_hf
from bebop_jax.pretrain_mtp import StepSettings, TrainState, train_step
from bebop_jax.rl.learner import LearnerSettings, LearnerState, SharedPrefix, Trajectories, learner_step
from bebop_jax.speculative import decode_step, prefill

# Architectures by name, as their HF config.json says (Qwen/Qwen3-*; all untied above 4B).
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8, rope_theta=1000000.0,
              rms_norm_eps=1e-6, max_position_embeddings=40960)
KNOWN_MODELS: dict[str, dict] = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      tie_word_embeddings=False),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      tie_word_embeddings=False),
}
GIB = 2**30
CATEGORIES = ("params", "optimizer", "kv_cache")


def architecture(spec: str, dtype: str = "bfloat16") -> TransformerConfig:
    """The trunk of a KNOWN_MODELS name, or of an HF config.json (a file or the directory holding it)."""
    if spec in KNOWN_MODELS:
        return config_from_hf(KNOWN_MODELS[spec], dtype)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not (path.endswith(".json") and os.path.isfile(path)):
        raise ConfigError(f"config key 'plan.model': '{spec}' is neither a known architecture "
                          f"({', '.join(KNOWN_MODELS)}) nor an HF config.json or a directory holding one")
    with open(path) as f:
        return config_from_hf(json.load(f), dtype)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The run's static sizes (see the module docstring for where each comes from)."""

    learner_rows: int
    learner_len: int
    learner_prefixes: int  # shared prompts the learner runs once each (rl.share_prefix); 0: whole rows
    rollout_rows: int
    prompt_len: int
    new_tokens: int
    cache_len: int
    num_draft: int
    mtp_rows: int
    mtp_len: int

    @classmethod
    def from_config(cls, cfg: Config) -> Shapes:
        rl, k = cfg.rl, cfg.speculative.num_draft
        if k > cfg.mtp.num_steps:
            raise ConfigError(f"config key 'speculative.num_draft': expected <= mtp.num_steps={cfg.mtp.num_steps}, "
                              f"got {k}")
        rows = rl.prompts_per_step * rl.group_size
        return cls(learner_rows=rows, learner_len=cache_length_for(rl.max_prompt_tokens, rl.max_new_tokens),
                   learner_prefixes=rl.prompts_per_step + 1 if rl.share_prefix else 0,
                   rollout_rows=rows, prompt_len=rl.max_prompt_tokens, new_tokens=rl.max_new_tokens,
                   cache_len=cache_length_for(rl.max_prompt_tokens, rl.max_new_tokens, extra=k + 2), num_draft=k,
                   mtp_rows=cfg.pretrain.batch_size, mtp_len=cfg.pretrain.seq_len)

    def describe(self, step: str) -> str:
        shared = f" ({self.learner_prefixes} x {self.prompt_len} shared)" if self.learner_prefixes else ""
        return {"learner": f"{self.learner_rows} x {self.learner_len}{shared}",
                "prefill": f"{self.rollout_rows} x {self.prompt_len} -> {self.cache_len}",
                "decode": f"{self.rollout_rows} x {self.cache_len}, K={self.num_draft}",
                "mtp": f"{self.mtp_rows} x {self.mtp_len}"}[step]


# ---------------------------------------------------------------------------------------------
# Abstract, logically named arguments of each step


def _box(shape, dtype, names) -> nn.LogicallyPartitioned:
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(tuple(shape), dtype), tuple(names))


def _rows(shape, dtype) -> nn.LogicallyPartitioned:
    """A data array whose rows are spread over the batch axes."""
    return _box(shape, dtype, ("activation_batch",) + (None,) * (len(shape) - 1))


def _boxed_like(x: jax.ShapeDtypeStruct, names) -> nn.LogicallyPartitioned:
    return _box(x.shape, x.dtype, names)


def _boxed_spec_state(s) -> Any:
    """Logical names for a SpecState of ShapeDtypeStructs: rows over the batch axes, caches by CACHE_AXES."""
    def rows(x):
        return _rows(x.shape, x.dtype)

    def caches(cs):
        return tuple(KVCache(_boxed_like(c.k, CACHE_AXES.k), _boxed_like(c.v, CACHE_AXES.v)) for c in cs)

    return s.replace(tokens=rows(s.tokens), logprobs=rows(s.logprobs), entropies=rows(s.entropies),
                     num_tokens=rows(s.num_tokens), position=rows(s.position), draft_hidden=rows(s.draft_hidden),
                     done=rows(s.done), trunk_cache=caches(s.trunk_cache), mtp_cache=caches(s.mtp_cache),
                     verify_steps=rows(s.verify_steps), accepted=rows(s.accepted),
                     emitted_per_step=_boxed_like(s.emitted_per_step, (None, "activation_batch")))


@dataclasses.dataclass(frozen=True)
class Step:
    """One step to compile: fn(*args) with boxed abstract args and outputs, and what its bytes are."""

    fn: Callable
    args: tuple
    out: Any  # boxed outputs whose shardings are fixed; None leaves are left to XLA
    donate: tuple[int, ...]
    counted: dict  # category -> boxed subtree of args or outputs (params, optimizer, kv_cache)


def build_learner(cfg: Config, model: TransformerConfig, shapes: Shapes) -> Step:
    rl = cfg.rl
    settings = LearnerSettings(temperature=rl.temperature, clip_eps=rl.clip_eps, is_cap=rl.is_cap,
                               learning_rate=rl.learning_rate)
    params = sharding.abstract_params(model)
    state = LearnerState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(settings.optimizer().init, params))
    B, L = shapes.learner_rows, shapes.learner_len
    traj = Trajectories(tokens=_rows((B, L), jnp.int32), loss_mask=_rows((B, L), jnp.bool_),
                        behaviour_logprobs=_rows((B, L), jnp.float32), rewards=_rows((B,), jnp.float32),
                        group_ids=_rows((B,), jnp.int32), policy_version=_rows((B,), jnp.int32))
    if shapes.learner_prefixes:
        whole = lambda n: _box((n,), jnp.int32, (None,))  # noqa: E731
        G, P = shapes.learner_prefixes, shapes.prompt_len
        traj = traj.replace(prefix=SharedPrefix(source_row=whole(G), length=whole(G), of_row=whole(B), width=P,
                                                suffix=L - P))
    fn = functools.partial(learner_step, cfg=model, settings=settings, num_groups=rl.prompts_per_step + 1)
    return Step(fn, (state, traj, _rows((B, L), jnp.float32)), (state, None), (0,),
                {"params": state.params, "optimizer": state.opt_state})


def in_compute_dtype(boxed_tree, dtype) -> Any:
    """Floating leaves of a tree of (boxed) ShapeDtypeStructs in `dtype`: the actor's published weights."""
    def cast(x):
        return jax.ShapeDtypeStruct(x.shape, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, boxed_tree)


def _rollout_inputs(cfg: Config, model: TransformerConfig, shapes: Shapes):
    """(prefill's boxed args, prefill with its static settings, those settings, the boxed SpecState)."""
    mtp = MTPConfig(max(cfg.mtp.num_steps, shapes.num_draft), cfg.mtp.num_layers)
    B = shapes.rollout_rows
    params, heads = (in_compute_dtype(t, model.compute_dtype)
                     for t in (sharding.abstract_params(model), sharding.abstract_heads(model, mtp)))
    args = (params, heads, _rows((B, shapes.prompt_len), jnp.int32), _rows((B,), jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.float32))
    static = dict(cfg=model, mtp_cfg=mtp if shapes.num_draft else None, num_draft=shapes.num_draft, greedy=False,
                  top_p=1.0, eos_ids=())
    fill = functools.partial(prefill, max_new_tokens=shapes.new_tokens, cache_len=shapes.cache_len, **static)
    state = _boxed_spec_state(jax.eval_shape(fill, *nn.meta.unbox(args)))
    return args, fill, static, state


def build_prefill(cfg: Config, model: TransformerConfig, shapes: Shapes) -> Step:
    args, fill, _, state = _rollout_inputs(cfg, model, shapes)
    return Step(fill, args, state, (),
                {"params": args[:2], "kv_cache": (state.trunk_cache, state.mtp_cache)})


def build_decode(cfg: Config, model: TransformerConfig, shapes: Shapes) -> Step:
    """The verify step; with pretrain.draft_vocab > 0 (and drafts) the heads draft from that many ids."""
    args, _, static, state = _rollout_inputs(cfg, model, shapes)
    draft_ids = ()
    if cfg.pretrain.draft_vocab and shapes.num_draft:
        draft_ids = (_box((cfg.pretrain.draft_vocab,), jnp.int32, (None,)),)
    return Step(functools.partial(decode_step, **static), (args[0], args[1], state, args[-1]) + draft_ids, state, (2,),
                {"params": args[:2], "kv_cache": (state.trunk_cache, state.mtp_cache)})


def build_mtp(cfg: Config, model: TransformerConfig, shapes: Shapes) -> Step:
    mtp = MTPConfig(cfg.mtp.num_steps, cfg.mtp.num_layers)
    settings = StepSettings.from_config(cfg.pretrain, num_origins=shapes.mtp_len)
    heads = sharding.abstract_heads(model, mtp)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), heads, jax.eval_shape(settings.optimizer().init, heads))
    V, D, Vd = model.vocab_size, model.hidden_size, cfg.pretrain.draft_vocab
    frozen = {"embedding": _box((V, D), jnp.float32, ("vocab", "embed")),
              "w_vocab": _box((Vd or V, D), jnp.float32, ("vocab", "embed"))}
    B, T = shapes.mtp_rows, shapes.mtp_len
    batch = {"hidden": _box((B, T, D), jnp.bfloat16, ("activation_batch", "activation_length", "activation_embed")),
             "tokens": _rows((B, T), jnp.int32), "positions": _rows((B, T), jnp.int32),
             "segment_ids": _rows((B, T), jnp.int32), "completion": _rows((B, T), jnp.bool_)}
    if Vd:  # a draft sub-vocabulary: its rows of the LM head, the full-vocabulary index and log-normalisers
        frozen["vocab_index"] = jax.ShapeDtypeStruct((V,), jnp.int32)
        batch["target_logz"] = _rows((B, T), jnp.float32)
    return Step(functools.partial(train_step, cfg=model, mtp=mtp, settings=settings), (state, frozen, batch),
                (state, None), (0,),
                {"params": (state.params, frozen), "optimizer": state.opt_state})


STEPS: dict[str, Callable[[Config, TransformerConfig, Shapes], Step]] = {
    "learner": build_learner, "prefill": build_prefill, "decode": build_decode, "mtp": build_mtp}
TRUNK_DEPTH_MATTERS = ("learner", "prefill", "decode")  # the mtp step never runs the trunk


# ---------------------------------------------------------------------------------------------
# Bytes per device


def per_device_bytes(boxed_tree: Any, mesh: Mesh | jax.sharding.AbstractMesh, rules: sharding.Rules) -> int:
    """Bytes one device holds of a tree of (boxed) ShapeDtypeStructs: boxes sharded by their logical
    names, other leaves replicated."""
    def split(axes) -> int:  # how many ways a dimension is split by a PartitionSpec entry
        return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))

    def leaf_bytes(x) -> int:
        ways = 1
        if isinstance(x, nn.LogicallyPartitioned):
            ways = math.prod(split(a) for a in sharding.partition_spec(x.names, x.value.shape, mesh, rules))
            x = x.value
        return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // ways

    leaves = jax.tree.leaves(boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return sum(leaf_bytes(x) for x in leaves)


ROLLOUT_STEPS = ("prefill", "decode")  # the actor's: on its mesh (`sharding.rl_meshes`), the rest on the learner's


def plan_mesh(cfg: Config, model: TransformerConfig, devices=None, name: str = "learner"):
    """(mesh, rules) step `name` runs on: the learner's mesh (`mesh.*`), or for the rollout steps the actor's
    (`sharding.rl_meshes`: its share of the devices by rl.actor_devices, laid out for decoding). A concrete mesh
    over `devices`, or an AbstractMesh of plan.devices when None."""
    n = cfg.plan.devices if devices is None else len(devices)
    learner_n, actor_n = (len(part) for part in sharding.split_devices(range(n), cfg.rl.actor_devices))
    mesh_cfg, count = ((sharding.actor_mesh_config(cfg.mesh), actor_n) if name in ROLLOUT_STEPS
                       else (cfg.mesh, learner_n))
    if devices is None:
        mesh = jax.sharding.AbstractMesh(sharding.mesh_shape(mesh_cfg, count), sharding.AXES)
    else:
        learner, actor = sharding.rl_meshes(cfg.mesh, cfg.rl.actor_devices, devices)
        mesh = actor if name in ROLLOUT_STEPS else learner
    return mesh, sharding.make_rules(mesh, cfg.mesh.rules, sharding.trunk_dims(model))


def counted_bytes(cfg: Config, name: str, mesh=None, rules=None) -> dict[str, int]:
    """Parameters, optimizer state and KV cache of step `name` at the full depth, per device, from the shardings."""
    model = architecture(cfg.plan.model, cfg.model.dtype)
    if mesh is None:
        mesh, rules = plan_mesh(cfg, model, name=name)
    step = STEPS[name](cfg, model, Shapes.from_config(cfg))
    return {c: per_device_bytes(step.counted.get(c, ()), mesh, rules) for c in CATEGORIES}


_ITEMSIZE = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)
# an array in HLO text, with its layout when it has one: f32[2,8]{1,0:S(1)} (S(1): in VMEM)
_SHAPE = re.compile(rf"({'|'.join(_ITEMSIZE)})\[([0-9,]*)\](?:\{{[^}}]*\}})?")


def _shape_bytes(text: str) -> int:
    m = _SHAPE.match(text)
    return math.prod(int(d) for d in m.group(2).split(",") if d) * _ITEMSIZE[m.group(1)]


_INSTRUCTION = re.compile(r"\s*(ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)")
_NO_TRAFFIC = ("parameter", "get-tuple-element", "bitcast", "constant", "tuple", "while", "conditional", "call",
               "partition-id", "replica-id", "after-all")
_SLICING = ("gather", "dynamic-slice", "slice")


def _buffers(shape: str) -> list[tuple[int, bool]]:
    """(bytes, in VMEM) of each array in an instruction's shape (a tuple's elements in order)."""
    return [(_shape_bytes(m[0]), "S(1)" in m[0]) for m in _SHAPE.finditer(shape)]


def _computations(hlo: str) -> dict[str, list[tuple]]:
    """Computation name -> its instructions as (root, name, shape, op, operand names, the computation a
    fusion calls or a parameter's index)."""
    comps = {}
    for comp in re.split(r"\n(?=%|ENTRY )", hlo):
        head = re.match(r"(?:ENTRY )?%([\w.\-]+)", comp)
        if not head:
            continue
        comps[head.group(1)] = instructions = []
        for m in map(_INSTRUCTION.match, comp.split("\n")[1:]):
            if m:
                args, _, attrs = m[5].partition("), ")
                called = re.search(r"calls=%([\w.\-]+)", attrs)
                extra = int(re.match(r"\d+", args).group(0)) if m[4] == "parameter" else called and called.group(1)
                instructions.append((m[1], m[2], m[3], m[4], re.findall(r"%([\w.\-]+)", args), extra))
    return comps


def _sliced_bytes(name: str, users: dict[str, list[tuple]]) -> int | None:
    """Bytes the gathers and slices of a fused computation take from `name` (directly or through bitcasts),
    or None where anything else reads it (then it is read whole)."""
    taken = 0
    for user in users.get(name, []):
        if user[3] == "bitcast":
            inner = _sliced_bytes(user[1], users)
            if inner is None:
                return None
            taken += inner
        elif user[3] in _SLICING and user[4][0] == name:
            taken += _shape_bytes(user[2])
        else:
            return None
    return taken


def _fusion_reads(fused: list[tuple], operands: list[list[tuple[int, bool]]]) -> tuple[int, int]:
    """(HBM bytes a fusion reads, bytes its outputs write) from its fused computation: an operand
    that only feeds gathers or slices is read by the rows they take; a root scatter into an operand
    (in place: a KV-cache write) reads and writes its updates, not the whole buffer."""
    shape_of = {ins[1]: ins[2] for ins in fused}
    users: dict[str, list[tuple]] = {}
    for ins in fused:
        for o in ins[4]:
            users.setdefault(o, []).append(ins)
    params = {name: index for _, name, _, op, _, index in fused if op == "parameter"}
    read, in_place = 0, None
    root = next((ins for ins in fused if ins[0]), fused[-1])
    if root[3] == "scatter" and root[4] and root[4][0] in params:
        in_place = root[4][0]
        updates = _shape_bytes(shape_of[root[4][2]])
    for name, index in params.items():
        size, in_vmem = operands[index][0] if index < len(operands) and operands[index] else (0, True)
        if in_vmem:
            continue
        if name == in_place:
            read += updates
            continue
        taken = _sliced_bytes(name, users)
        read += size if taken is None else min(size, taken)
    return read, (None if in_place is None else updates)


def _in_hbm(buffers: list[tuple[int, bool]]) -> int:
    return sum(size for size, in_vmem in buffers if not in_vmem)


def hbm_traffic(hlo: str) -> dict[str, int]:
    """Bytes a compiled TPU program moves in HBM, by kind: `prefetch` (async copies and slices into VMEM),
    `scatter` (in-place scatters: KV-cache writes) and `other`; a while loop's body counted once.

    XLA's cost analysis counts every operand and output of an instruction whole, wherever it lives. On a TPU
    the compiler places small arrays, and weights it prefetches ahead of their use (`copy-start` /
    `slice-start`), in VMEM (memory space S(1) in a layout): the cost analysis counts a prefetched weight at
    the copy, as the copy's context, and again at each read from VMEM, and an in-place scatter as a read and
    a write of the whole buffer. Here each instruction outside fusions counts its operands and outputs in
    HBM only, a fusion the rows its gathers take, a scatter its updates, and an async copy its HBM side.
    `hlo`: the compiled program's text (`compiled.as_text()`).
    """
    traffic = {"prefetch": 0, "scatter": 0, "other": 0}
    for ins in hbm_instructions(hlo):
        traffic[ins.kind] += ins.bytes
    return traffic


@dataclasses.dataclass(frozen=True)
class Moved:
    """One instruction of a compiled program (outside fusions) and the HBM bytes it moves (`hbm_traffic`)."""

    kind: str  # prefetch, scatter or other
    op: str  # the HLO opcode: fusion, copy, reshape, copy-start, ...
    name: str
    shape: str  # its output's shape and layout, as the HLO text writes it
    bytes: int


def hbm_instructions(hlo: str) -> list[Moved]:
    """The instructions of `hlo` that move bytes in HBM, each with its count (`hbm_traffic` sums them)."""
    comps = _computations(hlo)
    inner = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
    moved = []
    for comp_name, instructions in comps.items():
        if comp_name in inner:
            continue
        defs: dict[str, list[tuple[int, bool]]] = {}
        for _, name, shape, op, ops, calls in instructions:
            defs[name] = _buffers(shape)
            if op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            operands = [defs.get(o, []) for o in ops]
            if op in ("copy-start", "slice-start"):  # (source or (source,), destination / context, sync flags)
                dest = defs[name][-2] if op == "slice-start" else defs[name][0]
                src_in_vmem = all(v for _, v in operands[0])
                kind, size = "prefetch", (0 if src_in_vmem else dest[0]) + (0 if dest[1] else dest[0])
            elif op == "fusion" and calls in comps:
                read, written = _fusion_reads(comps[calls], operands)
                kind = "other" if written is None else "scatter"
                size = read + (_in_hbm(defs[name]) if written is None else written)
            else:
                kind, size = "other", sum(map(_in_hbm, operands)) + _in_hbm(defs[name])
            moved.append(Moved(kind, op, name, shape, size))
    return moved


def compile_program(step: Step, mesh: Mesh, rules: sharding.Rules, lower_on=None):
    """`step` jitted with its arguments' and outputs' shardings on `mesh`, lowered with `lower_on` as the default
    device (a compile-only TPU device, `tpu.lowering_for`) and compiled: a `jax.stages.Compiled`."""
    jitted = sharding.sharded_jit(step.fn, mesh, rules,
                                  in_shardings=sharding.logical_to_sharding(step.args, mesh, rules),
                                  out_shardings=sharding.logical_to_sharding(step.out, mesh, rules),
                                  donate_argnums=step.donate)
    with jax.default_device(lower_on):
        return jitted.lower(*sharding.sharded_abstract(step.args, mesh, rules)).compile()


def compile_step(step: Step, mesh: Mesh, rules: sharding.Rules, lower_on=None) -> dict[str, float]:
    """`compile_program`'s per-device byte counts, its cost analysis' flops, the bytes the program moves in HBM
    (`hbm_traffic`), `pallas` = 1.0 where a Pallas (Mosaic) kernel is in the program, and the seconds it took."""
    t0 = time.perf_counter()
    compiled = compile_program(step, mesh, rules, lower_on)
    m, cost, hlo = compiled.memory_analysis(), compiled.cost_analysis(), compiled.as_text()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(sum(hbm_traffic(hlo).values())),
            "pallas": float("tpu_custom_call" in hlo), "seconds": time.perf_counter() - t0}


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Per-device bytes of one step at the full depth."""

    name: str
    shape: str
    params: int
    optimizer: int
    kv_cache: int
    io: int  # the other arguments and the outputs not aliased to donated arguments
    temporaries: int
    temporaries_per_layer: int | None  # the slope of the extrapolation (None when compiled at the full depth)
    compiled_layers: tuple[int, ...]  # trunk depths compiled (none for the mtp step)
    compile_seconds: float
    flops: float = 0.0  # per device, the compiler's cost analysis (a while loop's body counted once)
    bytes_accessed: float = 0.0  # per device, moved in HBM (`hbm_traffic`)
    pallas: bool = False  # a Pallas kernel is in the compiled program
    floor: int = 0  # decode: the bytes a step cannot avoid reading (`read_floor`)

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.kv_cache + self.io + self.temporaries


def plan_step(cfg: Config, name: str, mesh: Mesh, rules: sharding.Rules, shapes: Shapes | None = None,
              lower_on=None) -> StepPlan:
    """Compiles step `name` (at two depths and extrapolates, or at the full depth) and splits its bytes;
    `shapes` overrides the config's, `lower_on` as in `compile_step`."""
    model, shapes = architecture(cfg.plan.model, cfg.model.dtype), shapes or Shapes.from_config(cfg)
    full, layers = model.num_layers, cfg.plan.compile_layers
    if name not in TRUNK_DEPTH_MATTERS:
        depths = ()  # the heads only: compiled once
    elif layers and layers[1] < full:
        depths = layers
    else:
        depths = (full,)
    sizes = [compile_step(STEPS[name](cfg, dataclasses.replace(model, num_layers=d), shapes), mesh, rules, lower_on)
             for d in depths or (full,)]
    slope = None
    if len(sizes) == 2:  # linear in the depth: a + (b - a) / (db - da) * (full - da)
        (da, db), (a, b) = depths, sizes
        # never below the deeper compile's figure: the compiler's buffer assignment is not exactly linear, and
        # a size that shrank from da to db (seen: prefill temporaries on v5p) would extrapolate below zero
        at_full = {k: max(a[k] + (b[k] - a[k]) * (full - da) / (db - da), b[k]) for k in a}
        slope = int(round((b["temporaries"] - a["temporaries"]) / (db - da)))
    else:
        at_full = sizes[0]
    step = STEPS[name](cfg, model, shapes)
    counted = {c: per_device_bytes(step.counted.get(c, ()), mesh, rules) for c in CATEGORIES}
    floor = read_floor(step, model, shapes.num_draft, mesh, rules) if name == "decode" else 0
    io = at_full["arguments"] + at_full["outputs"] - at_full["aliased"] - sum(counted.values())
    return StepPlan(name, shapes.describe(name), counted["params"], counted["optimizer"], counted["kv_cache"],
                    int(round(io)), int(round(at_full["temporaries"])), slope, depths,
                    sum(s["seconds"] for s in sizes), at_full["flops"], at_full["bytes_accessed"],
                    all(s["pallas"] for s in sizes), floor)


def read_floor(step: Step, model: TransformerConfig, num_draft: int, mesh, rules) -> int:
    """Per device, the bytes a decode step at `num_draft` drafts cannot avoid reading: the trunk's weights
    (an untied input embedding only by the rows it looks up), the heads' when it drafts, and the KV caches
    it attends (the heads' cache only when it drafts)."""
    (trunk, heads), (trunk_cache, heads_cache) = step.counted["params"], step.counted["kv_cache"]
    if not model.tie_word_embeddings:
        trunk = {k: v for k, v in trunk.items() if k != "embedding"}
    used = (trunk, trunk_cache) + ((heads, heads_cache) if num_draft else ())
    return per_device_bytes(used, mesh, rules)


# ---------------------------------------------------------------------------------------------
# The report


def format_report(cfg: Config, plans: list[StepPlan]) -> str:
    model = architecture(cfg.plan.model, cfg.model.dtype)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(sharding.abstract_params(model))))
    data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, cfg.plan.devices)
    hbm = cfg.plan.hbm_gib
    unit, scale = ("GiB", GIB) if hbm >= 1 else ("MiB", 2**20)
    fmt = lambda b: f"{b / scale:.2f}"  # noqa: E731
    count = f"{n_params / 1e9:.2f}B" if n_params >= 1e8 else f"{n_params / 1e6:.2f}M"
    lines = [f"bebop plan: {cfg.plan.model} ({model.num_layers} layers, {count} parameters) on "
             f"{cfg.plan.devices} devices (data={data} x fsdp={fsdp} x tensor={tensor}), {hbm:g} GiB HBM each",
             f"compute {model.dtype}, parameters and optimizer state float32; {unit} per device", ""]
    header = ("step", "shape", "params", "optimizer", "kv cache", "in/out", "temporaries", "(per layer)", "total",
              "HBM", "verdict", "compiled at", "compile s")
    rows = [header]
    for p in plans:
        fits = p.total <= hbm * GIB
        rows.append((p.name, p.shape, fmt(p.params), fmt(p.optimizer), fmt(p.kv_cache), fmt(p.io),
                     fmt(p.temporaries), "-" if p.temporaries_per_layer is None else fmt(p.temporaries_per_layer),
                     fmt(p.total), f"{100 * p.total / (hbm * GIB):.0f}%",
                     "FITS" if fits else "DOES NOT FIT",
                     " and ".join(map(str, p.compiled_layers)) + " layers" if p.compiled_layers else "heads only",
                     f"{p.compile_seconds:.0f}"))
    lines += columns(rows, left=(0, 1, 10, 11, 12))
    by_name = {p.name: p for p in plans}
    if "learner" in by_name and "decode" in by_name:  # rl.loop async: the actor decodes while the learner steps
        learn, dec = by_name["learner"].total, by_name["decode"].total
        peak, how = (learn + dec, "learner and decode at once") if cfg.rl.loop == "async" else \
            (max(learn, dec), "learner and decode in turn")
        lines += ["", f"rl.loop={cfg.rl.loop}: {how}, {fmt(peak)} {unit} -> "
                      f"{'FITS' if peak <= hbm * GIB else 'DOES NOT FIT'}"]
    if any(len(p.compiled_layers) == 2 for p in plans):
        lines.append(f"trunk steps compiled at {' and '.join(map(str, cfg.plan.compile_layers))} layers, every size "
                     f"extrapolated linearly to {model.num_layers}.")
    lines.append("bytes from XLA:CPU's buffer assignment of the sharded program, the fallback without libtpu (TPU "
                 "fusion and the Pallas kernels differ: leave headroom; `--accelerator` compiles on the TPU compiler).")
    return "\n".join(lines)


def columns(rows: list[tuple[str, ...]], left: tuple[int, ...]) -> list[str]:
    """Rows of cells as aligned text lines: columns `left` left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _fake_devices_ready(n: int) -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    have = [int(f.split("=", 1)[1]) for f in flags.split() if f.startswith("--xla_force_host_platform_device_count=")]
    return os.environ.get("JAX_PLATFORMS") == "cpu" and bool(have) and have[-1] >= n


def run(cfg: Config, out=sys.stdout) -> list[StepPlan] | None:
    """Plans every step of `cfg` and prints the report; re-executes in a subprocess with plan.devices fake CPU
    devices when this process lacks them (then returns None). Bad settings raise before any compile."""
    if cfg.plan.accelerator:
        from bebop_jax import plan_tpu

        return plan_tpu.run(cfg, out)[0]
    model = architecture(cfg.plan.model, cfg.model.dtype)
    Shapes.from_config(cfg)
    sharding.mesh_shape(cfg.mesh, cfg.plan.devices)
    if not _fake_devices_ready(cfg.plan.devices):
        # LLVM at -O0: buffer assignment (what the plan reads) is done before it, and the programs never run
        flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={cfg.plan.devices}"
                 " --xla_backend_optimization_level=0")
        env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
        overrides = [f"{section}={json.dumps(values)}" for section, values in to_dict(cfg).items()]
        proc = subprocess.run([sys.executable, "-m", "bebop_jax.plan", *overrides], env=env)
        if proc.returncode:
            raise SystemExit(proc.returncode)
        return None
    if jax.device_count() < cfg.plan.devices:
        raise RuntimeError(f"plan.devices={cfg.plan.devices}, but jax initialised with {jax.device_count()} devices "
                           "before XLA_FLAGS took effect; run `bebop plan` in a fresh process")
    plans = []
    for name in cfg.plan.steps:
        print(f"plan: compiling {name} ...", file=sys.stderr, flush=True)
        plans.append(plan_step(cfg, name, *plan_mesh(cfg, model, jax.devices()[:cfg.plan.devices], name)))
    print(format_report(cfg, plans), file=out, flush=True)
    return plans


if __name__ == "__main__":
    try:
        run(load_config(None, sys.argv[1:]))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
