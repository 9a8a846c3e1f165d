"""Speculative rollouts: the MTP heads draft K tokens, one trunk forward verifies them, rejection
sampling keeps the output distributed exactly as plain sampling (DESIGN.md, Speculative rollout).

One verify step of sequence b, whose newest token x_n sits at position n (not yet in the trunk cache)
and whose step-1 draft state h^1_{n-1} is known:
  1. draft: d_1 ~ q_1 = softmax(LMHead(h^1_{n-1}) / T); for k = 2..K the MTP step k at position n+k-1
     takes (E d_{k-1}, h^{k-1}) and gives q_k, d_k (argmax in `greedy_draft` mode);
  2. verify: the trunk runs [x_n, d_1..d_K] at positions n..n+K -> p_1..p_{K+1};
  3. `rejection_sample` emits 1..K+1 tokens (cut at EOS and at max_new_tokens);
  4. the MTP step 1 is re-run on the accepted positions with the true trunk hidden states, which
     also yields the next h^1 for drafting.
Mode `none` is plain decoding through the same loop (no drafts, one token per step), so plain and
speculative runs are compared like for like. All of it is one jitted prefill and one jitted
`lax.while_loop`, compiled once per (shapes, K): the temperature and the verification rule are traced
values (the rule picks a branch of a `lax.switch`), so sweeping them recompiles nothing; each sequence keeps its own position, and slots written by rejected drafts are
overwritten later. Per emitted token the policy log-prob and entropy (at the sampling temperature)
are recorded; per step the accepted count. Rows that have finished stop costing: `speculative_generate`
stops the loop once at most half of a batch (>= 4 rows) is unfinished and goes on with those rows in a batch
half the size (`compact`); every row draws from its own key, so its tokens do not change (up to a near-tied
sample that f32 rounding at another batch size flips: 1 of 80 SmolLM2 sequences, `rollout_compaction`).
Where a verify step costs more than its tokens bring (large batches on a compute-bound chip), `max_rows`
speculates only once compaction has brought the batch to that many rows: above it, `decode(speculate=False)`
takes plain steps that still run the MTP step 1 on each new token, so drafting resumes from exact states
(vLLM's speculative_disable_by_batch_size, at compaction points).

With num_layers > 1 only the first MTP layer's cache is refreshed with true states; the later layers
see their own draft-time states at older positions (as serving engines do for chained drafts).
Shape letters: B batch, K drafts, R = K + 1, N max new tokens, V vocab, D width, P prompt width.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import sampling, sharding
from bebop_jax.batching import cache_length_for, check_lengths, pad_prompts
from bebop_jax.model.mtp import MTPConfig, MTPHeads, init_mtp_cache, vocab_matrix
from bebop_jax.model.transformer import Transformer, TransformerConfig, init_cache, vocab_logits
from kernels_pallas.rejection_sampling import MODES as RULES  # the verification rules, one source of truth
from kernels_pallas.rejection_sampling import rejection_sample

MODES = ("none",) + RULES  # "none": plain decoding; `decode` takes the index of a rule as a traced value


@flax.struct.dataclass
class SpecState:
    """Carry of the speculative loop. Per-token arrays are [B, N + R] (room for one overshooting step)."""

    step: jax.Array  # [] verify steps taken
    tokens: jax.Array  # [B, N+R] int32 emitted tokens, -1 after the end
    logprobs: jax.Array  # [B, N+R] f32 log p(token) under the policy at temperature T
    entropies: jax.Array  # [B, N+R] f32 entropy of p (nats)
    num_tokens: jax.Array  # [B] int32 emitted so far (EOS included)
    position: jax.Array  # [B] int32 position of the newest token x_n
    draft_hidden: jax.Array  # [B, D] h^1_{n-1}: the MTP step-1 state that drafts d_1
    done: jax.Array  # [B] bool
    trunk_cache: tuple
    mtp_cache: tuple
    key: jax.Array  # [B] one PRNG key per sequence
    verify_steps: jax.Array  # [B] int32 verify steps taken while active
    draft_steps: jax.Array  # [B] int32 of those, the steps that drafted (the others: plain, `speculate=False`)
    accepted: jax.Array  # [B] int32 drafts accepted in total
    accepted_at: jax.Array  # [K] int32 steps (all rows) whose draft k was accepted
    emitted_per_step: jax.Array  # [N, B] int32 tokens emitted at each verify step (0 when inactive)


def _fns(cfg: TransformerConfig, mtp_cfg: MTPConfig | None):
    trunk = Transformer(cfg)
    heads = MTPHeads(cfg, mtp_cfg) if mtp_cfg is not None else None

    def forward(params, tokens, positions, cache):
        return trunk.apply({"params": params}, tokens, positions, cache)

    def logits(params, hidden):
        return trunk.apply({"params": params}, hidden, method=Transformer.logits)

    def embed(params, tokens):
        return trunk.apply({"params": params}, jnp.maximum(tokens, 0), method=Transformer.embed)

    def mtp_step(mtp_params, k, emb, h_prev, positions, cache):
        return heads.apply({"params": mtp_params}, k, emb, h_prev, positions, cache, method=MTPHeads.step)

    return forward, logits, embed, mtp_step


def _mtp_refresh(mtp_step, params, mtp_params, embed, mtp_cfg, tokens_next, hidden, positions, mtp_cache):
    """MTP step 1 over origins with known trunk states: tokens_next [B,W] = x_{j+1}, hidden [B,W,D] = h^0_j,
    positions [B,W] = j + 1. Writes layer 0's cache; returns (h^1 [B,W,D], mtp_cache)."""
    h1, layer0 = mtp_step(mtp_params, 1, embed(params, tokens_next), hidden, positions, mtp_cache[0])
    return h1, (layer0,) + tuple(mtp_cache[1:])


