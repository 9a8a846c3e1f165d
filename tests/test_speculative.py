"""The speculative engine: exact output distribution, greedy equality, recorded log-probs and acceptance.

The exactness tests run the engine as users do (compaction on); tests about something else pass compact=False:
compaction compiles `decode` once per halved batch size, ~6 s each for these tiny models on 2 cores."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bebop_jax.generate import generate
from bebop_jax.model.mtp import MTPConfig, init_mtp_params, teacher_forced_hidden, vocab_matrix
from bebop_jax.model.transformer import Transformer, TransformerConfig, init_params
from bebop_jax.speculative import combine_rollouts, speculative_generate

PROMPT = [1, 2, 3]


def _tiny(vocab, scale, mtp_steps=2, mtp_layers=1, seed=0):
    """A tiny random trunk whose next-token entropy is ~1 nat (embedding scaled), and random heads."""
    cfg = TransformerConfig(family="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(cfg, jax.random.key(seed))
    params["embedding"] = params["embedding"] * scale
    mtp = MTPConfig(mtp_steps, mtp_layers)
    return cfg, params, mtp, init_mtp_params(cfg, mtp, jax.random.key(seed + 1))


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(cfg, params, seqs):
    m = Transformer(cfg)
    h, _ = m.apply({"params": params}, seqs, jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape))
    return m.apply({"params": params}, h, method=Transformer.logits), h


def _exact_sequence_probs(cfg, params, n, prompt=PROMPT, temperature=1.0):
    """P(x_1..x_n | prompt) at `temperature` for every continuation of length n: [V**n]."""
    conts = np.array(list(itertools.product(range(cfg.vocab_size), repeat=n)), np.int32)
    seqs = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], axis=1)
    logits, _ = _full_logits(cfg, params, jnp.asarray(seqs))
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    P = len(prompt)
    steps = [np.asarray(logp[np.arange(len(conts)), P - 1 + i, conts[:, i]]) for i in range(n)]
    return np.exp(np.sum(steps, axis=0))


def _large_sample(params, cfg, prompts, seed, chunks=4, **kw):
    """speculative_generate over `prompts` in `chunks` equal calls (keys seed, seed + 1, ...), pooled: one call of
    20000 rows peaks at ~7.5 GB here (two such tests on the two xdist workers at once ran near the 24 GB)."""
    size = len(prompts) // chunks
    return combine_rollouts([speculative_generate(params, cfg, prompts[i * size:(i + 1) * size],
                                                  jax.random.key(seed + i), **kw) for i in range(chunks)])


def _chisquare_pvalue(samples, probs):
    counts = np.bincount(samples, minlength=probs.size).astype(np.float64)
    expected = probs / probs.sum() * counts.sum()
    keep = expected >= 5
    obs, exp = counts[keep], expected[keep]
    if (~keep).any():
        obs, exp = np.append(obs, counts[~keep].sum()), np.append(exp, expected[~keep].sum())
    return stats.chisquare(obs, exp / exp.sum() * obs.sum()).pvalue


@pytest.mark.parametrize("mode", ["rejection", "greedy_draft", "block"])
def test_sequence_distribution_equals_plain_sampling(mode):
    """4-token continuations (V=6: 1296 sequences) of speculative decoding, K=2, fit the exact joint law."""
    cfg, params, mtp, mtp_params = _tiny(vocab=6, scale=5.0)
    n, rows = 4, 20000
    r = _large_sample(params, cfg, [PROMPT] * rows, 11, mtp_params=mtp_params, mtp_cfg=mtp, mode=mode, num_draft=2,
                      max_new_tokens=n, temperature=1.0)
    assert (r.num_tokens == n).all()
    assert r.metrics(2)["draft_acceptance_rate"] > 0.02  # the drafts do get accepted, so the verify path is exercised
    index = r.tokens @ (cfg.vocab_size ** np.arange(n - 1, -1, -1))
    assert _chisquare_pvalue(index, _exact_sequence_probs(cfg, params, n)) > 1e-3


def test_sequence_distribution_is_exact_at_t07_with_mixed_prompt_lengths():
    """One batch mixing a 3-token and a 7-token prompt, T=0.7, K=3: each prompt's 3-token continuations
    (V=6: 216 sequences) fit its own exact joint law, so padding, positions and per-row caches are right."""
    cfg, params, mtp, mtp_params = _tiny(vocab=6, scale=4.0, mtp_steps=3)
    long_prompt, n, rows = [5, 4, 0, 1, 2, 3, 4], 3, 8000
    r = _large_sample(params, cfg, [PROMPT, long_prompt] * rows, 3, mtp_params=mtp_params, mtp_cfg=mtp,
                      mode="rejection", num_draft=3, max_new_tokens=n, temperature=0.7)  # chunks of even size
    assert r.metrics(3)["draft_acceptance_rate"] > 0.02
    index = r.tokens @ (cfg.vocab_size ** np.arange(n - 1, -1, -1))
    for i, prompt in enumerate((PROMPT, long_prompt)):
        probs = _exact_sequence_probs(cfg, params, n, prompt, temperature=0.7)
        assert _chisquare_pvalue(index[i::2], probs) > 1e-3, prompt
    wrong = _exact_sequence_probs(cfg, params, n, PROMPT, temperature=0.7)  # the check tells the prompts apart
    assert _chisquare_pvalue(index[1::2], wrong) < 1e-3


def test_a_biased_engine_fails_the_same_check():
    """The check has power: plain sampling at T=0.8 is rejected as a sample of the T=1 law."""
    cfg, params, _, _ = _tiny(vocab=6, scale=5.0)
    r = _large_sample(params, cfg, [PROMPT] * 20000, 11, mode="none", max_new_tokens=4, temperature=0.8)
    index = r.tokens @ (cfg.vocab_size ** np.arange(3, -1, -1))
    assert _chisquare_pvalue(index, _exact_sequence_probs(cfg, params, 4)) < 1e-3


@pytest.mark.parametrize("mode", ["none", "rejection", "greedy_draft", "block"])
def test_temperature_zero_equals_plain_greedy(mode):
    cfg, params, mtp, mtp_params = _tiny(vocab=16, scale=3.0, mtp_steps=3)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [3] * 11]
    plain, _ = generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=20)
    r = speculative_generate(params, cfg, prompts, jax.random.key(5), mtp_params=mtp_params, mtp_cfg=mtp, mode=mode,
                             num_draft=3, max_new_tokens=20, temperature=0.0)
    np.testing.assert_array_equal(r.tokens, plain)


def test_recorded_logprobs_entropies_and_eos():
    cfg, params, mtp, mtp_params = _tiny(vocab=16, scale=3.0, mtp_steps=3)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    r = speculative_generate(params, cfg, prompts, jax.random.key(3), mtp_params=mtp_params, mtp_cfg=mtp,
                             mode="rejection", num_draft=3, max_new_tokens=24, temperature=1.0, eos_ids=(0,))
    for b, prompt in enumerate(prompts):
        n = int(r.num_tokens[b])
        completion = r.tokens[b, :n]
        assert (r.tokens[b, n:] == -1).all()
        assert 0 not in completion[:-1] and (n == 24 or completion[-1] == 0)  # stops at the first EOS
        logits, _ = _full_logits(cfg, params, jnp.asarray([prompt + completion.tolist()]))
        logp = jax.nn.log_softmax(logits[0, len(prompt) - 1: len(prompt) - 1 + n], axis=-1)
        np.testing.assert_allclose(r.logprobs[b, :n], np.asarray(logp[np.arange(n), completion]), atol=1e-4)
        entropy = -np.sum(np.exp(np.asarray(logp)) * np.asarray(logp), axis=-1)
        np.testing.assert_allclose(r.entropies[b, :n], entropy, atol=1e-4)


def test_measured_acceptance_matches_analytic_alpha():
    """K=1: the fraction of accepted drafts equals the mean teacher-forced alpha_1 at the visited origins."""
    cfg, params, mtp, mtp_params = _tiny(vocab=16, scale=3.0, mtp_steps=1)
    rows, n = 400, 16
    r = speculative_generate(params, cfg, [PROMPT] * rows, jax.random.key(7), mtp_params=mtp_params, mtp_cfg=mtp,
                             mode="rejection", num_draft=1, max_new_tokens=n, temperature=1.0, compact=False)
    seqs = np.concatenate([np.tile(PROMPT, (rows, 1)), r.tokens], axis=1)
    logits, hidden = _full_logits(cfg, params, jnp.asarray(seqs))
    emb = params["embedding"][seqs]
    positions = jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)
    (h1,) = teacher_forced_hidden(cfg, mtp, mtp_params, hidden, emb, positions)
    q = jax.nn.softmax(h1 @ vocab_matrix(cfg, params).T, axis=-1)  # q[t] drafts x_{t+2}
    p = jax.nn.softmax(logits, axis=-1)  # p[t] is the law of x_{t+1}
    alpha = np.asarray(jnp.sum(jnp.minimum(p[:, 1:], q[:, :-1]), axis=-1))  # alpha[t]: draft at origin t
    P, expected, steps = len(PROMPT), 0.0, 0
    for b in range(rows):
        emitted = 1  # the prefill's token
        for count in r.emitted_per_step[:, b]:
            if count == 0 or emitted >= n:
                break
            origin = P + emitted - 2  # newest token at position P + emitted - 1
            expected += alpha[b, origin]
            steps += 1
            emitted += count
    measured = r.accepted.sum() / steps
    assert steps == r.verify_steps.sum()
    se = np.sqrt(expected / steps * (1 - expected / steps) / steps)
    assert abs(measured - expected / steps) < 4 * se + 1e-3


def test_bad_arguments():
    cfg, params, mtp, mtp_params = _tiny(vocab=16, scale=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        speculative_generate(params, cfg, [PROMPT], jax.random.key(0), mode="sloppy")
    with pytest.raises(ValueError, match="needs MTP heads"):
        speculative_generate(params, cfg, [PROMPT], jax.random.key(0), mode="rejection")
    with pytest.raises(ValueError, match="num_draft must be in 1..2"):
        speculative_generate(params, cfg, [PROMPT], jax.random.key(0), mtp_params=mtp_params, mtp_cfg=mtp,
                             num_draft=3)


def test_draft_sub_vocabulary_stays_exact_and_greedy():
    """Drafting from a sub-vocabulary (q = 0 elsewhere) keeps T=0 output equal to plain greedy."""
    cfg, params, mtp, mtp_params = _tiny(vocab=16, scale=3.0, mtp_steps=3)
    from bebop_jax.speculative import frequent_tokens

    ids = frequent_tokens([np.array([3, 3, 3, 5, 5, 7, -1])], 16, size=4, always=(0,))
    np.testing.assert_array_equal(ids, [0, 3, 5, 7])
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    plain, _ = generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=12)
    r = speculative_generate(params, cfg, prompts, jax.random.key(5), mtp_params=mtp_params, mtp_cfg=mtp,
                             num_draft=3, max_new_tokens=12, temperature=0.0, draft_ids=np.arange(8))
    np.testing.assert_array_equal(r.tokens, plain)
    r = speculative_generate(params, cfg, [PROMPT] * 64, jax.random.key(5), mtp_params=mtp_params, mtp_cfg=mtp,
                             num_draft=3, max_new_tokens=8, temperature=1.0, draft_ids=np.arange(8), compact=False)
    assert (r.tokens[r.tokens >= 0] < 16).all() and r.metrics(3)["draft_acceptance_rate"] > 0


def test_rules_share_one_compile_and_each_runs_its_own_branch():
    """The verification rule is a traced switch: sweeping it compiles decode once; each rule's output differs."""
    from bebop_jax import speculative

    cfg, params, mtp, mtp_params = _tiny(vocab=16, scale=1.0, seed=3)
    run = lambda mode: speculative_generate(params, cfg, [PROMPT] * 32, jax.random.key(1), mtp_params=mtp_params,  # noqa: E731
                                            mtp_cfg=mtp, mode=mode, num_draft=2, max_new_tokens=8, temperature=1.0,
                                            compact=False)
    first = run("rejection")
    size = speculative.decode._cache_size()
    others = {mode: run(mode) for mode in ("greedy_draft", "block")}
    assert speculative.decode._cache_size() == size
    tokens = [first.tokens] + [r.tokens for r in others.values()]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(tokens, 2))


