"""GRPO advantages, the clipped IS-corrected PPO loss (hand-computed cases), and the learner step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax.model.transformer import TransformerConfig, init_params
from bebop_jax.rl.learner import (LearnerSettings, Trajectories, bucket_length, grpo_advantages, init_learner,
                                  learner_step, policy_logprobs, ppo_loss, token_logprobs, trim_trajectories)


def test_grpo_advantages_by_hand():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0])
    groups = jnp.array([0, 0, 0, 0, 1, 1, 2])
    adv = np.asarray(grpo_advantages(rewards, groups, num_groups=3))
    std = np.std([1, 0, 0, 1], ddof=1)  # 0.57735
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / std, rtol=1e-5)
    np.testing.assert_allclose(adv[4:], 0.0, atol=1e-6)  # equal rewards and a singleton group carry no signal


def test_clipped_loss_by_hand():
    s = LearnerSettings(clip_eps=0.2, is_cap=2.0)
    # one sequence, three tokens: ratios 1.5 (clipped for A>0), 0.5 (clipped, A>0 -> min picks 0.5), 1.0
    logp = jnp.log(jnp.array([[0.6, 0.2, 0.3]]))
    prox = jnp.log(jnp.array([[0.4, 0.4, 0.3]]))
    behaviour = prox
    mask = jnp.array([[True, True, True]])
    loss, m = ppo_loss(logp, prox, behaviour, jnp.array([2.0]), mask, s)
    # A=2: min(1.5*2, 1.2*2)=2.4; min(0.5*2, 0.8*2)=1.0; min(1*2, 1*2)=2 -> mean 1.8
    np.testing.assert_allclose(float(loss), -(2.4 + 1.0 + 2.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_fraction"]), 2 / 3, rtol=1e-5)
    # negative advantage: min(1.5*-1, 1.2*-1) = -1.5; min(0.5*-1, 0.8*-1) = -0.8; -1
    loss, _ = ppo_loss(logp, prox, behaviour, jnp.array([-1.0]), mask, s)
    np.testing.assert_allclose(float(loss), (1.5 + 0.8 + 1.0) / 3, rtol=1e-5)


def test_truncated_importance_weight_and_mask():
    s = LearnerSettings(clip_eps=0.2, is_cap=2.0)
    logp = prox = jnp.log(jnp.array([[0.5, 0.5, 0.9]]))
    behaviour = jnp.log(jnp.array([[0.1, 0.5, 0.01]]))  # pi_prox/mu = 5 (capped at 2), 1, 90 (masked out)
    mask = jnp.array([[True, True, False]])
    loss, m = ppo_loss(logp, prox, behaviour, jnp.array([1.0]), mask, s)
    np.testing.assert_allclose(float(loss), -(2.0 * 1 + 1.0 * 1) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(m["is_weight"]), 1.5, rtol=1e-5)
    # the gradient at ratio 1 is the weighted policy gradient: d/dlogp = -w * A / n
    g = jax.grad(lambda lp: ppo_loss(lp, prox, behaviour, jnp.array([1.0]), mask, s)[0])(logp)
    np.testing.assert_allclose(np.asarray(g), [[-1.0, -0.5, 0.0]], rtol=1e-5)


def test_kl_to_reference_k3():
    s = LearnerSettings(kl_coef=0.5)
    logp = prox = behaviour = jnp.log(jnp.array([[0.5]]))
    ref = jnp.log(jnp.array([[0.25]]))
    loss, m = ppo_loss(logp, prox, behaviour, jnp.array([0.0]), jnp.array([[True]]), s, ref)
    delta = np.log(0.25) - np.log(0.5)
    np.testing.assert_allclose(float(m["kl_ref"]), np.exp(delta) - delta - 1, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.5 * (np.exp(delta) - delta - 1), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = TransformerConfig(family="llama", vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8)
    return cfg, init_params(cfg, jax.random.key(0))


def test_token_logprobs_match_direct_softmax(tiny):
    cfg, params = tiny
    tokens = jnp.array([[3, 5, 7, 9], [1, 2, 3, 4]])
    logp, ent = token_logprobs(params, cfg, tokens, temperature=0.7)
    from bebop_jax.model.transformer import Transformer

    m = Transformer(cfg)
    h, _ = m.apply({"params": params}, tokens, jnp.broadcast_to(jnp.arange(4), (2, 4)))
    ref = jax.nn.log_softmax(m.apply({"params": params}, h, method=Transformer.logits) / 0.7, axis=-1)
    np.testing.assert_allclose(np.asarray(logp[:, 1:]),
                               np.take_along_axis(np.asarray(ref[:, :-1]), np.asarray(tokens[:, 1:, None]), -1)[..., 0],
                               atol=1e-5)
    assert (np.asarray(logp[:, 0]) == 0).all() and (np.asarray(ent[:, 1:]) > 0).all()


def test_learner_step_raises_the_logprob_of_rewarded_completions(tiny):
    """Group of 2: the rewarded completion's log-prob rises after a few updates, the other's falls."""
    cfg, params = tiny
    tokens = jnp.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [0] * 6])
    mask = jnp.array([[False, False, False, True, True, True]] * 2 + [[False] * 6])
    settings = LearnerSettings(learning_rate=1e-2, temperature=1.0)
    logp0, _ = policy_logprobs(params, tokens, cfg=cfg, temperature=1.0)
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=jnp.where(mask, logp0, 0.0),
                        rewards=jnp.array([1.0, 0.0, 0.0]), group_ids=jnp.array([0, 0, 1]),
                        policy_version=jnp.zeros(3, jnp.int32))
    state = init_learner(jax.tree.map(jnp.copy, params), settings)
    for _ in range(5):
        prox, _ = policy_logprobs(state.params, tokens, cfg=cfg, temperature=1.0)
        state, metrics = learner_step(state, traj, prox, cfg=cfg, settings=settings, num_groups=2)
    logp1, _ = policy_logprobs(state.params, tokens, cfg=cfg, temperature=1.0)
    gain = np.asarray(jnp.sum((logp1 - logp0) * mask, axis=1))
    assert gain[0] > 0.1 and gain[1] < -0.1 and int(state.step) == 5
    assert np.isfinite(float(metrics["loss"]))


def test_learner_step_without_prox_logprobs_is_the_step_with_them(tiny):
    """logp_prox=None takes pi_prox from the step's own forward: the same update as a separate prox forward."""
    cfg, params = tiny
    tokens = jnp.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [2, 7, 1, 3, 3, 8]])
    mask = jnp.array([[False, False, True, True, True, True]] * 3)
    settings = LearnerSettings(learning_rate=1e-2, temperature=0.8)
    logp0, _ = policy_logprobs(params, tokens, cfg=cfg, temperature=0.8)
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=jnp.where(mask, logp0 - 0.1, 0.0),
                        rewards=jnp.array([1.0, 0.0, 0.5]), group_ids=jnp.array([0, 0, 0]),
                        policy_version=jnp.zeros(3, jnp.int32))
    out = [learner_step(init_learner(jax.tree.map(jnp.copy, params), settings), traj, prox, cfg=cfg,
                        settings=settings, num_groups=1) for prox in (logp0, None)]
    (with_prox, m1), (own, m2) = out
    # Adam divides by sqrt(nu): rounding-level differences in pi_prox move a parameter by << an update (1e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), with_prox.params, own.params)
    for name in ("loss", "behaviour_kl", "is_weight", "grad_norm"):
        np.testing.assert_allclose(float(m1[name]), float(m2[name]), rtol=1e-5, atol=1e-7)
    assert abs(float(m2["behaviour_kl"]) + 0.1) < 1e-5  # the step's own log-probs stand in for pi_prox


