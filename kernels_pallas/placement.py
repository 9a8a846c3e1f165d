"""Where a kernel runs: the platform that picks its implementation, the chip whose VMEM sizes its tiles,
and the mesh partition its operands are split by.

A Mosaic (TPU Pallas) call cannot be partitioned by XLA: under a jit over a mesh of several devices
every `pallas_call` must sit inside a `shard_map`. The kernels take a `Partition` (rows over some mesh
axes, the vocabulary over at most one) and run their passes per shard, combining the shards'
statistics with collectives; the caller says how its operands are laid out (`bebop_jax.sharding.
kernel_partition` reads it from the current mesh and logical-axis rules).

`platform()` is the platform the program being traced is for: the default device's when one is set
(`jax.default_device(tpu_device)`, as ahead-of-time compilation for a compile-only TPU topology does),
else the default backend. The kernels' `implementation=None` resolves through it, so a program lowered
for a TPU gets the TPU kernels even on a CPU host.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

# Share of a TensorCore's VMEM a kernel may plan its tiles in; the rest is Mosaic's internal scratch.
VMEM_SHARE = 0.75


@dataclasses.dataclass(frozen=True)
class Partition:
    """How a kernel's operands are laid out over `mesh` (a Mesh or AbstractMesh): rows (tokens, or
    sequences) split over `row_axes`, the vocabulary over `vocab_axis` (None: every shard has all of it)."""

    mesh: Any
    row_axes: tuple[str, ...] = ()
    vocab_axis: str | None = None

    def __post_init__(self):
        for axis in self.row_axes + ((self.vocab_axis,) if self.vocab_axis else ()):
            if axis not in self.mesh.shape:
                raise ValueError(f"Partition names mesh axis '{axis}', which the mesh lacks "
                                 f"(axes: {', '.join(self.mesh.shape)})")
        if self.vocab_axis in self.row_axes:
            raise ValueError(f"Partition: mesh axis '{self.vocab_axis}' splits both rows and vocabulary")

    @property
    def row_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.row_axes)

    @property
    def vocab_shards(self) -> int:
        return self.mesh.shape[self.vocab_axis] if self.vocab_axis else 1

    def rows(self, ndim: int) -> P:
        """Spec of a [rows, ...] operand with `ndim` dimensions (the rest unsplit)."""
        return P(self.row_axes or None, *(None,) * (ndim - 1))

    def shard_map(self, fn, in_specs, out_specs):
        """`jax.shard_map` over this partition's mesh (Pallas calls need check_vma=False)."""
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def platform() -> str:
    """'tpu', 'gpu' or 'cpu': the platform the program being traced is for (module docstring)."""
    device = jax.config.jax_default_device
    if isinstance(device, jax.Device):
        return device.platform
    if isinstance(device, str):
        return device
    return jax.default_backend()


def vmem_budget() -> int:
    """Bytes of VMEM a kernel plans its tiles in on the TPU being compiled for (per TensorCore)."""
    return int(pltpu.get_tpu_info().vmem_capacity_bytes * VMEM_SHARE)
