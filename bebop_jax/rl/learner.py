"""The RL learner: GRPO advantages and the PPO clipped objective with off-policy correction.

Rollouts reach the learner as one typed pytree, `Trajectories` (tokens, loss mask, the behaviour
log-probs the actor recorded, rewards, groups, policy versions). Per completion token i:

    A        = (r - mean_group(r)) / (std_group(r) + eps)           GRPO, G samples per prompt
    ratio_i  = pi_theta(x_i) / pi_prox(x_i)                         pi_prox: the params at batch start
    w_i      = min(pi_prox(x_i) / mu(x_i), is_cap)                  mu: the behaviour policy (actor's
                                                                    recorded log-probs); truncated IS
    loss     = -sum_i w_i * min(ratio_i A, clip(ratio_i, 1 - eps, 1 + eps) A) / sum_i mask_i
               + kl_coef * mean_i k3(pi_ref || pi_theta)            optional KL to a reference policy

(decoupled PPO: clipping against the proximal policy, staleness corrected by the truncated weight).
Log-probs are taken at the rollout temperature, so pi_theta and mu are the same distribution family.
The G rollouts of a task share their prompt: `share_prefixes` marks it, and the forward (policy and
reference) runs each prompt once and the G completions on top of its KV cache (`SharedPrefix`).
Token-mean aggregation over the whole batch. Left out on purpose: value functions (GRPO needs none),
entropy bonuses, sequence-level ratios (GSPO).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bebop_jax.model.mtp import vocab_matrix
from bebop_jax.model.transformer import Transformer, TransformerConfig, init_cache, vocab_logits
from kernels_pallas.placement import platform


@flax.struct.dataclass
class SharedPrefix:
    """Prefixes that several rows share, run once each (`share_prefixes`). P and S are static: each pair
    compiles the learner once. Prefix p is the first `length[p]` tokens of row `source_row[p]`; every row
    `b` with of_row[b] = p starts with them and trains on none of them."""

    source_row: jax.Array  # [Gp] int32
    length: jax.Array  # [Gp] int32, >= 1
    of_row: jax.Array  # [B] int32
    width: int = flax.struct.field(pytree_node=False)  # P: tokens run per prefix (>= every length)
    suffix: int = flax.struct.field(pytree_node=False)  # S: tokens run per row after its prefix


@flax.struct.dataclass
class Trajectories:
    """A batch of rollouts, right-padded to L tokens: rows are turns (a single-turn episode is one row)."""

    tokens: jax.Array  # [B, L] int32 prompt + completion, 0 after the end
    loss_mask: jax.Array  # [B, L] bool: tokens the policy generated (the ones trained on)
    behaviour_logprobs: jax.Array  # [B, L] f32 log mu(x_i) at generated tokens, 0 elsewhere
    rewards: jax.Array  # [B] f32 episode reward
    group_ids: jax.Array  # [B] int32 prompt group (G episodes of one task share it)
    policy_version: jax.Array  # [B] int32 learner version the actor sampled with
    prefix: SharedPrefix | None = None  # set by `share_prefixes`: the forward runs shared prompts once

    def prefix_dims(self) -> tuple[int, int, int] | None:
        """(prefixes, P, S) of the SharedPrefix (None without one): with the tokens' shape, what it compiles for."""
        p = self.prefix
        return None if p is None else (len(p.source_row), p.width, p.suffix)

    def forward_tokens(self) -> float:
        """Tokens the learner's forward runs per row: L, or with shared prefixes (Gp P + B S) / B."""
        B, L = self.tokens.shape
        dims = self.prefix_dims()
        return float(L) if dims is None else (dims[0] * dims[1] + B * dims[2]) / B


def bucket_length(filled: int, length: int, buckets: int) -> int:
    """The learner's length for rows filled to `filled` tokens: the shortest of `buckets` lengths
    ceil(length * k / buckets) (k = 1..buckets, each rounded up to a multiple of 8) that holds them."""
    for k in range(1, buckets + 1):
        cut = min(length, -(-length * k // (8 * buckets)) * 8)
        if cut >= filled:
            return cut
    return length


def _trained_end(mask: np.ndarray, default) -> np.ndarray:
    """One past each row's last trained token: mask [B, L] bool -> [B] int (`default` for rows training none)."""
    return np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), default)


