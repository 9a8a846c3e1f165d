"""One device mesh (`data`, `fsdp`, `tensor`), one logical-axis rules table, and jit with shardings.

Layers name logical axes only (`embed`, `mlp`, `activation_batch`, ...: see `model/transformer.py`);
`DEFAULT_RULES` maps each to mesh axes, and `mesh.rules` in the config overrides single entries:

    mesh = make_mesh(cfg.mesh)
    rules = make_rules(mesh, cfg.mesh.rules, trunk_dims(model_cfg))
    params = shard_params(params, model_cfg, mesh, rules)
    state_sh = logical_to_sharding(jax.eval_shape(init_state, abstract_params(model_cfg)), mesh, rules)
    step = sharded_jit(train_step, mesh, rules, in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, None), donate_argnums=0)

RL gives its actor and learner disjoint sub-meshes (`rl_meshes`, config `rl.actor_devices`): the
learner's laid out by `mesh.*`, the actor's a decoding mesh (`actor_mesh_config`); weights move from
one to the other by `jax.device_put` onto the actor's shardings.

A dimension that its mesh axes do not divide is sharded over the longest prefix of those axes that
does divide it, replicated if none does (SmolLM2's 3 KV heads on `tensor=2`): parameters and inputs
through `partition_spec`, activations through `make_rules(..., dims)`, which fits the table to the
model's sizes so that a layer's activation constraints agree with its parameters. Batch and length
vary per call and are not fitted (XLA pads an uneven activation constraint): choose batch sizes that
the data axes divide.

Not here on purpose: multi-slice (DCN) meshes, pipeline parallelism, sequence parallelism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bebop_jax.config import MeshConfig
from bebop_jax.model.mtp import MTPConfig, MTPHeads
from bebop_jax.model.transformer import Transformer, TransformerConfig
from kernels_pallas.placement import Partition, platform

AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Batch over both data-parallel axes; model width over fsdp (ZeRO-3); heads, MLP width and vocabulary
# over tensor (Megatron); sequence, head dim and norms unsharded. The residual stream between layers
# is replicated over tensor (one all-reduce after attention and after the MLP).
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`, the -1 axis taking the devices left over."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    described = " x ".join(f"{name}={size}" for name, size in zip(AXES, sizes))
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh {described}: {num_devices} devices are not a multiple of {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {described} needs {math.prod(sizes)} devices, but {num_devices} are there "
                         "(set one of mesh.data / mesh.fsdp / mesh.tensor to -1 to take the rest)")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Axes are `Auto` (jax.make_mesh's default, Explicit, rejects plain sharded steps: MACHINE.md);
    on TPU jax.make_mesh orders the devices along the physical interconnect.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def split_devices(devices: Sequence[jax.Device], actor_fraction: float) -> tuple[list, list]:
    """(learner devices, actor devices): the actor takes the last round(actor_fraction * n) of `devices`
    (halves round up), the learner the rest, in order, so the learner holds device 0, where uncommitted
    arrays land. With actor_fraction 0 or a single device both get all of `devices` (one shared list).
    """
    devices = list(devices)
    if actor_fraction == 0 or len(devices) == 1:
        return devices, devices
    n_actor = int(actor_fraction * len(devices) + 0.5)
    if not 0 < n_actor < len(devices):
        raise ValueError(f"rl.actor_devices={actor_fraction} gives the actor {n_actor} of {len(devices)} devices and "
                         f"the learner {len(devices) - n_actor}; each needs at least one (0 shares all devices)")
    return devices[:-n_actor], devices[-n_actor:]


def actor_mesh_config(mesh_cfg: MeshConfig) -> MeshConfig:
    """The actor's mesh: the learner's `tensor` size (a policy too big for one device decodes tensor-parallel
    too), the rest of its devices on `data` (rollout rows), no `fsdp` (decoding with fsdp-sharded
    parameters would all-gather every layer's weights at every token). `mesh.rules` apply to both meshes."""
    return dataclasses.replace(mesh_cfg, data=-1, fsdp=1)


def rl_meshes(mesh_cfg: MeshConfig, actor_fraction: float,
              devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
    """(learner mesh, actor mesh) over disjoint parts of `devices` (default: all), split by `split_devices`:
    the learner's by `mesh_cfg`, the actor's by `actor_mesh_config`. Where the devices are shared
    (actor_fraction 0) the actor's mesh is the decoding layout over all of them (no fsdp: a decode step
    never all-gathers weights); one mesh on one device. Raises, naming rl.actor_devices and the mesh, if a
    part cannot hold its mesh."""
    devices = list(jax.devices() if devices is None else devices)
    learner_devices, actor_devices = split_devices(devices, actor_fraction)
    if len(devices) == 1:
        return (mesh := make_mesh(mesh_cfg, devices)), mesh
    parts = (("learner", learner_devices, mesh_cfg), ("actor", actor_devices, actor_mesh_config(mesh_cfg)))
    meshes = []
    for role, part, cfg in parts:
        try:
            meshes.append(make_mesh(cfg, part))
        except ValueError as e:
            raise ValueError(f"rl.actor_devices={actor_fraction} gives the {role} {len(part)} of {len(devices)} "
                             f"devices, which its mesh cannot use: {e}") from None
    return meshes[0], meshes[1]


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _fit(axes: MeshAxes, mesh: Mesh, size: int | None) -> MeshAxes:
    """The longest prefix of `axes` whose mesh sizes divide `size` (all of them when size is None)."""
    names = _as_tuple(axes)
    for name in names:
        if name not in mesh.shape:
            raise ValueError(f"rules name mesh axis '{name}', which the mesh lacks (axes: {', '.join(mesh.shape)})")
    if size is not None:
        while names and size % math.prod(mesh.shape[n] for n in names):
            names = names[:-1]
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def make_rules(mesh: Mesh, overrides: Sequence[tuple[str, MeshAxes]] = (),
               dims: Mapping[str, int] | None = None) -> Rules:
    """DEFAULT_RULES with `overrides` (config `mesh.rules`) replacing entries by logical name, fitted to
    `dims` (logical axis -> size, e.g. `trunk_dims(cfg)`): an axis is sharded only where it divides."""
    table = dict(DEFAULT_RULES)
    for logical, axes in overrides:
        if logical not in table:
            raise ValueError(f"mesh.rules names logical axis '{logical}', which no layer uses; "
                             f"logical axes: {', '.join(table)}")
        table[logical] = axes
    dims = dims or {}
    return tuple((logical, _fit(axes, mesh, dims.get(logical))) for logical, axes in table.items())


def trunk_dims(cfg: TransformerConfig) -> dict[str, int]:
    """Sizes of the trunk's model-shaped logical axes (batch and length vary per call; `norm` is D or H)."""
    return {"vocab": cfg.vocab_size, "embed": cfg.hidden_size, "activation_embed": cfg.hidden_size,
            "q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "cache_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "mlp": cfg.intermediate_size, "activation_mlp": cfg.intermediate_size}


def partition_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """Mesh PartitionSpec of an array of `shape` whose dimensions carry logical `names`.

    Rules resolve as flax does (first matching rule wins, a mesh axis is used once per array); a
    dimension its mesh axes do not divide keeps the longest prefix that divides it, or is replicated.
    """
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} name {len(names)} dimensions, but the array has shape {tuple(shape)}")
    axes = nn.logical_to_mesh_axes(names, rules)
    return PartitionSpec(*(_fit(a, mesh, d) for a, d in zip(axes, shape)))


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    """NamedSharding of one array with logical `names` (see `partition_spec`)."""
    return NamedSharding(mesh, partition_spec(names, shape, mesh, rules))


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a data array [B, ...]: rows over `activation_batch`'s axes, the rest replicated."""
    return named_sharding(("activation_batch",) + (None,) * (len(shape) - 1), shape, mesh, rules)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def logical_to_sharding(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an abstract tree whose leaves carry logical names.

    `abstract_tree` is what `jax.eval_shape` gives for a state built from boxed parameters (e.g.
    `{"params": abstract_params(cfg), "opt": tx.init(...)}`: optax keeps the boxes on moments):
    each `nn.LogicallyPartitioned` box becomes a sharded leaf, every other leaf (step counters,
    RNG keys) is replicated. The result has the structure of the unboxed tree.
    """
    def leaf(x):
        if _is_box(x):
            return named_sharding(x.names, x.value.shape, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(leaf, abstract_tree, is_leaf=_is_box)


def sharded_abstract(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """The unboxed tree as ShapeDtypeStructs carrying their shardings: a restore target for orbax."""
    shardings = logical_to_sharding(abstract_tree, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(abstract_tree), shardings)


def abstract_params(cfg: TransformerConfig) -> dict:
    """The trunk's parameters as ShapeDtypeStructs inside their `nn.LogicallyPartitioned` boxes."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens))["params"]


def abstract_heads(cfg: TransformerConfig, mtp: MTPConfig) -> dict:
    """The MTP heads' parameters as ShapeDtypeStructs inside their `nn.LogicallyPartitioned` boxes."""
    x = jnp.zeros((1, 1, cfg.hidden_size), cfg.compute_dtype)  # [B, T, D]
    pos = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: MTPHeads(cfg, mtp).init(jax.random.key(0), x, x, pos))["params"]


def param_shardings(cfg: TransformerConfig, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings of the trunk's parameters, shaped like `init_params(cfg, key)`."""
    return logical_to_sharding(abstract_params(cfg), mesh, rules)


def shard_params(params: dict, cfg: TransformerConfig, mesh: Mesh, rules: Rules) -> dict:
    """Places the trunk's parameters (host or device arrays, identical on every process) on the mesh."""
    return put_global(params, param_shardings(cfg, mesh, rules))


def put_global(tree: Any, shardings: Any) -> Any:
    """Leaves of `tree` laid out by `shardings` (a matching pytree, or one sharding for all) over
    devices of any processes.

    A global array split across processes is resharded by `jax.device_put`; a host value (numpy, a
    scalar, an array on this process's devices, a replicated global array, a PRNG key) must hold the
    same value on every process (seeds and rollouts here do), and each process fills the shards of its
    own devices from it (`jax.make_array_from_callback`): `device_put` takes only addressable shardings.
    """
    def one(x, sh):
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sh), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return jax.device_put(x, sh)
        host = np.asarray(x)  # a replicated global array reads its local copy
        return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def host_value(tree: Any) -> Any:
    """Numpy copies of the leaves of `tree` on this host, whole: `device_get` of arrays this process
    holds entirely, an all-gather across processes of those it holds in part (rollouts on a mesh that
    spans hosts). Every process must call it (a collective) where some leaf spans processes."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return jax.device_get(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def kernel_partition() -> Partition | None:
    """How the Pallas kernels' operands lie on the current mesh and rules (`use_mesh`): rows over
    `activation_batch`'s mesh axes, the vocabulary over `vocab`'s. None off TPU (XLA partitions the jnp
    paths itself) and on one device. Call it while tracing a step under `use_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    if platform() != "tpu" or mesh.empty or mesh.size == 1:
        return None
    rows, vocab = (_as_tuple(a) for a in nn.logical_to_mesh_axes(("activation_batch", "vocab")))
    if len(vocab) > 1:
        raise ValueError(f"mesh.rules split the vocabulary over {vocab}; the Pallas kernels take at most one "
                         "mesh axis for it")
    return Partition(mesh, rows, vocab[0] if vocab else None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
    """Makes `mesh` and `rules` current, so the model's `nn.with_logical_constraint` calls apply.

    Only calls traced inside take effect (flax's rules are no part of jit's cache key): run every call
    of one jitted function under the same mesh and rules, as `sharded_jit` does.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@dataclasses.dataclass(frozen=True)
class ShardedFunction:
    """A jitted function bound to the mesh and rules it is traced under."""

    jitted: Any
    mesh: Mesh
    rules: Rules

    def __call__(self, *args, **kwargs):
        with use_mesh(self.mesh, self.rules):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """Ahead-of-time lowering (arguments may be ShapeDtypeStructs): `.lower(...).compile()`."""
        with use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args, **kwargs)


def sharded_jit(fn: Callable, mesh: Mesh, rules: Rules, *, in_shardings: Any, out_shardings: Any,
                donate_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = ()) -> ShardedFunction:
    """`jax.jit(fn, in_shardings=, out_shardings=, donate_argnums=)` traced and run under `use_mesh`.

    Shardings are pytrees of NamedSharding matching the arguments / outputs (None leaves: let XLA
    choose). Donated arguments (the train state, a decode state with its KV cache) are updated in place.
    """
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums, static_argnames=static_argnames)
    return ShardedFunction(jitted, mesh, rules)
