"""`bebop rl`: the actor/learner loop, async (default) or sync, with whole-state checkpoints.

Async: one actor thread rolls out batch i with the newest published weights once the published
version is >= i - max_staleness, and puts it on a bounded queue; the learner (main thread) takes
batches, drops those whose version lags its own by more than `max_staleness` (counted), updates, and
publishes a copy of its weights every `publish_every` steps (on one device a copy; on a pod the
copy is a reshard onto the actor's devices). Sync: rollout, then update, in turn.
Batch i's tasks and keys derive from (seed, i) only, so sync and async with staleness 0 make the
same first update, and a resumed run continues with the same data.

Whole-state checkpoints every `checkpoint_every` steps and on SIGTERM (a TPU VM's preemption): the
learner state (policy, optimizer, step), the MTP heads and their optimizer, the RNG key, and in the
metadata the next batch index (data position) and the dropped count. After kill -9 a restart loses
at most one checkpoint interval. MTP heads: `frozen` (default), or updated on each batch with CE or
TV (`online-ce`, `online-tv`) for the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.checkpoint import RunCheckpoints, load_mtp_heads
from bebop_jax.config import Config, to_dict
from bebop_jax.distributed import PreemptionGuard
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.model.mtp import vocab_matrix
from bebop_jax.rl.actor import Actor
from bebop_jax.rl.environments import make_environment
from bebop_jax.rl.learner import LearnerSettings, LearnerState, init_learner, learner_step, policy_logprobs


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

    def __init__(self, model: LoadedModel, mtp_cfg, mtp_params, strategy: str, learning_rate: float, length: int):
        from bebop_jax.pretrain_mtp import StepSettings, TrainState

        self.model, self.mtp_cfg = model, mtp_cfg
        self.settings = StepSettings(loss="ce" if strategy == "online-ce" else "tv", temperature=1.0,
                                     num_origins=length, learning_rate=learning_rate, warmup_steps=0, steps=10**9,
                                     weight_decay=0.0, grad_clip=1.0)
        self.state = TrainState(jnp.int32(0), mtp_params, self.settings.optimizer().init(mtp_params))

    def update(self, params, traj) -> dict:
        from bebop_jax.pretrain_mtp import train_step, trunk_hidden

        tokens = jnp.asarray(traj.tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        segments = jnp.zeros_like(tokens)
        batch = dict(hidden=trunk_hidden(params, tokens, positions, segments, cfg=self.model.cfg), tokens=tokens,
                     positions=positions, segment_ids=segments, completion=jnp.asarray(traj.loss_mask))
        frozen = dict(embedding=params["embedding"], w_vocab=vocab_matrix(self.model.cfg, params))
        self.state, metrics = train_step(self.state, frozen, batch, cfg=self.model.cfg, mtp=self.mtp_cfg,
                                         settings=self.settings)
        return {"mtp_loss": float(metrics["loss"]), "mtp_alpha_1": float(metrics["alpha"][0])}


def _settings(cfg: Config) -> LearnerSettings:
    rl = cfg.rl
    return LearnerSettings(temperature=rl.temperature, clip_eps=rl.clip_eps, is_cap=rl.is_cap, kl_coef=rl.kl_coef,
                           learning_rate=rl.learning_rate)


def _tasks(env, cfg: Config, index: int):
    return env.sample_tasks(np.random.default_rng([cfg.rl.seed, index]), cfg.rl.prompts_per_step)


def train_rl(cfg: Config, model: LoadedModel | None = None, env=None, progress: bool = True,
             stop_at_step: int | None = None) -> dict:
    """Runs (or resumes) an RL run in `cfg.rl.run_dir`; returns the summary (also written as summary.json).

    env: any object of the `Environment` protocol (default: `make_environment(cfg.rl.environment)`).
    stop_at_step: end (with a checkpoint) after this learner step, as an interruption would.
    """
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    rl, spec = cfg.rl, cfg.speculative
    model = model or load_model(cfg.model.source, cfg.model.dtype)
    if env is None:
        env = make_environment(rl.environment, **({"source": rl.env_source} if rl.env_source else {}))
    mtp_cfg = mtp_params = None
    if spec.mode != "none":
        if spec.mtp_checkpoint is None:
            raise ValueError(f"speculative.mode={spec.mode} needs speculative.mtp_checkpoint (trained MTP heads)")
        mtp_cfg, mtp_params = load_mtp_heads(spec.mtp_checkpoint)
        mtp_cfg = dataclasses.replace(mtp_cfg, num_steps=max(mtp_cfg.num_steps, spec.num_draft))
        mtp_params = jax.tree.map(jnp.asarray, mtp_params)
    actor = Actor(model, env, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                  mode=spec.mode, num_draft=spec.num_draft, mtp_cfg=mtp_cfg, mtp_params=mtp_params,
                  max_prompt_tokens=rl.max_prompt_tokens,
                  max_seq_len=min(cfg.model.max_seq_len, model.cfg.max_position_embeddings))
    settings = _settings(cfg)
    ref_params = jax.tree.map(jnp.copy, model.params) if rl.kl_coef > 0 else None
    state = init_learner(jax.tree.map(jnp.copy, model.params), settings)
    updater = None
    if rl.mtp_strategy != "frozen":
        if mtp_params is None:
            raise ValueError(f"rl.mtp_strategy={rl.mtp_strategy} needs MTP heads (speculative.mtp_checkpoint)")
        updater = _MTPUpdater(model, mtp_cfg, mtp_params, rl.mtp_strategy, rl.mtp_learning_rate, actor.length)

    os.makedirs(rl.run_dir, exist_ok=True)
    ckpt = RunCheckpoints(rl.run_dir)
    key = jax.random.key(rl.seed)
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
        actor.mtp_params = updater.state.params

    def save(step: int) -> None:
        """A durable checkpoint: RL steps are long, so waiting for the write costs little and bounds loss."""
        ckpt.save(step, whole(), None, {"next_batch": next_batch, "dropped": dropped, "config": to_dict(cfg)})
        ckpt.manager.wait_until_finished()

    writer = SummaryWriter(os.path.join(rl.run_dir, "tb"))
    history_file = open(os.path.join(rl.run_dir, "metrics.jsonl"), "a")
    bar = tqdm(total=rl.steps, initial=start, desc=f"rl {rl.loop} {spec.mode}", disable=not progress)
    num_groups = rl.prompts_per_step + 1
    last_step = rl.steps if stop_at_step is None else min(rl.steps, stop_at_step)
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=rl.queue_size)
    published = _Published(jax.tree.map(jnp.copy, state.params), actor.mtp_params, start)
    errors: list[BaseException] = []

    def produce(index: int, params, heads, version: int):
        actor.mtp_params = heads
        traj, metrics = actor.rollout(params, version, jax.random.fold_in(key, index), _tasks(env, cfg, index))
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
    if rl.loop == "async" and start < last_step:
        thread = threading.Thread(target=actor_thread, args=(next_batch,), daemon=True, name="actor")
        thread.start()
    t_start = time.perf_counter()
    step = start
    try:
        with PreemptionGuard() as guard:
            while step < last_step:
                if rl.loop == "sync":
                    index, traj, am = produce(next_batch, state.params, actor.mtp_params, step)
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
                logp_prox, _ = policy_logprobs(state.params, traj.tokens, cfg=model.cfg, temperature=rl.temperature)
                logp_ref = None
                if ref_params is not None:
                    logp_ref, _ = policy_logprobs(ref_params, traj.tokens, cfg=model.cfg, temperature=rl.temperature)
                extra = updater.update(state.params, traj) if updater is not None else {}
                state, lm = learner_step(state, traj, logp_prox, logp_ref, cfg=model.cfg, settings=settings,
                                         num_groups=num_groups)
                lm = {k: float(v) for k, v in jax.device_get(lm).items()}
                if not np.isfinite(lm["loss"]):
                    raise FloatingPointError(f"RL loss is {lm['loss']} at learner step {step + 1}")
                step += 1
                metrics = {**am, **lm, **extra, "learner_step_s": time.perf_counter() - t0, "staleness": staleness,
                           "dropped_trajectories": dropped, "wall_s": time.perf_counter() - t_start}
                if step % rl.publish_every == 0:
                    heads = updater.state.params if updater is not None else actor.mtp_params
                    if rl.loop == "async":
                        published.publish(jax.tree.map(jnp.copy, state.params), heads, step)
                    else:
                        actor.mtp_params = heads
                for name, value in metrics.items():
                    writer.add_scalar(f"rl/{name}", value, step)
                history_file.write(json.dumps({"step": step, **metrics}) + "\n")
                history_file.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.2f}",
                                accept=f"{metrics.get('draft_acceptance_rate', float('nan')):.2f}")
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
        writer.close()
        history_file.close()
        ckpt.close()
    summary = _summarise(rl.run_dir)
    summary.update(steps=step, dropped=dropped, mode=spec.mode, loop=rl.loop)
    with open(os.path.join(rl.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def read_history(run_dir: str) -> list[dict]:
    """The per-step metrics of a run (the last record of each step wins, across resumes)."""
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _summarise(run_dir: str) -> dict:
    """Curves PNG (reward, acceptance) and headline numbers of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    if not history:
        return {}
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [h["reward"] for h in history], marker="o")
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
    return {"reward_first_half": mean("reward", history[:half]), "reward_second_half": mean("reward", history[half:]),
            "acceptance": mean("draft_acceptance_rate", history), "wall_s": history[-1]["wall_s"],
            "curves": os.path.join(run_dir, "curves.png")}
