"""The online MTP strategies of RL (`rl.mtp_strategy` = online-ce | online-tv), the comparison to frozen
heads: one CE or TV step of the heads per RL batch, on the batch's own tokens, with the policy's
current trunk states and matrices (`pretrain_mtp.train_step`).
"""

from __future__ import annotations

import jax.numpy as jnp

from bebop_jax.model import LoadedModel


class OnlineMTPUpdater:
    """Online MTP strategies: one CE or TV step of the heads per RL batch, on the batch's own tokens."""

    def __init__(self, model: LoadedModel, mtp_cfg, mtp_params, strategy: str, learning_rate: float, length: int,
                 draft_ids=None):
        from bebop_jax.pretrain_mtp import StepSettings, TrainState

        self.model, self.mtp_cfg, self.draft_ids = model, mtp_cfg, draft_ids
        self.settings = StepSettings(loss="ce" if strategy == "online-ce" else "tv", temperature=1.0,
                                     num_origins=length, learning_rate=learning_rate, warmup_steps=0, steps=10**9,
                                     weight_decay=0.0, grad_clip=1.0)
        self.state = TrainState(jnp.int32(0), mtp_params, self.settings.optimizer().init(mtp_params))

    def update(self, params, traj) -> dict:
        from bebop_jax.pretrain_mtp import frozen_inputs, train_step, with_trunk_hidden

        tokens = jnp.asarray(traj.tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        segments = jnp.ones_like(tokens)  # one sequence per row (0 would mark every position as padding)
        batch = with_trunk_hidden(params, dict(tokens=tokens, positions=positions, segment_ids=segments,
                                               completion=jnp.asarray(traj.loss_mask)),
                                  self.model.cfg, self.settings.temperature, self.draft_ids is not None)
        frozen = frozen_inputs(self.model.cfg, params, self.draft_ids)  # the policy's current matrices
        self.state, metrics = train_step(self.state, frozen, batch, cfg=self.model.cfg, mtp=self.mtp_cfg,
                                         settings=self.settings)
        return {"mtp_loss": float(metrics["loss"]), "mtp_alpha_1": float(metrics["alpha"][0])}