def test_bucket_lengths():
    assert [bucket_length(f, 128, 4) for f in (2, 32, 33, 64, 65, 97, 128)] == [32, 32, 64, 64, 96, 128, 128]
    assert [bucket_length(f, 100, 3) for f in (2, 35, 69, 99)] == [40, 40, 72, 100]  # rounded up to 8, capped at L
    assert bucket_length(2, 128, 1) == 128


def test_trimmed_batch_makes_the_same_update(tiny):
    """A batch cut to its filled length (trim_trajectories) gives the full batch's loss, metrics and new params."""
    cfg, params = tiny
    rng = np.random.default_rng(0)
    L, filled = 64, [20, 13, 9, 0]  # the last row: padding (no completion)
    tokens = np.zeros((4, L), np.int32)
    mask = np.zeros((4, L), bool)
    for r, n in enumerate(filled):
        tokens[r, :n] = rng.integers(1, 32, n)
        mask[r, 5:n] = n > 0
    logp0, _ = policy_logprobs(params, jnp.asarray(tokens), cfg=cfg, temperature=0.9)
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=np.where(mask, np.asarray(logp0) - 0.05, 0),
                        rewards=np.array([1.0, 0.0, 0.5, 0.0], np.float32), group_ids=np.array([0, 0, 0, 1]),
                        policy_version=np.zeros(4, np.int32))
    cut = trim_trajectories(traj, buckets=4)
    assert cut.tokens.shape == (4, 32) and trim_trajectories(traj, buckets=1).tokens.shape == (4, L)
    settings = LearnerSettings(learning_rate=1e-2, temperature=0.9)
    (full, m_full), (short, m_short) = [
        learner_step(init_learner(jax.tree.map(jnp.copy, params), settings), jax.tree.map(jnp.asarray, t), cfg=cfg,
                     settings=settings, num_groups=2) for t in (traj, cut)]
    for name in ("loss", "entropy", "is_weight", "grad_norm"):
        np.testing.assert_allclose(float(m_short[name]), float(m_full[name]), rtol=1e-5, atol=1e-7)
    # Adam divides by sqrt(nu): a rounding-level gradient difference moves a parameter by << an update (1e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), short.params, full.params)