def trim_trajectories(traj: Trajectories, buckets: int) -> Trajectories:
    """A host batch [B, L] cut to `bucket_length` of its last trained token: the same loss and gradient.

    The loss is a mean over loss_mask and the model is causal, so tokens after every row's last trained one
    change nothing; the learner then spends its FLOPs on the filled part (short answers in a long budget).
    buckets = 1 keeps L. Each new length compiles the learner once, so at most `buckets` compilations.
    """
    mask = np.asarray(traj.loss_mask)
    L = mask.shape[1]
    filled = int(np.max(_trained_end(mask, 0), initial=0))
    cut = bucket_length(max(filled, 2), L, buckets)
    if cut == L:
        return traj
    return traj.replace(tokens=traj.tokens[:, :cut], loss_mask=traj.loss_mask[:, :cut],
                        behaviour_logprobs=traj.behaviour_logprobs[:, :cut])


def share_prefixes(traj: Trajectories, num_groups: int, buckets: int) -> Trajectories:
    """`traj` (host arrays) with its rows' shared prefixes marked: the same loss and gradient, fewer FLOPs.

    The prefix of group g is the longest run of tokens that all its rows begin with and none trains on (the
    prompt of a single-turn task); rows of groups 0..num_groups-1 point to their group's prefix. The widths
    are `bucket_length`s of the longest prefix (P) and of the longest span from a row's prefix to its last
    trained token (S), so a run compiles at most buckets^2 learner shapes. At G rollouts per task of prompt
    length p and completion length n, the forward runs g (p + G n) tokens instead of g G (p + n).
    """
    tokens, mask = np.asarray(traj.tokens), np.asarray(traj.loss_mask)
    groups = np.asarray(traj.group_ids)
    B, L = tokens.shape
    first = np.where(mask.any(axis=1), np.argmax(mask, axis=1), L)  # each row's first trained token
    source, length = np.zeros(num_groups, np.int32), np.ones(num_groups, np.int32)
    for g in range(num_groups):
        rows = np.flatnonzero(groups == g)
        if rows.size == 0 or first[rows].min() == L:  # no row of the group trains: a 1-token prefix
            continue
        same = np.cumprod(np.all(tokens[rows] == tokens[rows[0]], axis=0))  # 1 while every row agrees
        source[g], length[g] = rows[0], max(1, min(int(same.sum()), int(first[rows].min())))
    of_row = groups.astype(np.int32)
    start = length[of_row]
    last = _trained_end(mask, start + 1)
    width = bucket_length(int(length.max()), L, buckets)
    suffix = bucket_length(int(np.max(last - start)), L, buckets)
    return traj.replace(prefix=SharedPrefix(source_row=source, length=length, of_row=of_row, width=width,
                                            suffix=suffix))


@flax.struct.dataclass
class LearnerState:
    step: jax.Array  # [] int32 optimizer updates = the policy version
    params: dict
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
    """Static settings of the learner step (hashable)."""

    temperature: float = 1.0
    clip_eps: float = 0.2
    is_cap: float = 2.0
    kl_coef: float = 0.0
    learning_rate: float = 1e-5
    grad_clip: float = 1.0
    weight_decay: float = 0.0

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                           optax.adamw(self.learning_rate, b1=0.9, b2=0.99, weight_decay=self.weight_decay))


def init_learner(params: dict, settings: LearnerSettings) -> LearnerState:
    return LearnerState(jnp.int32(0), params, settings.optimizer().init(params))


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, num_groups: int, eps: float = 1e-6) -> jax.Array:
    """Group-normalised rewards: rewards, group_ids [B] -> advantages [B]. A group of equal rewards gives 0."""
    ones = jnp.ones_like(rewards)
    count = jax.ops.segment_sum(ones, group_ids, num_groups)  # [G]
    mean = jax.ops.segment_sum(rewards, group_ids, num_groups) / jnp.maximum(count, 1.0)
    centered = rewards - mean[group_ids]
    var = jax.ops.segment_sum(centered**2, group_ids, num_groups) / jnp.maximum(count - 1.0, 1.0)  # unbiased
    return centered / (jnp.sqrt(var)[group_ids] + eps)