def test_combined_rollouts_pool_the_metrics_of_every_call():
    """Two calls' metrics pooled by combine_rollouts equal the metrics of the counts summed by hand."""
    cfg, params, mtp, mtp_params = _tiny(vocab=6, scale=5.0, mtp_steps=2)
    calls = [speculative_generate(params, cfg, [PROMPT] * b, jax.random.key(b), mtp_params=mtp_params, mtp_cfg=mtp,
                                  mode="rejection", num_draft=2, max_new_tokens=12, compact=False)  # one compile each
             for b in (16, 24)]
    assert all((r.accepted_at > 0).all() for r in calls)  # both calls accept at both positions: pooling shows
    both = combine_rollouts(calls)
    assert both.tokens.shape == (40, 12) and both.num_tokens.shape == both.verify_steps.shape == (40,)
    steps = sum(int(r.verify_steps.sum()) for r in calls)
    accepted = sum(int(r.accepted.sum()) for r in calls)
    m = both.metrics(2)
    assert m["draft_acceptance_rate"] == pytest.approx(accepted / (2 * steps))
    for i in range(2):
        assert m[f"draft_acceptance_rate_pos_{i}"] == pytest.approx(sum(int(r.accepted_at[i]) for r in calls) / steps)
    assert m["tokens_per_step"] == pytest.approx((40 * 12 - 40) / steps)