@pytest.mark.parametrize("rows", [(70,), (5, 14)])
def test_vocab_token_logprobs_values_and_gradient_equal_autodiff_of_log_softmax(rows):
    """The hand-written LM-head gradient (learner.vocab_token_logprobs) is autodiff's, at T != 1, over flat
    rows (the CPU path: 70 rows take vocab_logits' plain dot) and over [B, L] rows (the TPU path)."""
    from bebop_jax.rl.learner import vocab_token_logprobs

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((*rows, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((50, 16)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 50, rows), jnp.int32)
    g = jnp.asarray(rng.standard_normal(rows), jnp.float32)

    def reference(h, w):
        logp_all = jax.nn.log_softmax(h @ w.T / 0.7, axis=-1)
        return (jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0],
                -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1))

    ours = vocab_token_logprobs(h, w, tokens, 0.7, jnp.float32)
    for a, b in zip(ours, reference(h, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    grad_ours = jax.grad(lambda h, w: jnp.sum(vocab_token_logprobs(h, w, tokens, 0.7, jnp.float32)[0] * g), (0, 1))(h, w)
    grad_ref = jax.grad(lambda h, w: jnp.sum(reference(h, w)[0] * g), (0, 1))(h, w)
    for a, b in zip(grad_ours, grad_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _grouped_batch(rng, prompts=(7, 11), group=3, L=40, vocab=32):
    """Rows of `group` completions per prompt (lengths 3..L-p), right-padded; one padding row in the last group."""
    rows, masks, groups = [], [], []
    for g, p in enumerate(prompts):
        prompt = rng.integers(1, vocab, p)
        for _ in range(group):
            n = int(rng.integers(3, L - p))
            row = np.zeros(L, np.int32)
            row[:p], row[p:p + n] = prompt, rng.integers(1, vocab, n)
            row[p] = prompt[0]  # a completion may begin like another row's: the prefix still ends at the prompt
            rows.append(row)
            masks.append((np.arange(L) >= p) & (np.arange(L) < p + n))
            groups.append(g)
    rows.append(np.zeros(L, np.int32))
    masks.append(np.zeros(L, bool))
    groups.append(len(prompts))
    return np.stack(rows), np.stack(masks), np.array(groups, np.int32)


def test_shared_prefixes_mark_each_groups_prompt():
    from bebop_jax.rl.learner import share_prefixes
    tokens, mask, groups = _grouped_batch(np.random.default_rng(1))
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=np.zeros(mask.shape, np.float32),
                        rewards=np.zeros(7, np.float32), group_ids=groups, policy_version=np.zeros(7, np.int32))
    pre = share_prefixes(traj, num_groups=3, buckets=4).prefix
    np.testing.assert_array_equal(pre.length, [7, 11, 1])  # the prompts; the padding group: one token
    np.testing.assert_array_equal(pre.source_row, [0, 3, 0])
    np.testing.assert_array_equal(pre.of_row, groups)
    assert pre.width == bucket_length(11, 40, 4) == 16
    ends = 40 - np.argmax(mask[:6, ::-1], axis=1)
    assert pre.suffix == bucket_length(int(np.max(ends - pre.length[groups[:6]])), 40, 4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_learner_step_is_the_full_forward_step(tiny, temperature):
    """Rows that share prompts give, with `share_prefixes`, the log-probs at every trained token, the loss, the
    metrics and the updated parameters of the forward over every full row (and of a reference forward)."""
    from bebop_jax.rl.learner import share_prefixes
    cfg, params = tiny
    tokens, mask, groups = _grouped_batch(np.random.default_rng(2))
    logp0, _ = policy_logprobs(params, jnp.asarray(tokens), cfg=cfg, temperature=temperature)
    traj = Trajectories(tokens=tokens, loss_mask=mask, behaviour_logprobs=np.where(mask, np.asarray(logp0) - 0.05, 0),
                        rewards=np.array([1, 0, 0.5, 0, 1, 1, 0], np.float32), group_ids=groups,
                        policy_version=np.zeros(7, np.int32))
    shared = share_prefixes(traj, num_groups=3, buckets=4)
    logp1, ent1 = policy_logprobs(params, jnp.asarray(tokens), shared.prefix, cfg=cfg, temperature=temperature)
    _, ent0 = policy_logprobs(params, jnp.asarray(tokens), cfg=cfg, temperature=temperature)
    np.testing.assert_allclose(np.where(mask, logp1, 0), np.where(mask, logp0, 0), atol=2e-5)
    np.testing.assert_allclose(np.where(mask, ent1, 0), np.where(mask, ent0, 0), atol=2e-5)
    settings = LearnerSettings(learning_rate=1e-2, temperature=temperature, kl_coef=0.1)
    ref = logp0 - 0.02  # a reference policy's log-probs (the loop takes them from policy_logprobs with the prefix)
    (full, m_full), (short, m_short) = [
        learner_step(init_learner(jax.tree.map(jnp.copy, params), settings), jax.tree.map(jnp.asarray, t), None,
                     ref, cfg=cfg, settings=settings, num_groups=3) for t in (traj, shared)]
    for name in ("loss", "entropy", "is_weight", "grad_norm", "kl_ref", "clip_fraction"):
        np.testing.assert_allclose(float(m_short[name]), float(m_full[name]), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), short.params, full.params)
