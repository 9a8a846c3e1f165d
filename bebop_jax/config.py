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
class Config:
    """The whole run configuration; one field per YAML section."""

    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()


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
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
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
