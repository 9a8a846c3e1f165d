"""Run configuration: frozen dataclasses, YAML files and dotted command-line overrides.

A run is described by one `Config`, built from (in order) the dataclass defaults, a YAML file
(`configs/*.yaml`) and `section.key=value` overrides. Everything is validated once, before any model
work starts: an unknown key, a wrong type or a missing file raises `ConfigError` naming the key, the
expected type and the allowed keys.

The architecture of the network is not configured here: it is read from the weights
(`bebop_jax.model.weights`), so a config names a model source, never its shapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how to run them."""

    source: str = "smollm2-135m-instruct"  # a registered name, an HF directory or a .gguf file
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (f32 on CPU: see MACHINE.md)
    max_seq_len: int = 2048  # longest prompt + completion a KV cache is sized for


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings of `bebop generate`."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False  # wrap each prompt in the model's chat template


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices and processes: the mesh (`bebop_jax.sharding`) and multi-host setup (`bebop_jax.distributed`).

    Axis sizes multiply to the number of devices; one of them may be -1 (the devices left over).
    `rules` overrides entries of `sharding.DEFAULT_RULES`: pairs (logical axis, mesh axis | list of
    mesh axes | null), e.g. `[[embed, null]]` to stop sharding the model width over `fsdp`.
    The three process keys are set together (a run of several local processes) or left unset: one
    process, or, on a Cloud TPU VM, what the TPU environment says.
    """

    data: int = -1  # data parallelism
    fsdp: int = 1  # data parallelism with parameters and optimizer state sharded too
    tensor: int = 1  # tensor parallelism: attention heads, MLP width, vocabulary
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = ()
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    join_timeout_s: int = 120  # how long each process waits for all to join jax.distributed

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size != -1 and size < 1:
                raise ConfigError(f"config key 'mesh.{name}': expected a size >= 1 or -1 (the rest), got {size}")
        if list(sizes.values()).count(-1) > 1:
            rest = [f"mesh.{n}" for n, v in sizes.items() if v == -1]
            raise ConfigError(f"config keys {', '.join(rest)} are all -1; at most one axis can take the rest")
        for i, (logical, axes) in enumerate(self.rules):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                if axis not in sizes:
                    raise ConfigError(f"config key 'mesh.rules[{i}]' maps '{logical}' to mesh axis '{axis}'; "
                                      f"mesh axes are {', '.join(sizes)}")
        process = {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
                   "process_id": self.process_id}
        unset = [f"mesh.{k}" for k, v in process.items() if v is None]
        if 0 < len(unset) < 3:
            raise ConfigError(f"config keys mesh.coordinator_address, mesh.num_processes and mesh.process_id go "
                              f"together; {', '.join(unset)} missing")
        if not unset and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"config key 'mesh.process_id': expected 0 <= process_id < num_processes="
                              f"{self.num_processes}, got {self.process_id}")


def _check_positive(section: str, obj, names: str, minimum=1) -> None:
    for name in names.split():
        if getattr(obj, name) < minimum:
            raise ConfigError(f"config key '{section}.{name}': expected >= {minimum}, got {getattr(obj, name)}")


@dataclasses.dataclass(frozen=True)
class MTPHeadsConfig:
    """Shape of the MTP draft heads (`bebop_jax.model.mtp.MTPConfig`)."""

    num_steps: int = 3  # K: tokens drafted per verify step
    num_layers: int = 1  # distinct MTP layers, reused cyclically over the K steps

    def __post_init__(self):
        _check_positive("mtp", self, "num_steps num_layers")
        if self.num_layers > self.num_steps:
            raise ConfigError(f"config key 'mtp.num_layers': expected <= mtp.num_steps={self.num_steps}, "
                              f"got {self.num_layers}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data of the draft heads: self-distilled samples (`bebop sample-data`) or a plain corpus."""

    dir: str = "runs/data/math"  # token shards: {dir}/train and {dir}/heldout
    prompts: str = "math"  # a built-in source (data.PROMPT_SOURCES), a comma-separated mix, or a JSONL file
    num_prompts: int = 512  # prompts sampled for training
    heldout_prompts: int = 64  # further prompts, sampled for evaluation only
    chat: bool = True  # wrap prompts in the model's chat template
    temperature: float = 1.0  # rollout temperature of the samples
    max_new_tokens: int = 96
    sample_batch: int = 32  # prompts per generate call
    seed: int = 0
    corpus: str | None = None  # a .txt or .jsonl ({"text"}) corpus to train on instead of {dir}/train
    # further sample-data outputs (other seeds or prompts) whose train and heldout splits are read with dir's
    extra_dirs: tuple[str, ...] = ()

    @property
    def dirs(self) -> tuple[str, ...]:
        """Every self-distilled set read: data.dir, then data.extra_dirs."""
        return (self.dir, *self.extra_dirs)

    def __post_init__(self):
        _check_positive("data", self, "num_prompts max_new_tokens sample_batch")
        _check_positive("data", self, "heldout_prompts", 0)
        if self.dir in self.extra_dirs or len(set(self.extra_dirs)) != len(self.extra_dirs):
            raise ConfigError(f"config key 'data.extra_dirs': each directory once, and not data.dir ('{self.dir}'); "
                              f"got {list(self.extra_dirs)}")
        if self.temperature <= 0:
            raise ConfigError(f"config key 'data.temperature': self-distillation samples need > 0, "
                              f"got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """`bebop pretrain-mtp`: the draft heads trained on the frozen trunk's hidden states."""

    loss: Literal["ce", "kl", "tv", "e2e_tv", "lk_alpha", "lk_lambda"] = "e2e_tv"
    temperature: float = 1.0  # tau of p and q in the loss: the rollout temperature
    steps: int = 1000
    batch_size: int = 8  # rows per step
    seq_len: int = 256  # tokens per row
    pack: bool = True  # several sequences per row (segment ids), else one padded sequence per row
    learning_rate: float = 1e-3  # peak, after linear warm-up; cosine decay to 10% at `steps`
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global gradient norm
    # "trunk": MTP blocks from the trunk's last layer; "random"; or the path of trained heads (a run dir
    # or HF dir) to continue from, e.g. CE-trained heads fine-tuned with e2e TV (as the paper does)
    init: str = "trunk"
    draft_vocab: int = 0  # > 0: the heads draft from this many most frequent ids of the data (exact, cheaper)
    cache_hidden: bool = True  # run the trunk once and cache its hidden states (bf16) in cache_dir
    cache_dir: str = "runs/hidden_cache"
    seed: int = 0  # head init and data order
    run_dir: str = "runs/pretrain-mtp"  # checkpoints/, tb/, summary.json
    checkpoint_every: int = 200
    log_every: int = 10

    def __post_init__(self):
        _check_positive("pretrain", self, "batch_size seq_len checkpoint_every log_every")
        _check_positive("pretrain", self, "steps warmup_steps draft_vocab", 0)
        if not self.init:
            raise ConfigError("config key 'pretrain.init': expected trunk, random or the path of trained heads")
        for name in ("temperature", "learning_rate", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key 'pretrain.{name}': expected > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`bebop eval-acceptance`: acceptance of the heads on held-out policy samples ({data.dir}/heldout)."""

    temperatures: tuple[float, ...] = (1.0,)
    entropy_buckets: int = 8  # equal-count buckets of the policy's entropy
    batch_size: int = 4  # sequences per forward

    def __post_init__(self):
        _check_positive("eval", self, "entropy_buckets batch_size")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError(f"config key 'eval.temperatures': expected temperatures > 0, got {self.temperatures}")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How rollouts draft and verify (`bebop generate --speculative`, the RL actor, the benchmarks)."""

    mode: Literal["none", "rejection", "greedy_draft", "block"] = "none"  # none = plain decoding
    num_draft: int = 3  # K drafts per verify step (<= the heads' mtp.num_steps)
    mtp_checkpoint: str | None = None  # a pretrain-mtp run dir (latest step) or an HF dir with mtp.* tensors
    draft_vocab: int = 0  # > 0: draft from the most frequent ids only (exact; cheaper LM head per draft)
    # drop finished rows: once at most half of a batch of >= 4 is unfinished, decoding goes on with those rows
    # in a batch half the size (every sequence has its own key, so the same tokens up to a near-tied sample
    # flipped by f32 rounding at another batch size); each size compiles once
    compact: bool = True
    # > 0: speculate only on batches of at most this many rows (with compact, from the compaction that brings a
    # batch there); larger ones take plain steps that keep the heads' state current. A verify step of R rows x
    # (K + 1) tokens is memory-bound on a TPU up to large batches (`bebop plan`), compute-bound on a small CPU
    # beyond a few rows (2 cores: a batch-8 K=2 step costs more than its tokens bring). 0 = always speculate.
    max_rows: int = 0

    def __post_init__(self):
        _check_positive("speculative", self, "num_draft")
        _check_positive("speculative", self, "draft_vocab max_rows", 0)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """`bebop rl`: GRPO/PPO on an environment, rollouts by the `speculative` section's engine."""

    environment: Literal["math", "code", "tool"] = "math"
    env_source: str | None = None  # a JSONL file (GSM8K-format math, code problems); None = built-in
    math_level: Literal["grade", "easy"] = "grade"  # built-in math problems (bebop_jax.math_prompts.LEVELS)
    steps: int = 20  # learner updates
    prompts_per_step: int = 4
    group_size: int = 4  # G episodes per prompt (GRPO)
    max_new_tokens: int = 96
    max_prompt_tokens: int = 256
    temperature: float = 1.0  # rollout temperature; log-probs are taken at it
    learning_rate: float = 2e-6
    clip_eps: float = 0.2
    is_cap: float = 2.0  # truncation of the importance weight pi_prox / mu
    kl_coef: float = 0.0  # > 0: k3 KL to the initial policy
    loop: Literal["async", "sync"] = "async"
    max_staleness: int = 1  # policy versions a trajectory may lag; older ones are dropped
    publish_every: int = 1  # learner steps between weight publications to the actor (async; sync: every step)
    queue_size: int = 2
    mtp_strategy: Literal["frozen", "online-ce", "online-tv"] = "frozen"
    mtp_learning_rate: float = 1e-4
    # the learner runs each batch cut to the shortest of this many lengths (L/n, 2L/n, .., L tokens, L =
    # max_prompt_tokens + max_new_tokens rounded up to 64) that holds its rows: the same update, fewer FLOPs
    # when answers are short; each length compiles once. 1 = always L.
    length_buckets: int = 4
    # the learner runs the prompt a task's group_size rollouts share once, and their completions on its KV
    # cache (`rl.learner.share_prefixes`): the same update; the prefix and the rest are each cut to
    # length_buckets lengths instead of whole rows. false = every row whole.
    share_prefix: bool = True
    seed: int = 0
    run_dir: str = "runs/rl"
    checkpoint_every: int = 5
    # > 0: that many held-out math problems (the environment's test split; training then draws from the
    # train split) scored with plain sampling at `temperature` before the first step, every `eval_every`
    # steps and after the last: eval/accuracy in tensorboard, RUN/eval.jsonl, the curves PNG.
    eval_tasks: int = 0
    eval_every: int = 10
    # fraction of the devices that roll out (the rest learn, on a mesh.* mesh); 0 = both share all devices.
    # On one device both always share it. See sharding.rl_meshes.
    actor_devices: float = 0.0

    def __post_init__(self):
        _check_positive("rl", self, "steps prompts_per_step group_size max_new_tokens publish_every queue_size "
                        "checkpoint_every max_prompt_tokens length_buckets")
        if not 0.0 <= self.actor_devices < 1.0:
            raise ConfigError(f"config key 'rl.actor_devices': expected a fraction in [0, 1) of the devices for the "
                              f"actor (0 = actor and learner share all devices), got {self.actor_devices}")
        if self.max_staleness < 0:
            raise ConfigError(f"config key 'rl.max_staleness': expected >= 0, got {self.max_staleness}")
        if self.eval_tasks < 0 or self.eval_every < 1:
            raise ConfigError(f"config keys 'rl.eval_tasks' >= 0 and 'rl.eval_every' >= 1 expected, got "
                              f"{self.eval_tasks} and {self.eval_every}")
        if self.eval_tasks and self.environment != "math":
            raise ConfigError(f"config key 'rl.eval_tasks': held-out evaluation needs a train/test split, which "
                              f"the math environment has and {self.environment!r} has not; set it to 0")
        if self.temperature <= 0:
            raise ConfigError(f"config key 'rl.temperature': expected > 0 (RL samples), got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """`bebop plan`: per-device memory of the real-size steps, compiled ahead of time on a fake mesh.

    The shapes come from the other sections (`rl`, `speculative`, `mtp`, `pretrain`, `mesh`,
    `model.dtype`): the plan says whether that run fits, not some other one.
    """

    model: str = "qwen3-8b"  # an architecture of bebop_jax.plan.KNOWN_MODELS, or an HF config.json (or its directory)
    devices: int = 32  # devices of the target slice (TPU v5p: one per chip, so v5p-64 has 32)
    hbm_gib: float = 95.0  # memory per device (TPU v5p: 95 GiB)
    compile_layers: tuple[int, ...] = ()  # () = the full depth; two depths [a, b]: compile those, extrapolate linearly
    steps: tuple[Literal["learner", "prefill", "decode", "mtp"], ...] = ("learner", "prefill", "decode", "mtp")
    # A TPU slice as gcloud names it (v5litepod-8, v5p-64, v6e-16): compile on the TPU compiler for its
    # topology; devices and HBM then come from the topology (plan.devices / plan.hbm_gib are not used).
    accelerator: str = ""

    def __post_init__(self):
        if self.accelerator:
            from bebop_jax.tpu import accelerator

            try:
                accelerator(self.accelerator)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _check_positive("plan", self, "devices")
        if not self.steps:
            raise ConfigError("config key 'plan.steps': expected at least one of learner, prefill, decode, mtp")
        if self.hbm_gib <= 0:
            raise ConfigError(f"config key 'plan.hbm_gib': expected > 0, got {self.hbm_gib}")
        depths = self.compile_layers
        if depths and (len(depths) != 2 or not 0 < depths[0] < depths[1]):
            raise ConfigError(f"config key 'plan.compile_layers': expected [] or two depths 0 < a < b, "
                              f"got {list(self.compile_layers)}")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run configuration; one field per YAML section."""

    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()
    mesh: MeshConfig = MeshConfig()
    mtp: MTPHeadsConfig = MTPHeadsConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    eval: EvalConfig = EvalConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    rl: RLConfig = RLConfig()
    plan: PlanConfig = PlanConfig()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"tuple[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns `value` as type `tp`, or raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{key}'{hint}; allowed keys in {where}: {', '.join(fields)}"
            )
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`'generate.temperature=0.7'` -> `{'generate': {'temperature': 0.7}}` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Builds and validates a Config from an optional YAML file and `section.key=value` overrides."""
    values: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(Config, values)


def to_dict(config: Any) -> dict:
    """The config as plain YAML-ready values (for logging it beside a run)."""
    return dataclasses.asdict(config)