def token_logprobs(params, cfg: TransformerConfig, tokens: jax.Array, temperature: float,
                   prefix: SharedPrefix | None = None):
    """log pi(x_i | x_<i) at temperature T and the entropy of pi at i: tokens [B,L] -> ([B,L], [B,L]).

    Index 0 has no prediction and gets 0. The entropy carries no gradient (a metric, `vocab_token_logprobs`).
    With `prefix`, the rows' shared prefixes run once each (`shared_prefix_logprobs`): 0 at prefix tokens.
    """
    if prefix is not None:
        return shared_prefix_logprobs(params, cfg, tokens, temperature, prefix)
    model = Transformer(cfg)
    B, L = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), tokens.shape)
    hidden, _ = model.apply({"params": params}, tokens, positions)
    logp, entropy = _head_logprobs(params, cfg, hidden[:, :-1], tokens[:, 1:], temperature)
    pad = jnp.zeros((B, 1), jnp.float32)
    return jnp.concatenate([pad, logp], axis=1), jnp.concatenate([pad, entropy], axis=1)


def _head_logprobs(params, cfg: TransformerConfig, hidden: jax.Array, targets: jax.Array, temperature: float):
    """The LM head's log-prob of each target and its entropy: hidden [B,T,D], targets [B,T] -> 2 x [B,T] f32."""
    B, T = targets.shape
    if platform() == "cpu":  # 2-D dots, forward and gradient (faster on XLA:CPU); on a TPU mesh merging the
        hidden, targets = hidden.reshape(B * T, -1), targets.reshape(-1)  # sharded rows compiled 3x slower
    logp, entropy = vocab_token_logprobs(hidden, vocab_matrix(cfg, params), targets, temperature, cfg.compute_dtype)
    return logp.reshape(B, T), entropy.reshape(B, T)


def shared_prefix_logprobs(params, cfg: TransformerConfig, tokens: jax.Array, temperature: float,
                           prefix: SharedPrefix):
    """`token_logprobs` at the tokens after each row's shared prefix, (0, 0) elsewhere: tokens [B,L] -> 2 x [B,L].

    The Gp prefixes [Gp, P] run once, filling a KV cache of P + S slots; each row's next S tokens run on its
    prefix's cache rows (cache slot = position, so a row's tokens overwrite the prefix width's tail past its
    own prefix, and attention masks slots past each query). Gradients reach the prefix through the cache.
    """
    model = Transformer(cfg)
    B, L = tokens.shape
    P, S = prefix.width, prefix.suffix
    head = jnp.pad(tokens, ((0, 0), (0, max(P - L, 0))))[prefix.source_row, :P]  # [Gp, P]
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), head.shape)
    head_hidden, cache = model.apply({"params": params}, head, positions, init_cache(cfg, head.shape[0], P + S))
    start = prefix.length[prefix.of_row]  # [B]
    cols = start[:, None] + jnp.arange(S, dtype=jnp.int32)  # [B, S] each row's positions after its prefix
    tail = jnp.take_along_axis(tokens, jnp.minimum(cols, L - 1), axis=1)  # past L: no loss, any token
    rows_cache = jax.tree.map(lambda x: jnp.take(x, prefix.of_row, axis=0), cache)
    tail_hidden, _ = model.apply({"params": params}, tail, cols, rows_cache)  # [B, S, D]
    last = head_hidden[prefix.of_row, start - 1]  # [B, D]: the prefix's last state predicts the first tail token
    hidden = jnp.concatenate([last[:, None], tail_hidden[:, :-1]], axis=1)  # [B, S, D]
    logp, entropy = _head_logprobs(params, cfg, hidden, tail, temperature)
    rows = jnp.arange(B)[:, None]
    place = lambda x: jnp.zeros((B, L), jnp.float32).at[rows, cols].set(x, mode="drop")  # noqa: E731
    return place(logp), place(entropy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def vocab_token_logprobs(hidden, w_vocab, tokens, temperature, compute_dtype):
    """The LM head's log-probability of each token and the entropy, at temperature T, with a hand-written
    gradient: hidden [..., D], w_vocab [V, D], tokens [...] int -> (log p(token), entropy) [...] in float32.

    Autodiff of log_softmax + take_along_axis materialised several [N, V] arrays and a scatter in the
    backward pass; here it is one [N, V] pass, dz = (onehot(token) - p) g / T, and the two products with dz.
    The entropy is returned without a gradient (its cotangent is ignored): the learner only reports it;
    so is the temperature (a scalar, Python or traced).
    """
    return _vocab_token_logprobs_fwd(hidden, w_vocab, tokens, temperature, compute_dtype)[0]


def _vocab_token_logprobs_fwd(hidden, w_vocab, tokens, temperature, compute_dtype):
    z = vocab_logits(hidden, w_vocab, compute_dtype) / temperature  # [..., V] f32
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - m)
    total = jnp.sum(e, axis=-1)
    lse = m[..., 0] + jnp.log(total)
    w_tokens = jnp.take(w_vocab, tokens, axis=0).astype(compute_dtype)  # [..., D]: z at the token, without reading z
    z_token = jnp.sum(hidden.astype(jnp.float32) * w_tokens.astype(jnp.float32), axis=-1) / temperature
    entropy = lse - jnp.sum(e * z, axis=-1) / total  # the same pass over z as the normaliser
    return (z_token - lse, entropy), (hidden, w_vocab, tokens, temperature, z, lse)