def test_acceptance_counts_only_drafts_emitted_before_each_row_ends():
    """At a near-infinite temperature p and q are both uniform, so every draft passes; a row with room for
    only 2 more tokens emits 2 of its 3 accepted drafts, and only those count (the old count was 3)."""
    cfg, params, mtp, heads = _tiny(16, 1.0, mtp_steps=3)
    out = speculative_generate(params, cfg, [PROMPT, PROMPT + [4]], jax.random.key(0), mtp_params=heads, mtp_cfg=mtp,
                               mode="rejection", num_draft=3, max_new_tokens=3, temperature=1e6)
    np.testing.assert_array_equal(out.num_tokens, [3, 3])
    np.testing.assert_array_equal(out.verify_steps, [1, 1])
    np.testing.assert_array_equal(out.accepted, [2, 2])  # emitted drafts only: the third lay past the end
    np.testing.assert_array_equal(out.accepted_at, [2, 2, 0])


def test_engine_mtp_states_equal_the_teacher_forced_ones():
    """The step-1 state that drafts the next token, after prefill and after a whole speculative run (drafts
    rejected and overwritten on the way), equals teacher forcing over the emitted sequence, as the heads are
    trained. Slot 0 of the MTP cache was attended though never written: 0.03 off on SmolLM2."""
    from bebop_jax import speculative
    from bebop_jax.batching import pad_prompts

    cfg, params, mtp, heads = _tiny(16, 3.0, mtp_steps=3, seed=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    tokens, lengths = pad_prompts(prompts)
    static = dict(cfg=cfg, mtp_cfg=mtp, num_draft=3, greedy=False, top_p=1.0, eos_ids=())
    T = jnp.float32(1.0)

    def teacher_h1(seq):
        seq = jnp.asarray([seq], jnp.int32)
        _, hidden = _full_logits(cfg, params, seq)
        positions = jnp.arange(seq.shape[1])[None]
        return teacher_forced_hidden(cfg, mtp, heads, hidden, params["embedding"][seq], positions)[0][0]

    state = speculative.prefill(params, heads, tokens, lengths, jax.random.key(0), T, max_new_tokens=12,
                                cache_len=32, **static)
    for b, prompt in enumerate(prompts):  # h^1 at origin P-1: E x_P (the first sampled token), h^0_{P-1}
        expected = teacher_h1(prompt + [int(state.tokens[b, 0])])[len(prompt) - 1]
        np.testing.assert_allclose(state.draft_hidden[b], expected, atol=1e-5)
    state = speculative.decode(params, heads, state, T, None, jnp.int32(0), **static)
    assert 0 < int(state.accepted.sum()) < int(state.verify_steps.sum()) * 3  # drafts both kept and rejected
    for b, prompt in enumerate(prompts):
        seq = prompt + np.asarray(state.tokens[b, :int(state.num_tokens[b])]).tolist()
        assert int(state.position[b]) == len(seq) - 1
        np.testing.assert_allclose(state.draft_hidden[b], teacher_h1(seq)[len(seq) - 2], atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "rejection"])
