"""Compile-only TPU slices: from an accelerator type as gcloud spells it to TPU devices that the TPU
compiler (libtpu) lowers and compiles for, on any host, with no TPU attached.

    acc = accelerator("v5p-64")            # Accelerator(generation='v5p', chips=32, topology='v5p:2x4x4')
    devices = compile_only_devices(acc)    # 32 TpuDevices of jax.experimental.topologies
    chip = chip_info(devices[0])           # HBM, HBM bandwidth, bf16 FLOP/s of one device (one chip)
    with jax.default_device(devices[0]):   # Mosaic asks the default device for the chip; kernels pick pallas
        lowered = jax.jit(step, ...).lower(*abstract_args)   # only the lowering: eager ops cannot run there
    compiled = lowered.compile()

Accelerator types: `v5litepod-N` (v5e, N chips), `v5p-N` (N TensorCores, N / 2 megacore chips), `v6e-N`
(N chips). One JAX device is one chip in each (a v5p device spans both TensorCores of its chip).
The chip's figures come from Pallas' `tpu_info` for the device kind the topology reports, not from the
config. Nothing compiled here can run: the devices exist for the compiler only.

Not here on purpose: multi-slice (DCN) topologies, v4 and v7 slices (add them to ACCELERATORS when a
config needs them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

# gcloud type prefix -> (generation, TensorCores per chip in the name's count, chips -> topology shape)
_SQUARE = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_CUBE = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
         512: "8x8x8", 1024: "8x8x16"}
ACCELERATORS = {"v5litepod": ("v5e", 1, _SQUARE), "v5p": ("v5p", 2, _CUBE), "v6e": ("v6e", 1, _SQUARE)}


def allowed_types() -> list[str]:
    """Every accelerator type this module knows, as gcloud spells them."""
    return [f"{prefix}-{chips * per_chip}" for prefix, (_, per_chip, shapes) in ACCELERATORS.items()
            for chips in shapes]


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A TPU slice: its gcloud name, generation, chips (= JAX devices) and topology name."""

    name: str
    generation: str
    chips: int
    topology: str


def accelerator(name: str, key: str = "plan.accelerator") -> Accelerator:
    """Parses a gcloud accelerator type; ValueError naming `key` and the allowed values otherwise."""
    m = re.fullmatch(r"(v5litepod|v5p|v6e)-(\d+)", name)
    if m:
        generation, per_chip, shapes = ACCELERATORS[m.group(1)]
        count = int(m.group(2))
        if count % per_chip == 0 and count // per_chip in shapes:
            chips = count // per_chip
            return Accelerator(name, generation, chips, f"{generation}:{shapes[chips]}")
    raise ValueError(f"config key '{key}': '{name}' is not a TPU accelerator type this plan knows; "
                     f"expected one of {', '.join(allowed_types())}")


def require_libtpu(key: str = "plan.accelerator") -> None:
    """Raises ValueError (naming `key`) where the TPU compiler is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"config key '{key}': compiling for a TPU needs the TPU compiler (libtpu), which is not "
                         "installed; pip install -e '.[tpu]' (or leave the key empty for the XLA:CPU plan)")


def compile_only_devices(acc: Accelerator) -> list[jax.Device]:
    """The slice's TPU devices as the TPU compiler sees them (compile-only, none attached)."""
    require_libtpu()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM: quiets libtpu
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", acc.name)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard: let several compiling processes load it
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=acc.topology, platform="tpu").devices)


@dataclasses.dataclass(frozen=True)
class ChipInfo:
    """One JAX device's figures: the TPU generation's name, HBM bytes, HBM bytes/s and peak bf16 FLOP/s."""

    kind: str  # "TPU v5p"
    hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    vmem_bytes: int  # per TensorCore


def chip_info(device: jax.Device) -> ChipInfo:
    """Pallas' tpu_info for `device`'s kind, scaled from one TensorCore to the device (a v5p device is a
    megacore chip of two)."""
    from jax._src.pallas.mosaic import tpu_info

    version = tpu_info.chip_version_from_device_kind(device.device_kind)
    if version is None:
        raise ValueError(f"unknown TPU device kind {device.device_kind!r}")
    cores = version.num_physical_tensor_cores_per_chip
    info = tpu_info.get_tpu_info_for_chip(version, cores)
    return ChipInfo(f"TPU {version.value}", info.hbm_capacity_bytes * info.num_cores,
                    info.mem_bw_bytes_per_second * info.num_cores, info.bf16_ops_per_second * info.num_cores,
                    info.vmem_capacity_bytes)