@functools.partial(jax.jit, static_argnames=("cfg", "mtp_cfg", "num_draft", "max_new_tokens", "cache_len",
                                             "greedy", "top_p", "eos_ids"))
def prefill(params, mtp_params, tokens, lengths, key, temperature, *, cfg, mtp_cfg, num_draft, max_new_tokens,
            cache_len, greedy, top_p, eos_ids) -> SpecState:
    """Runs the prompts [B, P] (lengths [B]), samples the first token, primes the MTP step-1 cache.

    key: one key per sequence [B] (`sampling.sequence_keys`), or one key, taken as fold_in(key, row);
    each row's randomness comes from its own key, so its tokens do not depend on the rest of the batch.
    temperature: a traced scalar (> 0) unless `greedy` (static), which decodes by argmax.
    """
    temperature = 0.0 if greedy else temperature
    forward, logits, embed, mtp_step = _fns(cfg, mtp_cfg)
    B, P = tokens.shape
    R, N = num_draft + 1, max_new_tokens
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    hidden, trunk_cache = forward(params, tokens, positions, init_cache(cfg, B, cache_len))
    rows = jnp.arange(B)
    last_logits = logits(params, hidden[rows, lengths - 1])  # [B, V]
    key, sub = sampling.split_rows(sampling.sequence_keys(key, B) if key.ndim == 0 else key, 2)
    first_dist = sampling.distribution(last_logits, temperature, top_p)
    first = sampling.categorical(sub, first_dist.probs)  # [B]
    logp = sampling.token_logprob(last_logits, first, temperature, first_dist.log_norm)
    ent = first_dist.entropy
    if mtp_cfg is not None and num_draft > 0:
        nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1).at[rows, lengths - 1].set(first)
        h1, mtp_cache = _mtp_refresh(mtp_step, params, mtp_params, embed, mtp_cfg, nxt, hidden, positions + 1,
                                     init_mtp_cache(cfg, mtp_cfg, B, cache_len))
        draft_hidden = h1[rows, lengths - 1]
    else:
        mtp_cache, draft_hidden = (), jnp.zeros((B, cfg.hidden_size), cfg.compute_dtype)
    width = N + R
    done = sampling.is_eos(first, eos_ids) | (N == 1)
    return SpecState(
        step=jnp.int32(0),
        tokens=jnp.full((B, width), -1, jnp.int32).at[:, 0].set(first),
        logprobs=jnp.zeros((B, width), jnp.float32).at[:, 0].set(logp),
        entropies=jnp.zeros((B, width), jnp.float32).at[:, 0].set(ent),
        num_tokens=jnp.ones((B,), jnp.int32), position=lengths.astype(jnp.int32), draft_hidden=draft_hidden,
        done=done, trunk_cache=trunk_cache, mtp_cache=mtp_cache, key=key,
        verify_steps=jnp.zeros((B,), jnp.int32), draft_steps=jnp.zeros((B,), jnp.int32),
        accepted=jnp.zeros((B,), jnp.int32),
        accepted_at=jnp.zeros((max(num_draft, 1),), jnp.int32), emitted_per_step=jnp.zeros((N, B), jnp.int32))


