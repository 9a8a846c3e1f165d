"""A stand-in training setup for the sharding tests: a tiny trunk trained with next-token CE by AdamW.

The same step runs unsharded (plain `jax.jit` on one device) and through `bebop_jax.sharding` on any
mesh, in one process or several; the tests compare the numbers. State: {params, opt, step}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bebop_jax import sharding
from bebop_jax.model.transformer import Transformer, TransformerConfig, init_params

# One layer keeps compiles short. Model dims divide a tensor axis of 2 (and q heads / MLP / vocab one of 4; the 2 KV heads do not).
CFG = TransformerConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
TX = optax.adamw(1e-2)
SEQ = 16


def tokens(num_rows: int, seed: int = 0) -> np.ndarray:
    """Random token rows [num_rows, SEQ] int32."""
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, (num_rows, SEQ)).astype(np.int32)


def loss_fn(params, batch):
    """Mean next-token cross-entropy of batch [B, T]."""
    model = Transformer(CFG)
    inputs = batch[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    hidden, _ = model.apply({"params": params}, inputs, positions)
    logits = model.apply({"params": params}, hidden, method=Transformer.logits)  # [B, T-1, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def train_step(state, batch):
    """One AdamW step: (state, batch [B, T]) -> (state, loss)."""
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt = TX.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}, loss


def new_state(params):
    return {"params": params, "opt": TX.init(params), "step": jnp.zeros((), jnp.int32)}


def abstract_state():
    """The state's shapes with the parameters' (and AdamW moments') logical-axis boxes."""
    return jax.eval_shape(new_state, sharding.abstract_params(CFG))


def init_state(mesh=None, rules=None):
    """The initial state (seed 0): on the default device, or sharded over `mesh` by `rules`."""
    params = init_params(CFG, jax.random.key(0))
    if mesh is None:
        return new_state(params)
    state_sh = sharding.logical_to_sharding(abstract_state(), mesh, rules)
    params = sharding.shard_params(params, CFG, mesh, rules)
    return sharding.sharded_jit(new_state, mesh, rules, in_shardings=(state_sh["params"],), out_shardings=state_sh)(params)


def sharded_step(mesh, rules, global_batch: int):
    """`train_step` jitted over `mesh`: state donated and kept sharded, batch rows over the data axes."""
    state_sh = sharding.logical_to_sharding(abstract_state(), mesh, rules)
    batch_sh = sharding.batch_sharding((global_batch, SEQ), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return sharding.sharded_jit(train_step, mesh, rules, in_shardings=(state_sh, batch_sh),
                                out_shardings=(state_sh, replicated), donate_argnums=0)
