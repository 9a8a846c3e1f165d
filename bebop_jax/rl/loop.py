"""`bebop rl`: the actor/learner loop, async (default) or sync, with whole-state checkpoints.

Devices: the learner and the actor each have a mesh (`sharding.rl_meshes`): disjoint sub-meshes when
`rl.actor_devices` is a fraction in (0, 1) of several devices (the learner's laid out by `mesh.*`, the
actor's data x tensor), one shared mesh otherwise. The learner state (policy, optimizer) lives on the
learner mesh, placed by its logical axes, and is updated by a `sharded_jit` step; the actor samples on
its own mesh with weights that `publish` copied there (`jax.device_put` onto the actor's shardings: a
reshard across the two device sets, a plain copy where they are shared), tagged with the policy version.
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
TV (`online-ce`, `online-tv`) for the comparison.

Held-out evaluation (`rl.eval_tasks` > 0, math): training draws from the environment's train split and
`held_out_eval` scores fixed test-split problems with plain sampling before the first step, every
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
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bebop_jax import distributed, sharding
from bebop_jax.checkpoint import RunCheckpoints, load_mtp_heads
from bebop_jax.config import Config, to_dict
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.model.transformer import TransformerConfig
from bebop_jax.rl.actor import Actor
from bebop_jax.rl.environments import make_environment
from bebop_jax.rl.learner import (LearnerSettings, LearnerState, Trajectories, init_learner, learner_step,
                                  policy_logprobs)


class _Published:
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


class _MTPUpdater:
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


def _settings(cfg: Config) -> LearnerSettings:
    rl = cfg.rl
    return LearnerSettings(temperature=rl.temperature, clip_eps=rl.clip_eps, is_cap=rl.is_cap, kl_coef=rl.kl_coef,
                           learning_rate=rl.learning_rate)


def _env_options(rl, split: str | None) -> dict:
    """Keyword arguments of the config's environment (its source; the math level; a split if given)."""
    options = {"source": rl.env_source} if rl.env_source else {}
    if rl.environment == "math":
        options["level"] = rl.math_level
    return options if split is None else dict(options, split=split)


def held_out_eval(cfg: Config, model: LoadedModel):
    """`evaluate(params) -> {accuracy, reward, response_length}` on rl.eval_tasks fixed problems of the
    environment's test split, one plain sample each at the rollout temperature, the same key every time
    (so two evaluations differ by the policy, not by the noise)."""
    rl = cfg.rl
    env = make_environment(rl.environment, **_env_options(rl, "test"))
    tasks = env.sample_tasks(np.random.default_rng([rl.seed, 2**31 - 1]), rl.eval_tasks)
    actor = Actor(model, env, group_size=1, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                  mode="none", max_prompt_tokens=rl.max_prompt_tokens,
                  max_seq_len=min(cfg.model.max_seq_len, model.cfg.max_position_embeddings))
    key = jax.random.key(rl.seed + 1)

    def evaluate(params) -> dict:
        metrics = actor.rollout(params, 0, key, tasks)[1]
        return {name: metrics[name] for name in ("accuracy", "reward", "response_length")}

    return evaluate


def _tasks(env, cfg: Config, index: int):
    return env.sample_tasks(np.random.default_rng([cfg.rl.seed, index]), cfg.rl.prompts_per_step)


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


def traj_shardings(rows: int, length: int, mesh: Mesh, rules: sharding.Rules) -> Trajectories:
    """Shardings of a Trajectories batch of [rows, length] tokens: rows over the batch axes."""
    tokens = sharding.batch_sharding((rows, length), mesh, rules)
    per_row = sharding.batch_sharding((rows,), mesh, rules)
    return Trajectories(tokens=tokens, loss_mask=tokens, behaviour_logprobs=tokens, rewards=per_row,
                        group_ids=per_row, policy_version=per_row)