def _draft(params, mtp_params, s: SpecState, key, *, mtp_step, draft_logits, embed, num_draft, greedy_draft,
           temperature, top_p, draft_ids, vocab_size):
    """Drafts K tokens from h^1_{n-1}: (draft_tokens [B,K], draft_probs [B,K,V], mtp_cache).

    greedy_draft: a traced bool, argmax drafts (as at temperature 0) instead of samples from q.

    With `draft_ids` [Vd] the heads score only that sub-vocabulary (q = 0 elsewhere: rejection
    sampling stays exact, only acceptance can drop) and the LM-head cost per draft falls by V / Vd.
    """
    h, cache = s.draft_hidden, s.mtp_cache
    toks, probs = [], []
    for k in range(1, num_draft + 1):
        if k > 1:
            i = (k - 1) % len(cache)  # the layer MTPHeads.step uses for step k
            out, layer_cache = mtp_step(mtp_params, k, embed(params, toks[-1][:, None]), h[:, None],
                                        (s.position + k - 1)[:, None], cache[i])
            cache = cache[:i] + (layer_cache,) + cache[i + 1:]
            h = out[:, 0]
        q = sampling.probs_from_logits(draft_logits(h), temperature, top_p)  # [B, Vd]
        key, sub = sampling.split_rows(key, 2)
        d = jnp.argmax(q, axis=-1).astype(jnp.int32)
        if not sampling.is_greedy(temperature):
            d = jnp.where(greedy_draft, d, sampling.categorical(sub, q))
        if draft_ids is not None:
            d = draft_ids[d]
            q = jnp.zeros((q.shape[0], vocab_size), q.dtype).at[:, draft_ids].set(q)
        toks.append(d)
        probs.append(q)
    return jnp.stack(toks, axis=1), jnp.stack(probs, axis=1), cache


def _verify_loop(params, mtp_params, shape, temperature, draft_ids, rule, min_active, *, cfg, mtp_cfg, num_draft,
                 greedy, top_p, eos_ids, sampler, speculate=True):
    """(cond, body) of the verify loop over SpecStates whose tokens are `shape` = [B, N + R]; the loop runs
    while more than `min_active` sequences are unfinished. speculate=False (with heads): plain steps that
    refresh the MTP step-1 state at each new token, so a later speculative call drafts from exact states."""
    temperature = 0.0 if greedy else temperature
    forward, logits, embed, mtp_step = _fns(cfg, mtp_cfg)
    if draft_ids is None:
        draft_logits = functools.partial(logits, params)
    else:
        w_draft = vocab_matrix(cfg, params)[draft_ids].astype(cfg.compute_dtype)  # [Vd, D], gathered once

        def draft_logits(h):
            return vocab_logits(h, w_draft)  # [B, Vd]
    B, width = shape
    K, R = num_draft, num_draft + 1
    N = width - R  # the state's room: R per row for one overshooting step
    drafting = K > 0 and speculate
    W = R if drafting else 1  # tokens through the trunk per step
    rows = jnp.arange(B)

    def cond(s: SpecState):
        return (s.step < N) & (jnp.sum(~s.done) > min_active)

    def body(s: SpecState):
        key, k_draft, k_verify = sampling.split_rows(s.key, 3)
        last = jnp.maximum(s.tokens[rows, s.num_tokens - 1], 0)  # [B] x_n (finished rows: a dummy)
        if drafting:
            drafts, draft_probs, mtp_cache = _draft(
                params, mtp_params, s, k_draft, mtp_step=mtp_step, draft_logits=draft_logits, embed=embed,
                num_draft=K, greedy_draft=rule == RULES.index("greedy_draft"), temperature=temperature,
                top_p=top_p, draft_ids=draft_ids, vocab_size=cfg.vocab_size)
            verify_in = jnp.concatenate([last[:, None], drafts], axis=1)  # [B, R]
        else:
            verify_in, mtp_cache = last[:, None], s.mtp_cache
        positions = s.position[:, None] + jnp.arange(W, dtype=jnp.int32)  # [B, W]
        hidden, trunk_cache = forward(params, verify_in, positions, s.trunk_cache)  # [B, W, D]
        target_logits = logits(params, hidden)  # [B, W, V]
        target = sampling.distribution(target_logits, temperature, top_p)  # probs, log-normalisers, entropies
        if drafting:
            out, n_out = jax.lax.switch(rule, [functools.partial(rejection_sample, mode=m, implementation=sampler,
                                                                 validate=False, partition=sharding.kernel_partition())
                                               for m in RULES],
                                        drafts, draft_probs, target.probs, k_verify)
        else:
            out = sampling.categorical(k_verify, target.probs)  # [B, 1]
            n_out = jnp.ones((B,), jnp.int32)
        j = jnp.arange(W)[None, :]  # [1, W]
        emitted = j < n_out[:, None]
        is_eos = emitted & sampling.is_eos(out, eos_ids)
        hit_eos = jnp.any(is_eos, axis=1)
        count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, n_out)
        count = jnp.minimum(count, N - s.num_tokens)
        count = jnp.where(s.done, 0, count)  # [B] tokens this step adds
        logp = sampling.token_logprob(target_logits, out, temperature, target.log_norm)  # [B, W]
        ent = target.entropy
        write = jnp.where(j < count[:, None], s.num_tokens[:, None] + j, width)  # out of range -> dropped
        tokens = s.tokens.at[rows[:, None], write].set(out, mode="drop")
        logprobs = s.logprobs.at[rows[:, None], write].set(logp, mode="drop")
        entropies = s.entropies.at[rows[:, None], write].set(ent, mode="drop")
        active = ~s.done
        num_tokens = s.num_tokens + count
        done = s.done | (hit_eos & (count > 0)) | (num_tokens >= N)
        draft_hidden = s.draft_hidden
        if K > 0:
            h1, mtp_cache = _mtp_refresh(mtp_step, params, mtp_params, embed, mtp_cfg, out, hidden,
                                         positions + 1, mtp_cache)
            draft_hidden = jnp.where(active[:, None], h1[rows, jnp.maximum(count, 1) - 1], s.draft_hidden)
        n_acc = jnp.where(active, jnp.minimum(n_out - 1, count), 0)  # drafts accepted and emitted before the row's end
        return SpecState(
            step=s.step + 1, tokens=tokens, logprobs=logprobs, entropies=entropies, num_tokens=num_tokens,
            position=s.position + count, draft_hidden=draft_hidden, done=done, trunk_cache=trunk_cache,
            mtp_cache=mtp_cache, key=key, verify_steps=s.verify_steps + active.astype(jnp.int32),
            draft_steps=s.draft_steps + (active & drafting).astype(jnp.int32), accepted=s.accepted + n_acc,
            accepted_at=s.accepted_at + jnp.sum((n_acc[:, None] > jnp.arange(s.accepted_at.shape[0])[None])
                                                & active[:, None], axis=0).astype(jnp.int32),
            emitted_per_step=s.emitted_per_step.at[s.step].set(count))

    return cond, body