def _vocab_token_logprobs_bwd(compute_dtype, residuals, cotangents):
    hidden, w_vocab, tokens, temperature, z, lse = residuals
    g_logp, _ = cotangents
    onehot = jnp.arange(z.shape[-1]) == tokens[..., None]
    dz = ((onehot - jnp.exp(z - lse[..., None])) * (g_logp / temperature)[..., None]).astype(compute_dtype)  # [..., V]
    d_hidden = jnp.einsum("...V,VD->...D", dz, w_vocab.astype(compute_dtype), preferred_element_type=jnp.float32)
    d_w = jnp.einsum("...V,...D->VD", dz, hidden.astype(compute_dtype), preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_w.astype(w_vocab.dtype), None, None


vocab_token_logprobs.defvjp(_vocab_token_logprobs_fwd, _vocab_token_logprobs_bwd)


def ppo_loss(logp, logp_prox, logp_behaviour, advantages, mask, settings: LearnerSettings, logp_ref=None):
    """The clipped, IS-corrected policy loss (see the module docstring). All token arrays [B,L]; advantages [B]."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ratio = jnp.exp(logp - logp_prox)
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp_prox - logp_behaviour), settings.is_cap))
    adv = advantages[:, None]
    clipped = jnp.clip(ratio, 1.0 - settings.clip_eps, 1.0 + settings.clip_eps)
    objective = jnp.minimum(ratio * adv, clipped * adv)
    loss = -jnp.sum(weight * objective * mask) / n
    metrics = {
        "policy_loss": loss,
        "clip_fraction": jnp.sum((jnp.abs(ratio - 1.0) > settings.clip_eps) * mask) / n,
        "is_weight": jnp.sum(weight * mask) / n,
        "behaviour_kl": jnp.sum((logp_behaviour - logp_prox) * mask) / n,  # KL(mu || pi_prox) estimate
    }
    if logp_ref is not None and settings.kl_coef > 0:
        delta = logp_ref - logp
        k3 = jnp.exp(delta) - delta - 1.0  # >= 0, unbiased for KL(pi || pi_ref) under pi samples
        kl = jnp.sum(k3 * mask) / n
        loss = loss + settings.kl_coef * kl
        metrics["kl_ref"] = kl
    return loss, metrics


@functools.partial(jax.jit, static_argnames=("cfg",))
def policy_logprobs(params, tokens, prefix: SharedPrefix | None = None, *, cfg: TransformerConfig,
                    temperature: float):
    """token_logprobs under jit, without gradients (for pi_prox and pi_ref)."""
    return token_logprobs(params, cfg, tokens, temperature, prefix)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "num_groups"), donate_argnums=(0,))
def learner_step(state: LearnerState, traj: Trajectories, logp_prox=None, logp_ref=None, *, cfg: TransformerConfig,
                 settings: LearnerSettings, num_groups: int):
    """One optimizer update on a batch: (state, traj, log pi_prox [B,L] or None, log pi_ref or None) -> (state, metrics).

    logp_prox None: pi_prox is the policy being updated (one update per batch, as `rl.loop` runs), its
    log-probs the step's own forward under stop_gradient, so no second forward pass is spent on them.
    """
    advantages = grpo_advantages(traj.rewards, traj.group_ids, num_groups)

    def loss_fn(params):
        logp, entropy = token_logprobs(params, cfg, traj.tokens, settings.temperature, traj.prefix)
        prox = jax.lax.stop_gradient(logp) if logp_prox is None else logp_prox
        loss, metrics = ppo_loss(logp, prox, traj.behaviour_logprobs, advantages, traj.loss_mask, settings, logp_ref)
        mask = traj.loss_mask.astype(jnp.float32)
        metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = settings.optimizer().update(grads, state.opt_state, state.params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   advantage_abs=jnp.mean(jnp.abs(advantages)))
    return LearnerState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics
