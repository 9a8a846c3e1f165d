"""`bebop rl`: the actor/learner loop, async (default) or sync, with whole-state checkpoints.

Devices: the learner and the actor each have a mesh (`sharding.rl_meshes`): disjoint sub-meshes when
`rl.actor_devices` is a fraction in (0, 1) of several devices (the learner's laid out by `mesh.*`, the
actor's data x tensor), one shared mesh otherwise. The learner state (policy, optimizer) lives on the
learner mesh, placed by its logical axes, and is updated by a `sharded_jit` step; the actor samples on
its own mesh with weights that `rl.weights.publish` copied there (onto the actor's shardings: a reshard
across the two device sets, a plain copy where they are shared), tagged with the policy version.
On several processes (a pod) every process runs this loop in step: each rolls out every row of the batch on
the actor mesh and reads the rollout back whole (`sharding.host_value`: an all-gather), so all score the
same rows and hold the same host trajectories, which become global arrays on the learner mesh
(`sharding.put_global`); process 0 alone writes logs, metrics and the summary; all write the checkpoint.

Async: one actor thread rolls out batch i with the newest published weights once the published
version is >= i - max_staleness, and puts it on a bounded queue (on several processes the actor runs in
turn with the learner on the main thread instead, on the weights last published: collectives must be
issued in one order on every process, which two threads do not guarantee); the learner (main thread) takes
batches, drops those whose version lags its own by more than `max_staleness` (counted), updates, and
publishes its weights every `publish_every` steps. Sync: publish, rollout, update, in turn.
Batch i's tasks and keys derive from (seed, i) only, so sync and async with staleness 0 make the
same first update, and a resumed run continues with the same data.

Whole-state checkpoints every `checkpoint_every` steps and on SIGTERM (a TPU VM's preemption): the
learner state (policy, optimizer, step), the MTP heads and their optimizer, the RNG key, and in the
metadata the next batch index (data position) and the dropped count. After kill -9 a restart loses
at most one checkpoint interval. MTP heads: `frozen` (default), or updated on each batch with CE or
TV (`online-ce`, `online-tv`: `rl.mtp_update`) for the comparison.

Held-out evaluation (`rl.eval_tasks` > 0, math): training draws from the environment's train split and
`rl.records.held_out_eval` scores fixed test-split problems with plain sampling before the first step, every
`eval_every` steps and at the end (RUN/eval.jsonl, eval/* in tensorboard, the curves PNG): the
per-step training reward is a mean over a few groups and too noisy to show progress on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bebop_jax import distributed, sharding
from bebop_jax.checkpoint import RunCheckpoints, load_mtp_heads
from bebop_jax.config import Config, to_dict
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.model.transformer import TransformerConfig
from bebop_jax.rl.actor import Actor
from bebop_jax.rl.environments import env_options, make_environment
from bebop_jax.rl.learner import (LearnerSettings, SharedPrefix, Trajectories, learner_step, policy_logprobs,
                                  share_prefixes, trim_trajectories)
from bebop_jax.rl.mtp_update import OnlineMTPUpdater
from bebop_jax.rl.records import append_evals, held_out_eval, summarise_run
from bebop_jax.rl.weights import Published, learner_shardings, place_learner, publish


def _settings(cfg: Config) -> LearnerSettings:
    rl = cfg.rl
    return LearnerSettings(temperature=rl.temperature, clip_eps=rl.clip_eps, is_cap=rl.is_cap, kl_coef=rl.kl_coef,
                           learning_rate=rl.learning_rate)


def _tasks(env, cfg: Config, index: int):
    return env.sample_tasks(np.random.default_rng([cfg.rl.seed, index]), cfg.rl.prompts_per_step)


def traj_shardings(rows: int, length: int, mesh: Mesh, rules: sharding.Rules,
                   prefix: tuple[int, int, int] | None = None) -> Trajectories:
    """Shardings of a Trajectories batch of [rows, length] tokens: rows over the batch axes; with prefix =
    (prefixes, P, S), its `SharedPrefix` (small index arrays) replicated."""
    tokens = sharding.batch_sharding((rows, length), mesh, rules)
    per_row = sharding.batch_sharding((rows,), mesh, rules)
    if prefix is not None:
        whole = NamedSharding(mesh, PartitionSpec())
        prefix = SharedPrefix(source_row=whole, length=whole, of_row=whole, width=prefix[1], suffix=prefix[2])
    return Trajectories(tokens=tokens, loss_mask=tokens, behaviour_logprobs=tokens, rewards=per_row,
                        group_ids=per_row, policy_version=per_row, prefix=prefix)


@functools.lru_cache(maxsize=32)
def _learner_fns(model_cfg: TransformerConfig, settings: LearnerSettings, num_groups: int, mesh: Mesh,
                 rules: sharding.Rules, rows: int, length: int, prefix: tuple[int, int, int] | None = None):
    """(state shardings, Trajectories shardings, logprobs(params, traj) -> [R,L], update(state, traj, logp_prox
    or None, logp_ref or None) -> (state, metrics)) on `mesh` for [rows, length] batches (shared prefixes of
    `Trajectories.prefix_dims`); cached, so a run's length buckets and runs in one process (the demo's three MTP strategies, a
    benchmark's settings) share their compilations."""
    state_sh = learner_shardings(model_cfg, settings, mesh, rules)
    traj_sh = traj_shardings(rows, length, mesh, rules, prefix)
    rows_sh = traj_sh.behaviour_logprobs  # of the [R, L] per-token arrays
    logprobs = sharding.sharded_jit(
        lambda params, traj: policy_logprobs(params, traj.tokens, traj.prefix, cfg=model_cfg,
                                             temperature=settings.temperature)[0],
        mesh, rules, in_shardings=(state_sh.params, traj_sh), out_shardings=rows_sh)
    update = sharding.sharded_jit(
        lambda s, traj, prox, ref: learner_step(s, traj, prox, ref, cfg=model_cfg, settings=settings,
                                                num_groups=num_groups),
        mesh, rules, in_shardings=(state_sh, traj_sh, rows_sh, rows_sh), out_shardings=(state_sh, None),
        donate_argnums=0)
    return state_sh, traj_sh, logprobs, update