_DECODE_STATIC = ("cfg", "mtp_cfg", "num_draft", "greedy", "top_p", "eos_ids", "sampler", "speculate")


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC, donate_argnums=(2,))
def decode(params, mtp_params, state: SpecState, temperature, draft_ids=None, rule=0, min_active=0, *, cfg, mtp_cfg,
           num_draft, greedy, top_p, eos_ids, sampler=None, speculate=True) -> SpecState:
    """Verify steps until every sequence is done, or until at most `min_active` are not (num_draft = 0: plain
    decoding).

    temperature as in `prefill`; draft_ids [Vd] (optional): the draft sub-vocabulary; rule: int32 [],
    the index in RULES of the verification rule (traced); min_active: int32 [] (traced), where
    `speculative_generate` stops to drop finished rows; `sampler`: the rejection_sample implementation;
    speculate=False: plain steps on a state with heads (one token each, the MTP step-1 state kept current).
    """
    cond, body = _verify_loop(params, mtp_params, state.tokens.shape, temperature, draft_ids, rule, min_active,
                              cfg=cfg, mtp_cfg=mtp_cfg, num_draft=num_draft, greedy=greedy, top_p=top_p,
                              eos_ids=eos_ids, sampler=sampler, speculate=speculate)
    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC, donate_argnums=(2,))
def decode_step(params, mtp_params, state: SpecState, temperature, draft_ids=None, rule=0, *, cfg, mtp_cfg,
                num_draft, greedy, top_p, eos_ids, sampler=None, speculate=True) -> SpecState:
    """One verify step of `decode` (its loop's body), arguments as there: what `bebop plan` costs per step."""
    _, body = _verify_loop(params, mtp_params, state.tokens.shape, temperature, draft_ids, rule, 0, cfg=cfg,
                           mtp_cfg=mtp_cfg, num_draft=num_draft, greedy=greedy, top_p=top_p, eos_ids=eos_ids,
                           sampler=sampler, speculate=speculate)
    return body(state)


_PER_ROW = ("tokens", "logprobs", "entropies", "num_tokens", "position", "draft_hidden", "done", "trunk_cache",
            "mtp_cache", "key", "verify_steps", "draft_steps", "accepted")  # SpecState fields whose first axis is the batch
_OUTPUT = ("tokens", "logprobs", "entropies", "num_tokens", "verify_steps", "draft_steps", "accepted")  # per sequence


def _take(state: SpecState, rows: jax.Array) -> SpecState:
    """Rows `rows` [B'] of every per-sequence array of `state` (emitted_per_step [N, B] on its second axis)."""
    picked = {f: jax.tree.map(lambda x: jnp.take(x, rows, axis=0), getattr(state, f)) for f in _PER_ROW}
    return state.replace(**picked, emitted_per_step=jnp.take(state.emitted_per_step, rows, axis=1))


@functools.lru_cache(maxsize=16)
def _taker(shardings: tuple, treedef):
    """`_take` jitted to place its result as the state lay (rows over the same batch axes)."""
    return jax.jit(_take, out_shardings=jax.tree.unflatten(treedef, shardings))


def _batch_shards(state: SpecState) -> int:
    """Into how many pieces the batch axis of every per-sequence array of `state` divides (over devices)."""
    split = lambda x, axis=0: x.shape[axis] // x.sharding.shard_shape(x.shape)[axis]  # noqa: E731
    return math.lcm(split(state.emitted_per_step, 1),
                    *[split(x) for f in _PER_ROW for x in jax.tree.leaves(getattr(state, f))])


class _Outputs:
    """Host copies of each sequence's outputs, written as `speculative_generate` drops finished rows."""

    def __init__(self, state: SpecState, batch: int):
        self.rows = {f: np.zeros((batch,) + getattr(state, f).shape[1:], getattr(state, f).dtype) for f in _OUTPUT}
        self.emitted = np.zeros((state.emitted_per_step.shape[0], batch), np.int32)

    def write(self, state: SpecState, sequence: np.ndarray, final: np.ndarray) -> None:
        """Copies the rows of `state` that are `final` [B'] bool and hold a sequence (`sequence` [B'] >= 0)."""
        got = sharding.host_value({f: getattr(state, f) for f in _OUTPUT + ("emitted_per_step",)})
        real = (sequence >= 0) & final
        for f in _OUTPUT:
            self.rows[f][sequence[real]] = got[f][real]
        self.emitted[:, sequence[real]] = got["emitted_per_step"][:, real]