def test_a_row_with_its_own_key_is_the_same_in_any_batch(mode):
    """Per-sequence keys (fold_in of a sequence id): each row of a batch of 8 prompts of mixed lengths
    equals that prompt run alone with its key, token for token (the batch used to share one key)."""
    from bebop_jax.sampling import sequence_keys

    cfg, params, mtp, heads = _tiny(16, 2.0, mtp_steps=3, seed=5)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 16, n).tolist() for n in (3, 9, 5, 2, 7, 4, 11, 6)]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), 1000 + jnp.arange(8))
    kw = dict(mtp_params=heads, mtp_cfg=mtp, mode=mode, num_draft=3, max_new_tokens=12, temperature=1.0)
    batch = speculative_generate(params, cfg, prompts, keys, **kw)
    for b, prompt in enumerate(prompts):
        alone = speculative_generate(params, cfg, [prompt], keys[b:b + 1], **kw)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[b])
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[b], atol=1e-5)
    # one key stands for fold_in(key, row): the same as passing those keys
    again = speculative_generate(params, cfg, prompts, jax.random.key(3), **kw)
    np.testing.assert_array_equal(again.tokens, speculative_generate(params, cfg, prompts,
                                                                     sequence_keys(jax.random.key(3), 8), **kw).tokens)
    with pytest.raises(ValueError, match="one key or one per prompt"):
        speculative_generate(params, cfg, prompts, keys[:3], **kw)


