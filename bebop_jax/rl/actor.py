"""The RL actor: G episodes per task, rolled out by the speculative engine with frozen MTP heads.

`Actor.rollout(params, version, key, tasks)` renders each episode's messages with the chat template,
generates every active episode of a turn in one batched `speculative_generate` call (`mode` and K
from the `speculative` config; `none` = plain decoding, the baseline), lets the environment grade or
continue the conversation, and returns a fixed-shape `Trajectories` batch (one row per turn; rows
padded to a static count and length so the learner never recompiles) plus rollout metrics.
The behaviour log-probs are those the engine recorded while sampling, at the rollout temperature.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bebop_jax.model import LoadedModel
from bebop_jax.rl.learner import Trajectories
from bebop_jax.speculative import combine_rollouts, speculative_generate


def _bucket(n: int, multiple: int) -> int:
    return int(-(-n // multiple) * multiple)


class Actor:
    """Produces trajectories for the learner from an `Environment` (see `bebop_jax.rl.environments`)."""

    def __init__(self, model: LoadedModel, env, *, group_size: int, max_new_tokens: int, temperature: float,
                 mode: str = "none", num_draft: int = 3, mtp_cfg=None, mtp_params=None, max_prompt_tokens: int = 384,
                 max_seq_len: int = 2048, draft_ids=None, compact: bool = True, max_rows: int = 0):
        self.model, self.env = model, env
        self.group_size, self.max_new_tokens, self.temperature = group_size, max_new_tokens, temperature
        self.mode, self.num_draft = mode, (0 if mode == "none" else num_draft)
        self.mtp_cfg, self.mtp_params, self.draft_ids = mtp_cfg, mtp_params, draft_ids
        self.compact, self.max_rows = compact, max_rows
        self.max_prompt_tokens, self.max_seq_len = max_prompt_tokens, max_seq_len
        self.length = _bucket(max_prompt_tokens + max_new_tokens, 64)  # L of every Trajectories batch

    @classmethod
    def from_config(cls, cfg, model: LoadedModel, env, mtp_cfg=None, mtp_params=None, draft_ids=None) -> "Actor":
        """The actor of a run config: its `rl` section's episodes, its `speculative` section's decoding."""
        rl, spec = cfg.rl, cfg.speculative
        return cls(model, env, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                   temperature=rl.temperature, mode=spec.mode, num_draft=spec.num_draft, mtp_cfg=mtp_cfg,
                   mtp_params=mtp_params, draft_ids=draft_ids, max_prompt_tokens=rl.max_prompt_tokens,
                   compact=spec.compact, max_rows=spec.max_rows, max_seq_len=min(cfg.model.max_seq_len, model.cfg.max_position_embeddings))

    def rows_for(self, num_tasks: int) -> int:
        """Static row count of a batch: every episode may use every turn."""
        return num_tasks * self.group_size * self.env.max_turns

    def _encode(self, messages) -> list[int]:
        tok = self.model.tokenizer
        ids = tok.encode(tok.apply_chat_template(list(messages)))
        return ids[-self.max_prompt_tokens:]  # keep the end of an over-long conversation

    def rollout(self, params, version: int, key: jax.Array, tasks) -> tuple[Trajectories, dict]:
        """Rolls out G episodes of each task; returns (Trajectories with rows_for(len(tasks)) rows, metrics)."""
        t0 = time.perf_counter()
        G, tok = self.group_size, self.model.tokenizer
        episodes = [(i, task) for i, task in enumerate(tasks) for _ in range(G)]
        messages = [tuple(task.messages) for _, task in episodes]
        rewards = np.zeros(len(episodes), np.float32)
        correct = np.zeros(len(episodes), bool)
        active = list(range(len(episodes)))
        rows, rollouts, reasons = [], [], {}
        for turn in range(self.env.max_turns):
            if not active:
                break
            prompts = [self._encode(messages[e]) for e in active]
            out = speculative_generate(
                params, self.model.cfg, prompts, jax.random.fold_in(key, turn), mtp_params=self.mtp_params,
                mtp_cfg=self.mtp_cfg, mode=self.mode, num_draft=max(self.num_draft, 1), max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, eos_ids=tok.eos_token_ids, max_seq_len=self.max_seq_len,
                draft_ids=self.draft_ids, compact=self.compact, max_rows=self.max_rows)
            rollouts.append(out)
            still = []
            for b, e in enumerate(active):
                n = _cut_at_stop(tok, out.tokens[b, :int(out.num_tokens[b])], getattr(self.env, "stop", None))
                completion = out.tokens[b, :n]
                text = tok.decode(completion)
                result = self.env.step(episodes[e][1], messages[e], text)
                rows.append((e, prompts[b], completion, out.logprobs[b, :n]))
                reason = result.info.get("reason", "ok")
                if result.done or turn == self.env.max_turns - 1:
                    rewards[e] = result.reward if result.done else 0.0
                    correct[e] = bool(result.info.get("correct", result.reward >= 1.0)) and result.done
                    reasons[reason if result.done else "max_turns"] = reasons.get(reason, 0) + 1
                else:
                    messages[e] = tuple(result.messages)
                    still.append(e)
            active = still
        traj = self._pack(rows, rewards, [i for i, _ in episodes], version, len(tasks))
        elapsed = time.perf_counter() - t0
        generated = sum(len(r[2]) for r in rows)
        metrics = {"reward": float(rewards.mean()), "accuracy": float(correct.mean()),
                   "response_length": generated / max(len(rows), 1),
                   "policy_entropy": float(np.mean(np.concatenate([o.entropies[o.tokens >= 0] for o in rollouts]))),
                   "rollout_tokens_per_s": generated / elapsed, "rollout_s": elapsed, "turns": len(rollouts)}
        metrics.update(combine_rollouts(rollouts).metrics(self.num_draft))
        metrics.update({f"reason_{k}": v for k, v in reasons.items()})
        return traj, metrics

    def _pack(self, rows, rewards, episode_task, version: int, num_tasks: int) -> Trajectories:
        R, L = self.rows_for(num_tasks), self.length
        tokens = np.zeros((R, L), np.int32)
        mask = np.zeros((R, L), bool)
        logp = np.zeros((R, L), np.float32)
        row_rewards = np.zeros(R, np.float32)
        groups = np.full(R, num_tasks, np.int32)  # padding rows form an extra group with zero mask
        for r, (e, prompt, completion, lp) in enumerate(rows):
            P, n = len(prompt), len(completion)
            n = min(n, L - P)
            tokens[r, :P], tokens[r, P:P + n] = prompt, completion[:n]
            mask[r, P:P + n] = True
            logp[r, P:P + n] = lp[:n]
            row_rewards[r], groups[r] = rewards[e], episode_task[e]
        return Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=logp, rewards=row_rewards,
                            group_ids=groups, policy_version=np.full(R, version, np.int32))


def _cut_at_stop(tok, tokens: np.ndarray, stop: str | None) -> int:
    """The number of tokens up to and including the one that completes `stop` (all when absent)."""
    if stop is None or stop not in tok.decode(tokens):
        return len(tokens)
    return next(i for i in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:i]))
