"""The 8-device half of tests/test_sharded_stages.py: each stage's step sharded over a (data=2, fsdp=2,
tensor=2) mesh against the same step on one device, in a subprocess whose environment sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported.

`python -m tests.sharded_stage_checks OUT_JSON` runs every check once (compiles dominate, so they share
one process) and writes the numbers; the tests assert on them. Parameters and optimizer state are
placed by their logical axes (`sharding.logical_to_sharding` of the boxed abstract state), data rows
over the batch axes; the one-device runs are the stages' own jitted functions, unchanged.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import sharding, speculative
from bebop_jax.config import MeshConfig
from bebop_jax.model import LoadedModel
from bebop_jax.model.mtp import MTPConfig, vocab_matrix
from bebop_jax.model.transformer import TransformerConfig, init_params
from bebop_jax.pretrain_mtp import StepSettings, TrainState, init_heads, train_step
from bebop_jax.trunk_cache import trunk_hidden
from bebop_jax.rl.learner import LearnerSettings, Trajectories, init_learner, learner_step, policy_logprobs
from bebop_jax.speculative import speculative_generate

# One trunk layer keeps compiles short; 4 q heads, 2 KV heads, MLP and vocabulary all divide tensor=2.
CFG = TransformerConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, qk_norm=True, tie_word_embeddings=False,
                        max_position_embeddings=128)
MTP = MTPConfig(num_steps=2, num_layers=1)
MESH = MeshConfig(data=2, fsdp=2, tensor=2)
ROWS, SEQ = 8, 16
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def copy(tree):
    """A fresh copy (the steps donate their state)."""
    return jax.tree.map(jnp.array, tree)


def specs(tree) -> list[str]:
    return sorted({str(x.sharding.spec) for x in jax.tree.leaves(tree)})


def check_mtp_train_step(trunk, heads, mesh, rules, results):
    settings = StepSettings(loss="e2e_tv", temperature=1.0, num_origins=SEQ, learning_rate=1e-2, warmup_steps=0,
                            steps=10, weight_decay=0.01, grad_clip=1.0)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CFG.vocab_size, (ROWS, SEQ)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy()
    segments = np.ones((ROWS, SEQ), np.int32)
    batch = {"hidden": trunk_hidden(trunk, tokens, positions, segments, cfg=CFG), "tokens": tokens,
             "positions": positions, "segment_ids": segments, "completion": positions >= 4}
    frozen = {"embedding": trunk["embedding"], "w_vocab": vocab_matrix(CFG, trunk)}
    new_state = lambda p: TrainState(jnp.int32(0), p, settings.optimizer().init(p))  # noqa: E731
    static = dict(cfg=CFG, mtp=MTP, settings=settings)

    ref_state, ref_metrics = train_step(new_state(copy(heads)), frozen, batch, **static)

    state_sh = sharding.logical_to_sharding(jax.eval_shape(new_state, sharding.abstract_heads(CFG, MTP)), mesh, rules)
    frozen_sh = {k: sharding.named_sharding(("vocab", "embed"), v.shape, mesh, rules) for k, v in frozen.items()}
    batch_sh = {k: sharding.batch_sharding(np.shape(v), mesh, rules) for k, v in batch.items()}
    step = sharding.sharded_jit(lambda s, f, b: train_step(s, f, b, **static), mesh, rules,
                                in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                                donate_argnums=0)
    state = jax.device_put(new_state(copy(heads)), state_sh)
    state, metrics = step(state, jax.device_put(frozen, frozen_sh), jax.device_put(batch, batch_sh))
    results["mtp"] = {"ref_loss": float(ref_metrics["loss"]), "loss": float(metrics["loss"]),
                      "alpha_max_diff": max_diff(metrics["alpha"], ref_metrics["alpha"]),
                      "params_max_diff": max_diff(state.params, ref_state.params),
                      "params_moved": max_diff(ref_state.params, heads),
                      "fc_spec": str(state.params["layers_0"]["fc"].sharding.spec),
                      "wq_spec": str(state.params["layers_0"]["block"]["attn"]["wq"].sharding.spec),
                      "mu_specs": specs(state.opt_state)}


def check_speculative(trunk, heads, mesh, rules, results):
    kw = dict(mtp_cfg=MTP, mode="rejection", num_draft=2, max_new_tokens=10)
    trunk_sh = sharding.shard_params(trunk, CFG, mesh, rules)
    heads_sh = jax.device_put(heads, sharding.logical_to_sharding(sharding.abstract_heads(CFG, MTP), mesh, rules))
    results["speculative"] = {"trunk_specs": specs(trunk_sh)}
    for temperature in (0.0, 1.0):  # without compaction (checked below): one batch size, one compile each
        key = jax.random.key(3)
        ref = speculative_generate(trunk, CFG, PROMPTS, key, mtp_params=heads, temperature=temperature,
                                   compact=False, **kw)
        with sharding.use_mesh(mesh, rules):
            out = speculative_generate(trunk_sh, CFG, PROMPTS, key, mtp_params=heads_sh, temperature=temperature,
                                       compact=False, **kw)
        results["speculative"][f"t{temperature:g}"] = {
            "tokens": out.tokens.tolist(), "ref_tokens": ref.tokens.tolist(),
            "num_tokens_equal": bool(np.array_equal(out.num_tokens, ref.num_tokens)),
            "accepted_equal": bool(np.array_equal(out.accepted, ref.accepted)),
            "logprobs_max_diff": max_diff(out.logprobs, ref.logprobs),
            "accepted": int(ref.accepted.sum())}
    # 8 prompts ending at EOS at different lengths: on the mesh the batch (split 4 ways) drops to 4 rows
    eight = PROMPTS + [[t + 13 for t in p] for p in PROMPTS]
    kw8 = dict(kw, max_new_tokens=16, eos_ids=(5, 17, 29, 41, 53), temperature=1.0)
    ref = speculative_generate(trunk, CFG, eight, jax.random.key(4), mtp_params=heads, compact=False, **kw8)
    programs = speculative.decode._cache_size()
    with sharding.use_mesh(mesh, rules):
        out = speculative_generate(trunk_sh, CFG, eight, jax.random.key(4), mtp_params=heads_sh, **kw8)
    results["speculative"]["compacted"] = {
        "tokens_equal": bool(np.array_equal(out.tokens, ref.tokens)), "num_tokens": ref.num_tokens.tolist(),
        "accepted_equal": bool(np.array_equal(out.accepted, ref.accepted)),
        "new_programs": speculative.decode._cache_size() - programs}


def check_learner_step(trunk, mesh, rules, results):
    settings = LearnerSettings(temperature=1.0, learning_rate=1e-3)
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, CFG.vocab_size, (ROWS, SEQ)).astype(np.int32)
    mask = np.broadcast_to(np.arange(SEQ) >= 6, (ROWS, SEQ)).copy()
    mask[1, 12:] = False  # ragged completions
    logp0, _ = policy_logprobs(trunk, tokens, cfg=CFG, temperature=1.0)
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=np.where(mask, np.asarray(logp0) - 0.05, 0.0),
                        rewards=rng.rand(ROWS).astype(np.float32), group_ids=np.repeat(np.arange(2, dtype=np.int32), 4),
                        policy_version=np.zeros(ROWS, np.int32))
    static = dict(cfg=CFG, settings=settings, num_groups=2)

    ref_state, ref_metrics = learner_step(init_learner(copy(trunk), settings), traj, logp0, **static)

    state_sh = sharding.logical_to_sharding(
        jax.eval_shape(lambda p: init_learner(p, settings), sharding.abstract_params(CFG)), mesh, rules)
    traj_sh = jax.tree.map(lambda x: sharding.batch_sharding(np.shape(x), mesh, rules), traj)
    prox_sh = sharding.batch_sharding((ROWS, SEQ), mesh, rules)
    step = sharding.sharded_jit(lambda s, t, p: learner_step(s, t, p, **static), mesh, rules,
                                in_shardings=(state_sh, traj_sh, prox_sh), out_shardings=(state_sh, None),
                                donate_argnums=0)
    state = jax.device_put(init_learner(copy(trunk), settings), state_sh)
    state, metrics = step(state, jax.device_put(traj, traj_sh), jax.device_put(logp0, prox_sh))
    results["learner"] = {"ref_loss": float(ref_metrics["loss"]), "loss": float(metrics["loss"]),
                          "grad_norm_diff": abs(float(metrics["grad_norm"]) - float(ref_metrics["grad_norm"])),
                          "params_max_diff": max_diff(state.params, ref_state.params),
                          "params_moved": max_diff(ref_state.params, trunk),
                          "embedding_spec": str(state.params["embedding"].sharding.spec),
                          "nu_wq_spec": str(state.opt_state[1][0].nu["layers_0"]["attn"]["wq"].sharding.spec)}


def main(out_path: str) -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 CPU devices (XLA_FLAGS), got {jax.device_count()}")
    mesh = sharding.make_mesh(MESH)
    rules = sharding.make_rules(mesh, MESH.rules, sharding.trunk_dims(CFG))
    trunk = init_params(CFG, jax.random.key(0))
    trunk["embedding"] = trunk["embedding"] * 30.0  # peaked next-token distributions
    heads = init_heads(LoadedModel(CFG, trunk, None, "tiny"), MTP, "trunk", jax.random.key(1))  # drafts get accepted
    results: dict = {"threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}
    check_mtp_train_step(trunk, heads, mesh, rules, results)
    check_speculative(trunk, heads, mesh, rules, results)
    check_learner_step(trunk, mesh, rules, results)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
