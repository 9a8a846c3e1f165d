"""The online MTP strategies of RL (`rl.mtp_strategy` = online-ce | online-tv), the comparison to frozen
heads: one CE or TV step of the heads per RL batch, on the batch's own tokens, with the policy's
current trunk states and matrices (`pretrain_mtp.train_step`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from bebop_jax import sharding
from bebop_jax.model import LoadedModel


def _online_step(state, trunk, tokens, completion, *, cfg, mtp, settings, draft_ids):
    """One heads step on a trajectory batch: tokens / completion [R, L] (the learner's global arrays)."""
    from bebop_jax.pretrain_mtp import frozen_inputs, train_step, with_trunk_hidden

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    segments = jnp.ones_like(tokens)  # one sequence per row (0 would mark every position as padding)
    batch = with_trunk_hidden(trunk, dict(tokens=tokens, positions=positions, segment_ids=segments,
                                          completion=completion), cfg, settings.temperature, draft_ids is not None)
    frozen = frozen_inputs(cfg, trunk, draft_ids)  # the policy's current matrices
    return train_step(state, frozen, batch, cfg=cfg, mtp=mtp, settings=settings)


class OnlineMTPUpdater:
    """Online MTP strategies: one CE or TV step of the heads per RL batch, on the batch's own tokens.

    The heads and their AdamW moments live on the learner's mesh (`heads_shardings`), and each update is
    one jitted program over the learner's global arrays, so it runs alike on one process or on many.
    """

    def __init__(self, model: LoadedModel, mtp_cfg, mtp_params, strategy: str, learning_rate: float, length: int,
                 heads_shardings, draft_ids=None):
        """heads_shardings: NamedShardings of the heads on the learner's mesh (a pytree like mtp_params, or one)."""
        from bebop_jax.pretrain_mtp import StepSettings, TrainState

        self.settings = StepSettings(loss="ce" if strategy == "online-ce" else "tv", temperature=1.0,
                                     num_origins=length, learning_rate=learning_rate, warmup_steps=0, steps=10**9,
                                     weight_decay=0.0, grad_clip=1.0)
        params = sharding.put_global(mtp_params, heads_shardings)
        mesh = jax.tree.leaves(heads_shardings)[0].mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        state = TrainState(jnp.int32(0), params, jax.jit(self.settings.optimizer().init)(params))
        # moments keep their heads' shardings; scalars (the step, optax's counts) are replicated on the mesh
        state_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
                                and x.sharding.mesh == mesh else replicated, state)
        self.state = sharding.put_global(state, state_sh)

        @functools.lru_cache(maxsize=None)
        def step_for(length: int):  # one jitted step per batch length (the learner's length buckets)
            settings = dataclasses.replace(self.settings, num_origins=min(length, self.settings.num_origins))
            return jax.jit(functools.partial(_online_step, cfg=model.cfg, mtp=mtp_cfg, settings=settings,
                                             draft_ids=draft_ids), out_shardings=(state_sh, replicated), donate_argnums=0)

        self._step_for = step_for

    def update(self, trunk, tokens, completion) -> dict:
        """One step with the policy's trunk params and a batch's tokens / loss mask [R, L] (global arrays)."""
        self.state, metrics = self._step_for(tokens.shape[1])(self.state, trunk, tokens, completion)
        return {"mtp_loss": float(metrics["loss"]), "mtp_alpha_1": float(metrics["alpha"][0])}