@pytest.mark.parametrize("mode", ["none", "rejection"])
def test_finished_rows_are_dropped_and_every_sequence_stays_the_same(mode):
    """compact=True goes on with the unfinished rows of a batch of 8 in batches of 4 and 2 once half have
    ended (at EOS): every sequence, its log-probs and counts equal those of the uncompacted run."""
    from bebop_jax import speculative

    cfg, params, mtp, heads = _tiny(16, 2.0, mtp_steps=3, seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 16, n).tolist() for n in (3, 9, 5, 2, 7, 4, 11, 6)]
    kw = dict(mtp_params=heads, mtp_cfg=mtp, mode=mode, num_draft=3, max_new_tokens=24, temperature=1.0,
              eos_ids=(3,))
    full = speculative_generate(params, cfg, prompts, jax.random.key(7), compact=False, **kw)
    assert len(set(full.num_tokens.tolist())) > 3  # rows end at different lengths
    compiled = speculative.decode._cache_size()
    cut = speculative_generate(params, cfg, prompts, jax.random.key(7), **kw)
    assert speculative.decode._cache_size() >= compiled + 1  # it ran on a smaller batch
    for name in ("tokens", "num_tokens", "verify_steps", "accepted", "accepted_at", "emitted_per_step"):
        np.testing.assert_array_equal(getattr(cut, name), getattr(full, name), err_msg=name)
    np.testing.assert_allclose(cut.logprobs, full.logprobs, atol=1e-5)
    np.testing.assert_allclose(cut.entropies, full.entropies, atol=1e-5)