@flax.struct.dataclass
class Rollout:
    """What a speculative (or plain) generation returns, as numpy arrays; N = max_new_tokens."""

    tokens: np.ndarray  # [B, N] int32, -1 after each sequence's end
    num_tokens: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B, N] f32 behaviour log-probs of the emitted tokens
    entropies: np.ndarray  # [B, N] f32 policy entropy at each emitted token
    verify_steps: np.ndarray  # [B] verify (policy forward) steps per sequence
    draft_steps: np.ndarray  # [B] of those, the steps that drafted (all of them unless `max_rows` held some back)
    accepted: np.ndarray  # [B] accepted drafts per sequence
    accepted_at: np.ndarray  # [K] steps whose draft k was accepted (summed over the batch)
    emitted_per_step: np.ndarray  # [steps, B] tokens emitted per verify step (0 when inactive)

    def metrics(self, num_draft: int) -> dict[str, float]:
        """tokens/step (per policy forward); over the steps that drafted: draft_acceptance_rate,
        draft_mean_acceptance_length, draft_acceptance_rate_pos_{i}; and the fraction of steps that drafted."""
        steps = max(int(self.verify_steps.sum()), 1)
        out = {"tokens_per_step": float(self.num_tokens.sum() - len(self.num_tokens)) / steps}
        if num_draft > 0:
            drafted = max(int(self.draft_steps.sum()), 1)
            out["draft_acceptance_rate"] = float(self.accepted.sum()) / (drafted * num_draft)
            out["draft_mean_acceptance_length"] = 1.0 + float(self.accepted.sum()) / drafted
            for i in range(num_draft):
                out[f"draft_acceptance_rate_pos_{i}"] = float(self.accepted_at[i]) / drafted
            out["drafting_steps_fraction"] = float(self.draft_steps.sum()) / steps
        return out


def combine_rollouts(rollouts: list[Rollout]) -> Rollout:
    """One Rollout of several calls' sequences (stacked on the batch axis) whose metrics pool them all.

    Every call must share max_new_tokens and num_draft; emitted_per_step is dropped (steps differ).
    """
    if not rollouts:
        raise ValueError("combine_rollouts needs at least one Rollout")
    cat = lambda name: np.concatenate([getattr(o, name) for o in rollouts])  # noqa: E731
    return Rollout(tokens=cat("tokens"), num_tokens=cat("num_tokens"), logprobs=cat("logprobs"),
                   entropies=cat("entropies"), verify_steps=cat("verify_steps"), draft_steps=cat("draft_steps"),
                   accepted=cat("accepted"),
                   accepted_at=np.sum([o.accepted_at for o in rollouts], axis=0),
                   emitted_per_step=np.zeros((0, 0), np.int32))