def train_rl(cfg: Config, model: LoadedModel | None = None, env=None, progress: bool = True,
             stop_at_step: int | None = None, devices: Sequence[jax.Device] | None = None) -> dict:
    """Runs (or resumes) an RL run in `cfg.rl.run_dir`; returns the summary (also written as summary.json).

    env: any object of the `Environment` protocol (default: `make_environment(cfg.rl.environment)`).
    stop_at_step: end (with a checkpoint) after this learner step, as an interruption would.
    devices: the devices to run on (default: all), split between learner and actor by `rl.actor_devices`.
    """
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    rl, spec = cfg.rl, cfg.speculative
    learner_mesh, actor_mesh = sharding.rl_meshes(cfg.mesh, rl.actor_devices, devices)  # before any model work
    model = model or load_model(cfg.model.source, cfg.model.dtype, shardings=lambda c: sharding.param_shardings(
        c, learner_mesh, sharding.make_rules(learner_mesh, cfg.mesh.rules, sharding.trunk_dims(c))))  # straight to shards
    dims = sharding.trunk_dims(model.cfg)
    learner_rules = sharding.make_rules(learner_mesh, cfg.mesh.rules, dims)
    actor_rules = sharding.make_rules(actor_mesh, cfg.mesh.rules, dims)
    if env is None:
        env = make_environment(rl.environment, **env_options(rl, "train" if rl.eval_tasks else None))
    mtp_cfg = mtp_params = draft_ids = None
    if spec.mode != "none":
        if spec.mtp_checkpoint is None:
            raise ValueError(f"speculative.mode={spec.mode} needs speculative.mtp_checkpoint (trained MTP heads)")
        mtp_cfg, mtp_params, draft_ids = load_mtp_heads(spec.mtp_checkpoint, model.cfg)
        mtp_cfg = dataclasses.replace(mtp_cfg, num_steps=max(mtp_cfg.num_steps, spec.num_draft))
    if rl.mtp_strategy != "frozen" and mtp_params is None:
        raise ValueError(f"rl.mtp_strategy={rl.mtp_strategy} needs MTP heads (speculative.mtp_checkpoint)")
    heads_sh = lambda mesh, rules: sharding.logical_to_sharding(  # noqa: E731
        sharding.abstract_heads(model.cfg, mtp_cfg), mesh, rules)
    actor_params_sh = sharding.param_shardings(model.cfg, actor_mesh, actor_rules)
    actor_heads_sh = None if mtp_params is None else heads_sh(actor_mesh, actor_rules)
    actor_heads = None if mtp_params is None else publish(mtp_params, actor_heads_sh)
    actor = Actor.from_config(cfg, model, env, mtp_cfg, actor_heads, draft_ids)
    num_groups = rl.prompts_per_step + 1
    evaluate = held_out_eval(cfg, model) if rl.eval_tasks else None

    # The learner: its state on the learner mesh by logical axes; its two jitted functions bound to that mesh.
    settings = _settings(cfg)
    learner_fns = functools.partial(_learner_fns, model.cfg, settings, num_groups, learner_mesh, learner_rules)
    state_sh = learner_fns(actor.rows_for(rl.prompts_per_step), actor.length)[0]
    params = sharding.put_global(model.params, state_sh.params)  # may share model.params' buffers
    ref_params = params if rl.kl_coef > 0 else None
    state = place_learner(params, settings, state_sh)
    updater = None
    if rl.mtp_strategy != "frozen":
        updater = OnlineMTPUpdater(model, mtp_cfg, mtp_params, rl.mtp_strategy, rl.mtp_learning_rate, actor.length,
                                   heads_sh(learner_mesh, learner_rules), draft_ids)

    os.makedirs(rl.run_dir, exist_ok=True)
    distributed.check_shared_dir(rl.run_dir, "rl.run_dir")  # one checkpoint, written by all processes
    ckpt = RunCheckpoints(rl.run_dir)
    key = sharding.put_global(jax.random.key(rl.seed), NamedSharding(learner_mesh, PartitionSpec()))  # checkpointed
    next_batch, dropped, start = 0, 0, 0
    whole = lambda: {"learner": state, "key": key,  # noqa: E731
                     "mtp": None if updater is None else {"params": updater.state.params,
                                                          "opt_state": updater.state.opt_state}}
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(ckpt.latest_step(), whole())
        state, key = restored["learner"], restored["key"]
        if updater is not None:
            updater.state = updater.state.replace(params=restored["mtp"]["params"],
                                                  opt_state=restored["mtp"]["opt_state"])
        next_batch, dropped, start = meta["next_batch"], meta["dropped"], int(state.step)
    if updater is not None:
        actor_heads = publish(updater.state.params, actor_heads_sh)

    def save(step: int) -> None:
        """A durable checkpoint: RL steps are long, so waiting for the write costs little and bounds loss."""
        ckpt.save(step, whole(), None, {"next_batch": next_batch, "dropped": dropped, "config": to_dict(cfg)})
        ckpt.manager.wait_until_finished()

    lead = jax.process_index() == 0  # the one process that writes logs, metrics and the summary
    writer = SummaryWriter(os.path.join(rl.run_dir, "tb")) if lead else None
    history_file = open(os.path.join(rl.run_dir, "metrics.jsonl"), "a") if lead else None

    def run_eval(step: int) -> None:
        with sharding.use_mesh(actor_mesh, actor_rules):
            result = {"step": step, **evaluate(publish(state.params, actor_params_sh, model.cfg.compute_dtype))}
        if lead:
            for name in ("accuracy", "response_length"):
                writer.add_scalar(f"eval/{name}", result[name], step)
            append_evals(rl.run_dir, [result])

    bar = tqdm(total=rl.steps, initial=start, desc=f"rl {rl.loop} {spec.mode}", disable=not (progress and lead))
    last_step = rl.steps if stop_at_step is None else min(rl.steps, stop_at_step)
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=rl.queue_size)
    errors: list[BaseException] = []
    on_actor = NamedSharding(actor_mesh, PartitionSpec())

    def produce(index: int, params, heads, version: int):
        """Batch `index` rolled out on the actor mesh with published `params` and `heads` of policy `version`."""
        rollout_key = sharding.put_global(jax.random.fold_in(key, index), on_actor)
        with sharding.use_mesh(actor_mesh, actor_rules):
            actor.mtp_params = heads
            traj, metrics = actor.rollout(params, version, rollout_key, _tasks(env, cfg, index))
        return index, traj, metrics

    def actor_thread(first: int):
        index = first
        try:
            while not stop.is_set():
                params, heads, version = published.wait_for(index - rl.max_staleness, stop)
                if stop.is_set():
                    return
                item = produce(index, params, heads, version)
                while not stop.is_set():
                    try:
                        batches.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        pass
                index += 1
        except BaseException as e:  # surfaced on the learner thread
            errors.append(e)
            stop.set()

    thread = None
    # On several processes every collective must be issued in one order on all of them: the actor then
    # rolls out in turn with the learner, on the weights last published (no overlap, same staleness rule).
    threaded = rl.loop == "async" and jax.process_count() == 1
    if rl.loop == "async" and start < last_step:
        published = Published(publish(state.params, actor_params_sh, model.cfg.compute_dtype), actor_heads, start)
    if threaded and start < last_step:
        thread = threading.Thread(target=actor_thread, args=(next_batch,), daemon=True, name="actor")
        thread.start()
    t_start = time.perf_counter()
    step = start
    try:
        if evaluate is not None and start == 0:
            run_eval(0)
        with distributed.PreemptionGuard() as guard:
            while step < last_step:
                if rl.loop == "sync":
                    index, traj, am = produce(next_batch, publish(state.params, actor_params_sh, model.cfg.compute_dtype), actor_heads, step)
                elif not threaded:
                    index, traj, am = produce(next_batch, *published.value)
                else:
                    while True:
                        if errors:
                            raise RuntimeError("the actor thread failed") from errors[0]
                        try:
                            index, traj, am = batches.get(timeout=0.5)
                            break
                        except queue.Empty:
                            pass
                next_batch = index + 1
                staleness = step - int(traj.policy_version[0])
                if staleness > rl.max_staleness:
                    dropped += 1
                    continue
                t0 = time.perf_counter()
                if rl.share_prefix:  # the same rows, each group's prompt run once
                    traj = share_prefixes(traj, num_groups, rl.length_buckets)
                else:  # the same rows, cut to their filled length
                    traj = trim_trajectories(traj, rl.length_buckets)
                _, traj_sh, logprobs, update = learner_fns(*traj.tokens.shape, traj.prefix_dims())
                batch = sharding.put_global(traj, traj_sh)  # host rows (the same on every process) -> the mesh
                logp_ref = None if ref_params is None else logprobs(ref_params, batch)
                extra = {}
                if updater is not None:
                    with sharding.use_mesh(learner_mesh, learner_rules):
                        extra = updater.update(state.params, batch.tokens, batch.loss_mask)
                state, lm = update(state, batch, None, logp_ref)  # one update per batch: pi_prox = the state's policy
                lm = {k: float(v) for k, v in jax.device_get(lm).items()}
                if not np.isfinite(lm["loss"]):
                    raise FloatingPointError(f"RL loss is {lm['loss']} at learner step {step + 1}")
                step += 1
                metrics = {**am, **lm, **extra, "learner_step_s": time.perf_counter() - t0,
                           "learner_tokens": traj.forward_tokens(), "staleness": staleness,
                           "dropped_trajectories": dropped, "wall_s": time.perf_counter() - t_start}
                if rl.loop == "sync" or step % rl.publish_every == 0:
                    if updater is not None:
                        actor_heads = publish(updater.state.params, actor_heads_sh)
                    if rl.loop == "async":
                        published.publish(publish(state.params, actor_params_sh, model.cfg.compute_dtype), actor_heads, step)
                if lead:
                    for name, value in metrics.items():
                        writer.add_scalar(f"rl/{name}", value, step)
                    history_file.write(json.dumps({"step": step, **metrics}) + "\n")
                    history_file.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.2f}",
                                accept=f"{metrics.get('draft_acceptance_rate', float('nan')):.2f}")
                if evaluate is not None and (step % rl.eval_every == 0 or step == rl.steps):
                    run_eval(step)
                if step % rl.checkpoint_every == 0 or step == last_step or guard.should_stop():
                    save(step)
                if guard.should_stop():
                    print(f"signal received: checkpoint saved at step {step}, exiting", flush=True)
                    break
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=60)
        bar.close()
        if lead:
            writer.close()
            history_file.close()
        ckpt.close()
    summary = summarise_run(rl.run_dir) if lead else {}
    summary.update(steps=step, dropped=dropped, mode=spec.mode, loop=rl.loop)
    if lead:
        with open(os.path.join(rl.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