def test_plain_steps_with_heads_keep_the_draft_state_exact_and_sample_as_plain():
    """decode(speculate=False) on a state with heads takes plain steps (the tokens of mode 'none' with the
    same keys) whose MTP step-1 states equal teacher forcing, so speculation resumes from exact states."""
    from bebop_jax import speculative
    from bebop_jax.batching import pad_prompts

    cfg, params, mtp, heads = _tiny(16, 3.0, mtp_steps=3, seed=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    tokens, lengths = pad_prompts(prompts)
    T = jnp.float32(1.0)
    static = dict(cfg=cfg, mtp_cfg=mtp, num_draft=3, greedy=False, top_p=1.0, eos_ids=())
    state = speculative.prefill(params, heads, tokens, lengths, jax.random.key(0), T, max_new_tokens=12,
                                cache_len=32, **static)
    plain = speculative.prefill(params, None, tokens, lengths, jax.random.key(0), T, max_new_tokens=12,
                                cache_len=32, **dict(static, mtp_cfg=None, num_draft=0))
    state = speculative.decode(params, heads, state, T, None, jnp.int32(0), **static, speculate=False)
    plain = speculative.decode(params, None, plain, T, None, jnp.int32(0), **dict(static, mtp_cfg=None, num_draft=0))
    np.testing.assert_array_equal(state.tokens[:, :12], plain.tokens[:, :12])
    assert int(state.draft_steps.sum()) == 0 and (np.asarray(state.verify_steps) == 11).all()
    for b, prompt in enumerate(prompts):
        seq = prompt + np.asarray(state.tokens[b, :12]).tolist()
        seq_ = jnp.asarray([seq], jnp.int32)
        _, hidden = _full_logits(cfg, params, seq_)
        h1 = teacher_forced_hidden(cfg, mtp, heads, hidden, params["embedding"][seq_], jnp.arange(len(seq))[None])
        np.testing.assert_allclose(state.draft_hidden[b], h1[0][0][len(seq) - 2], atol=1e-5)


def test_max_rows_speculates_once_compaction_brings_the_batch_there():
    """max_rows=2 on 8 prompts: plain steps at 8 and 4 rows, drafts from 2 rows on; the acceptance metrics
    count the drafting steps only, and the first tokens of every row are those of plain decoding."""
    cfg, params, mtp, heads = _tiny(16, 2.0, mtp_steps=3, seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 16, n).tolist() for n in (3, 9, 5, 2, 7, 4, 11, 6)]
    kw = dict(mtp_params=heads, mtp_cfg=mtp, num_draft=3, max_new_tokens=24, temperature=1.0, eos_ids=(3,))
    plain = speculative_generate(params, cfg, prompts, jax.random.key(7), mode="none", **kw)
    capped = speculative_generate(params, cfg, prompts, jax.random.key(7), mode="rejection", max_rows=2, **kw)
    always = speculative_generate(params, cfg, prompts, jax.random.key(7), mode="rejection", **kw)
    drafted = capped.draft_steps.sum()
    assert 0 < drafted < capped.verify_steps.sum() and (always.draft_steps == always.verify_steps).all()
    # rows that ended while the batch had more than 2 rows never drafted: plain decoding, token for token
    early = np.flatnonzero(capped.draft_steps == 0)
    assert early.size >= 4
    np.testing.assert_array_equal(capped.tokens[early], plain.tokens[early])
    m = capped.metrics(3)
    np.testing.assert_allclose(m["draft_acceptance_rate"], capped.accepted.sum() / (3 * drafted))
    np.testing.assert_allclose(m["drafting_steps_fraction"], drafted / capped.verify_steps.sum())
    with pytest.raises(ValueError, match="max_rows must be >= 0"):
        speculative_generate(params, cfg, prompts, jax.random.key(7), mode="rejection", max_rows=-1, **kw)
