"""Weights between the RL learner and the actor: the learner state's layout, and publication.

The learner keeps its state (policy, AdamW moments) on the learner mesh by logical axes
(`learner_shardings`, `place_learner`); `publish` copies the policy (or the MTP heads) onto the actor's
shardings, in the compute dtype; `Published` is the hand-over point of the async loop: the newest
published (params, heads, version), which the actor thread waits on.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bebop_jax import sharding
from bebop_jax.model.transformer import TransformerConfig
from bebop_jax.rl.learner import LearnerSettings, LearnerState, init_learner


class Published:
    """The weights the actor samples with: (params, heads, version) behind a condition variable."""

    def __init__(self, params, heads, version: int):
        self.cond = threading.Condition()
        self.value = (params, heads, version)

    def publish(self, params, heads, version: int) -> None:
        with self.cond:
            self.value = (params, heads, version)
            self.cond.notify_all()

    def wait_for(self, min_version: int, stop: threading.Event):
        with self.cond:
            while self.value[2] < min_version and not stop.is_set():
                self.cond.wait(timeout=0.5)
            return self.value


def learner_shardings(model_cfg: TransformerConfig, settings: LearnerSettings, mesh: Mesh, rules: sharding.Rules) -> LearnerState:
    """NamedShardings of the learner state on `mesh`: parameters and their AdamW moments by logical axes."""
    abstract = jax.eval_shape(functools.partial(init_learner, settings=settings), sharding.abstract_params(model_cfg))
    return sharding.logical_to_sharding(abstract, mesh, rules)


def place_learner(params, settings: LearnerSettings, shardings: LearnerState) -> LearnerState:
    """The initial learner state laid out by `shardings`, on buffers of its own (the learner step donates
    it); `params` are already laid out by `shardings.params` and stay valid."""
    init = lambda p: init_learner(jax.tree.map(jnp.copy, p), settings)  # noqa: E731
    return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def publish(tree, shardings, dtype=None):
    """A copy of `tree` (the policy's or the heads' parameters) laid out by `shardings` (the actor's): a
    reshard across the device sets, or a copy where actor and learner share devices (and so shardings);
    never an alias, as the learner step donates its parameters while the actor may still sample with
    the published ones. (jax's device_put may alias when it replicates a one-device array over several
    devices: place the learner's parameters with `place_learner`, not with this.) With `dtype` (the run's
    compute dtype) floating leaves are published in it: the actor decodes from bf16 weights where the
    run computes in bf16, reading half the bytes of the learner's f32 master copy per token."""
    if dtype is not None:
        tree = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    return jax.device_put(tree, shardings, may_alias=False)