@functools.lru_cache(maxsize=4)
def _learner_fns(model_cfg: TransformerConfig, settings: LearnerSettings, num_groups: int, mesh: Mesh,
                 rules: sharding.Rules, rows: int, length: int):
    """(state shardings, Trajectories shardings, logprobs(params, tokens [R,L]) -> [R,L], update(state,
    traj, logp_prox, logp_ref) -> (state, metrics)) on `mesh`; cached, so runs in one process (the demo's
    three MTP strategies, a benchmark's settings) share their compilations."""
    state_sh = learner_shardings(model_cfg, settings, mesh, rules)
    traj_sh = traj_shardings(rows, length, mesh, rules)
    rows_sh = traj_sh.behaviour_logprobs  # of the [R, L] per-token arrays
    logprobs = sharding.sharded_jit(
        lambda params, tokens: policy_logprobs(params, tokens, cfg=model_cfg, temperature=settings.temperature)[0],
        mesh, rules, in_shardings=(state_sh.params, traj_sh.tokens), out_shardings=rows_sh)
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
        env = make_environment(rl.environment, **_env_options(rl, "train" if rl.eval_tasks else None))
    mtp_cfg = mtp_params = draft_ids = None
    if spec.mode != "none":
        if spec.mtp_checkpoint is None:
            raise ValueError(f"speculative.mode={spec.mode} needs speculative.mtp_checkpoint (trained MTP heads)")
        mtp_cfg, mtp_params, draft_ids = load_mtp_heads(spec.mtp_checkpoint, model.cfg)
        mtp_cfg = dataclasses.replace(mtp_cfg, num_steps=max(mtp_cfg.num_steps, spec.num_draft))
    if rl.mtp_strategy != "frozen" and mtp_params is None:
        raise ValueError(f"rl.mtp_strategy={rl.mtp_strategy} needs MTP heads (speculative.mtp_checkpoint)")
    if rl.mtp_strategy != "frozen" and jax.process_count() > 1:
        raise ValueError(f"rl.mtp_strategy={rl.mtp_strategy} runs on one process; on {jax.process_count()} use "
                         "the default, frozen heads")
    heads_sh = lambda mesh, rules: sharding.logical_to_sharding(  # noqa: E731
        sharding.abstract_heads(model.cfg, mtp_cfg), mesh, rules)
    actor_params_sh = sharding.param_shardings(model.cfg, actor_mesh, actor_rules)
    actor_heads_sh = None if mtp_params is None else heads_sh(actor_mesh, actor_rules)
    actor_heads = None if mtp_params is None else publish(mtp_params, actor_heads_sh)
    actor = Actor(model, env, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                  mode=spec.mode, num_draft=spec.num_draft, mtp_cfg=mtp_cfg, mtp_params=actor_heads,
                  draft_ids=draft_ids, max_prompt_tokens=rl.max_prompt_tokens,
                  max_seq_len=min(cfg.model.max_seq_len, model.cfg.max_position_embeddings))
    num_groups = rl.prompts_per_step + 1
    evaluate = held_out_eval(cfg, model) if rl.eval_tasks else None

    # The learner: its state on the learner mesh by logical axes; its two jitted functions bound to that mesh.
    settings = _settings(cfg)
    state_sh, traj_sh, logprobs, update = _learner_fns(model.cfg, settings, num_groups, learner_mesh, learner_rules,
                                                       actor.rows_for(rl.prompts_per_step), actor.length)
    params = sharding.put_global(model.params, state_sh.params)  # may share model.params' buffers
    ref_params = params if rl.kl_coef > 0 else None
    state = place_learner(params, settings, state_sh)
    updater = None
    if rl.mtp_strategy != "frozen":
        updater = _MTPUpdater(model, mtp_cfg, jax.device_put(mtp_params, heads_sh(learner_mesh, learner_rules)),
                              rl.mtp_strategy, rl.mtp_learning_rate, actor.length, draft_ids)

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
        published = _Published(publish(state.params, actor_params_sh, model.cfg.compute_dtype), actor_heads, start)
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
                batch = sharding.put_global(traj, traj_sh)  # host rows (the same on every process) -> the mesh
                logp_prox = logprobs(state.params, batch.tokens)
                logp_ref = None if ref_params is None else logprobs(ref_params, batch.tokens)
                extra = {}
                if updater is not None:
                    with sharding.use_mesh(learner_mesh, learner_rules):
                        extra = updater.update(state.params, traj)
                state, lm = update(state, batch, logp_prox, logp_ref)
                lm = {k: float(v) for k, v in jax.device_get(lm).items()}
                if not np.isfinite(lm["loss"]):
                    raise FloatingPointError(f"RL loss is {lm['loss']} at learner step {step + 1}")
                step += 1
                metrics = {**am, **lm, **extra, "learner_step_s": time.perf_counter() - t0, "staleness": staleness,
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


def _read_jsonl(path: str) -> list[dict]:
    """Records with a "step" from a JSON-lines file (none if it is absent); the last of each step wins."""
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def append_evals(run_dir: str, results: list[dict]) -> None:
    """Adds held-out evaluations ({step, accuracy, reward, response_length}) to RUN/eval.jsonl."""
    with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)


def read_history(run_dir: str) -> list[dict]:
    """The per-step metrics of a run (the last record of each step wins, across resumes)."""
    return _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def summarise_run(run_dir: str) -> dict:
    """Curves PNG (reward, acceptance) and headline numbers of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    if not history:
        return {}
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    rewards = np.array([h["reward"] for h in history])
    axes[0].plot(steps, rewards, marker="o", alpha=0.5, label="per step")
    window = min(5, len(rewards))  # each step's reward is a mean over a few groups: noisy
    axes[0].plot(steps[window - 1:], np.convolve(rewards, np.ones(window) / window, mode="valid"), color="C3",
                 label=f"mean of {window} steps")
    evals = _read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if evals:
        axes[0].plot([e["step"] for e in evals], [e["accuracy"] for e in evals], marker="s", color="k",
                     label="held-out accuracy")
    axes[0].legend(loc="upper left", fontsize="small")
    axes[0].set(xlabel="learner step", ylabel="mean reward", title="reward")
    if "draft_acceptance_rate" in history[0]:
        axes[1].plot(steps, [h["draft_acceptance_rate"] for h in history], marker="o", color="C0")
        twin = axes[1].twinx()
        twin.plot(steps, [h["draft_mean_acceptance_length"] for h in history], marker=".", color="C1")
        twin.set_ylabel("tokens per verify step", color="C1")
    axes[1].set(xlabel="learner step", ylabel="draft acceptance rate", title="draft acceptance")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "curves.png"), dpi=100)
    plt.close(fig)
    half = max(len(history) // 2, 1)
    mean = lambda key, part: float(np.mean([h[key] for h in part if key in h])) if any(key in h for h in part) else None  # noqa: E731
    summary = {"reward_first_half": mean("reward", history[:half]), "reward_second_half": mean("reward", history[half:]),
               "acceptance": mean("draft_acceptance_rate", history), "wall_s": history[-1]["wall_s"],
               "curves": os.path.join(run_dir, "curves.png")}
    if evals:
        summary["eval_accuracy"] = {int(e["step"]): e["accuracy"] for e in evals}
    return summary