def speculative_generate(params, cfg: TransformerConfig, prompts: list[list[int]], key: jax.Array, *,
                         mtp_params=None, mtp_cfg: MTPConfig | None = None, mode: str = "rejection",
                         num_draft: int = 3, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                         eos_ids: tuple[int, ...] = (), max_seq_len: int | None = None, sampler=None,
                         draft_ids=None, compact: bool = True, max_rows: int = 0) -> Rollout:
    """Generates from token-list prompts with MTP drafts verified by `mode` (or plain, mode='none').

    key: one key (row b draws from fold_in(key, b)) or one key per prompt [B] (`prefill`).
    draft_ids [Vd]: optional draft sub-vocabulary (e.g. `frequent_tokens`); exactness is unaffected.
    compact: once at most half of a batch of >= 4 rows is unfinished, go on with those rows in a batch half
    the size (finished rows stop costing; each sequence draws from its own key, so its tokens are those of a
    run that keeps every row, up to rounding at another batch size); every batch size compiles `decode` once.
    max_rows > 0: speculate only while the batch has at most this many rows (with `compact`, from the
    compaction that brings it there on); larger batches take plain steps that keep the heads' state current.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        num_draft, mtp_cfg, mtp_params = 0, None, None
    else:
        if mtp_cfg is None or mtp_params is None:
            raise ValueError(f"mode {mode!r} needs MTP heads (mtp_cfg and mtp_params); use mode='none' without them")
        if not 1 <= num_draft <= mtp_cfg.num_steps:
            raise ValueError(f"num_draft must be in 1..{mtp_cfg.num_steps} (the heads' steps), got {num_draft}")
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0: speculate at every batch size), got {max_rows}")
    if key.ndim and key.shape != (len(prompts),):
        raise ValueError(f"key: expected one key or one per prompt ({len(prompts)}), found shape {key.shape}")
    tokens, lengths = pad_prompts(prompts)
    check_lengths(lengths, max_new_tokens, max_seq_len or cfg.max_position_embeddings)
    static = dict(cfg=cfg, mtp_cfg=mtp_cfg, num_draft=num_draft, greedy=float(temperature) == 0.0,
                  top_p=float(top_p), eos_ids=tuple(eos_ids))
    temperature = jnp.float32(max(float(temperature), 1e-6))
    cache_len = cache_length_for(tokens.shape[1], max_new_tokens, extra=num_draft + 2)
    state = prefill(params, mtp_params, tokens, lengths, key, temperature, max_new_tokens=max_new_tokens,
                    cache_len=cache_len, **static)
    ids = None if draft_ids is None or mode == "none" else jnp.asarray(draft_ids, jnp.int32)
    rule = jnp.int32(RULES.index(mode) if mode in RULES else 0)
    outputs = _Outputs(state, len(prompts))
    sequence = np.arange(len(prompts))  # the prompt of each row of `state`; -1: a finished row padding the batch
    while True:
        half = sequence.size // 2
        if not (compact and half >= 2 and half % _batch_shards(state) == 0):
            half = 0  # run to the end
        speculate = max_rows == 0 or sequence.size <= max_rows
        state = decode(params, mtp_params, state, temperature, ids, rule, jnp.int32(half), sampler=sampler,
                       speculate=speculate, **static)
        done = sharding.host_value(state.done)
        if half == 0 or done.all():
            break
        outputs.write(state, sequence, done)  # a finished row's outputs are final; the others are written later
        active = np.flatnonzero(~done)
        keep = np.concatenate([active, np.flatnonzero(done)[:half - active.size]])
        sequence = np.where(np.arange(half) < active.size, sequence[keep], -1)
        leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
        state = _taker(tuple(leaves), treedef)(state, jnp.asarray(keep, jnp.int32))
    outputs.write(state, sequence, np.ones(sequence.size, bool))
    out, N = outputs.rows, max_new_tokens
    steps, accepted_at = sharding.host_value((state.step, state.accepted_at))
    return Rollout(tokens=out["tokens"][:, :N], num_tokens=out["num_tokens"], logprobs=out["logprobs"][:, :N],
                   entropies=out["entropies"][:, :N], verify_steps=out["verify_steps"],
                   draft_steps=out["draft_steps"], accepted=out["accepted"],
                   accepted_at=accepted_at[:num_draft], emitted_per_step=outputs.emitted[:int(steps)])


def frequent_tokens(token_arrays, vocab_size: int, size: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """The `size` most frequent ids in `token_arrays` (iterable of int arrays; -1 ignored) plus `always`.

    A frequency-ranked draft vocabulary (as in EAGLE-3 / FR-Spec), sorted ascending.
    """
    counts = np.zeros(vocab_size, np.int64)
    for arr in token_arrays:
        arr = np.asarray(arr).reshape(-1)
        counts += np.bincount(arr[arr >= 0], minlength=vocab_size)[:vocab_size]
    counts[list(always)] = counts.max() + 1
    ranked = np.argsort(-counts, kind="stable")[:size]
    return np.sort(ranked).astype(np.int32)
