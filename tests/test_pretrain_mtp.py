"""Stage 1 end to end on a tiny random trunk: self-distilled shards, rows and masks, the grain iterator,
training (the heads learn, an interrupted run resumes with identical losses, the hidden cache is only a
speed-up, a NaN stops the run naming its step), eval-acceptance's report, checkpoints and export.

All training runs share one StepSettings (same loss, schedule and shapes), so the train step compiles once.
"""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax import data as data_lib
from bebop_jax import eval_acceptance, pretrain_mtp, trunk_cache
from bebop_jax.checkpoint import RunCheckpoints, export_hf_with_mtp, load_mtp_heads, save_heads_file
from bebop_jax.cli import _PRETRAIN_FLAGS, _config_from_args, build_parser
from bebop_jax.config import ConfigError, load_config
from bebop_jax.distributed import Preempted
from bebop_jax.losses import draft_loss
from bebop_jax.model import LoadedModel, load_model
from bebop_jax.model.mtp import MTPConfig, vocab_matrix
from bebop_jax.model.weights import WeightsError
from bebop_jax.model.transformer import Transformer, TransformerConfig, init_params

TINY = TransformerConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
NEW_TOKENS, STEPS = 20, 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, base dir): a trunk with peaked next-token distributions (embedding scaled up) and its own
    samples, 48 training and 16 held-out sequences of random prompts + 20 sampled tokens."""
    # the seed matters: 40 steps take alpha_1 on held-out rows from ~0 to 0.06-0.35 across random trunks
    params = init_params(TINY, jax.random.key(2))
    params["embedding"] = params["embedding"] * 60.0  # logits of std ~4: entropies of a few nats and below
    model = LoadedModel(TINY, params, None, "tiny")
    base = tmp_path_factory.mktemp("stage1")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 64, rng.integers(4, 11)).tolist() for _ in range(64)]
    kw = dict(temperature=1.0, max_new_tokens=NEW_TOKENS, batch_size=32, max_seq_len=128, eos_ids=())
    data_lib.sample_shards(model, prompts[:16], str(base / "data/heldout"), jax.random.key(1), **kw)
    data_lib.sample_shards(model, prompts[16:], str(base / "data/train"), jax.random.key(2), **kw)
    return model, base, prompts


def _cfg(base, run, *overrides):
    return load_config(None, [
        f"data.dir={base / 'data'}", f"pretrain.cache_dir={base / 'cache'}", f"pretrain.run_dir={base / run}",
        f"pretrain.steps={STEPS}", "pretrain.batch_size=4", "pretrain.seq_len=32", "pretrain.pack=false",
        "pretrain.learning_rate=0.003", "pretrain.warmup_steps=4", "pretrain.checkpoint_every=10",
        "pretrain.log_every=10", "pretrain.init=random", "pretrain.loss=e2e_tv",
        "eval.temperatures=[1.0, 0.5]", "eval.entropy_buckets=4", *overrides])


@pytest.fixture(scope="module")
def full_run(tiny):
    model, base, _ = tiny
    return pretrain_mtp.train(_cfg(base, "full"), model, progress=False)


def test_sample_shards_hold_prompt_and_completion(tiny):
    model, base, prompts = tiny
    seqs = data_lib.read_shards(str(base / "data/train"))
    assert len(seqs) == 48
    by_length = sorted(prompts[16:], key=len)  # batches take the prompts shortest first (stable)
    for tokens, prompt_len, prompt in zip(seqs.tokens, seqs.prompt_lengths, by_length):
        assert prompt_len == len(prompt) and tokens[:prompt_len].tolist() == prompt
        assert len(tokens) == prompt_len + NEW_TOKENS and tokens.min() >= 0
    mtime = os.path.getmtime(base / "data/train/shard_00000.npz")
    again = data_lib.sample_shards(model, prompts[16:], str(base / "data/train"), jax.random.key(9), temperature=1.0,
                                   max_new_tokens=NEW_TOKENS, batch_size=32, max_seq_len=128, eos_ids=())
    assert os.path.getmtime(base / "data/train/shard_00000.npz") == mtime  # kept, not resampled
    assert [t.tolist() for t in again.tokens] == [t.tolist() for t in seqs.tokens]


def test_extra_data_dirs_join_both_splits_and_a_changed_set_is_not_resumed(tiny, tmp_path):
    model, base, prompts = tiny
    extra = tmp_path / "extra"
    kw = dict(temperature=1.0, max_new_tokens=NEW_TOKENS, batch_size=32, max_seq_len=128, eos_ids=())
    data_lib.sample_shards(model, prompts[:8], str(extra / "heldout"), jax.random.key(3), **kw)
    data_lib.sample_shards(model, prompts[8:20], str(extra / "train"), jax.random.key(4), **kw)
    cfg = _cfg(base, "extra", f"data.extra_dirs=[{extra}]", "pretrain.steps=0")
    own, more = data_lib.read_shards(str(base / "data/train")), data_lib.read_shards(str(extra / "train"))
    train = data_lib.read_split(cfg.data, "train")
    assert [t.tolist() for t in train.tokens] == [t.tolist() for t in own.tokens + more.tokens]
    assert train.prompt_lengths.tolist() == own.prompt_lengths.tolist() + more.prompt_lengths.tolist()
    assert len(data_lib.read_split(cfg.data, "heldout")) == 16 + 8
    with pytest.raises(ConfigError, match="data.extra_dirs"):
        _cfg(base, "extra", f"data.extra_dirs=[{base / 'data'}]")
    pretrain_mtp.train(_cfg(base, "extra", "pretrain.steps=0"), model, progress=False)  # data.dir alone
    caches = sorted(os.listdir(base / "cache"))
    with pytest.raises(ValueError, match="data.extra_dirs"):
        pretrain_mtp.train(cfg, model, progress=False)
    assert sorted(os.listdir(base / "cache")) == caches  # refused before computing a cache of the new rows


def test_layout_rows_padding_and_packing():
    seqs = data_lib.Sequences([np.arange(1, 6), np.arange(10, 13), np.arange(20, 30), np.arange(30, 34)],
                              np.array([2, 1, 9, 4]))  # the last one is all prompt: always dropped
    padded = data_lib.layout_rows(seqs, 8, pack=False)  # the third's completion lies past 8: dropped too
    assert padded.tokens.shape == (2, 8)
    np.testing.assert_array_equal(padded.tokens[0], [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(padded.positions[0], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(padded.segment_ids[0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(padded.completion[0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(padded.completion[1], [0, 1, 1, 0, 0, 0, 0, 0])
    cut = data_lib.layout_rows(seqs, 4, pack=False)
    np.testing.assert_array_equal(cut.tokens[0], [1, 2, 3, 4])  # cut to seq_len
    packed = data_lib.layout_rows(seqs, 10, pack=True)  # first-fit decreasing: [20..29] | [1..5, 10..12]
    assert packed.tokens.shape == (2, 10)
    np.testing.assert_array_equal(packed.tokens[1], [1, 2, 3, 4, 5, 10, 11, 12, 0, 0])
    np.testing.assert_array_equal(packed.positions[1], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(packed.segment_ids[1], [1, 1, 1, 1, 1, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(packed.completion[1], [0, 0, 1, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(packed.completion[0], [0] * 9 + [1])
    # packed segments never see each other's targets: origin 3 of segment 1 (x_5 = token 10) is masked
    masks = np.asarray(data_lib.loss_masks(packed.completion, packed.segment_ids, 2))
    np.testing.assert_array_equal(np.flatnonzero(masks[0, 1]), [0, 1, 2, 5])
    assert data_lib.max_loss_origins(packed, 2, multiple=1) == 4


def test_iterator_resumes_exactly_and_reshuffles_each_epoch():
    rows = data_lib.layout_rows(data_lib.Sequences([np.arange(i, i + 4) for i in range(10)], np.ones(10, int)), 4, False)
    it = data_lib.row_iterator(data_lib.RowSource(rows), batch_size=2, seed=3)
    epoch1 = [next(it)["tokens"][:, 0] for _ in range(5)]
    state = it.get_state()
    after = [next(it)["tokens"][:, 0] for _ in range(5)]
    assert sorted(np.concatenate(epoch1).tolist()) == list(range(10))  # every row once per epoch
    assert sorted(np.concatenate(after).tolist()) == list(range(10))
    assert np.concatenate(epoch1).tolist() != np.concatenate(after).tolist()  # a new order
    resumed = data_lib.row_iterator(data_lib.RowSource(rows), batch_size=2, seed=3)
    resumed.set_state(state)
    for want in after:
        np.testing.assert_array_equal(next(resumed)["tokens"][:, 0], want)
    with pytest.raises(ValueError, match="batch_size=16"):
        data_lib.row_iterator(data_lib.RowSource(rows), batch_size=16, seed=0)


def test_read_corpus_txt_and_jsonl(tmp_path):
    class CharTokenizer:
        eos_token_ids = (1,)

        def encode(self, text):
            return [ord(c) % 50 + 2 for c in text]

    (tmp_path / "c.txt").write_text("abcdefgh\n\nxyz\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "abcdefgh"}) + "\n" + json.dumps({"text": "xyz"}) + "\n")
    for name in ("c.txt", "c.jsonl"):
        seqs = data_lib.read_corpus(str(tmp_path / name), CharTokenizer(), max_len=5)
        assert [len(t) for t in seqs.tokens] == [5, 4, 4]  # 'abcdefgh'+EOS in pieces of 5; 'xyz'+EOS
        assert seqs.tokens[1][-1] == 1 and not seqs.prompt_lengths.any()


def test_heads_reach_higher_acceptance_than_at_init(tiny, full_run):
    model, base, _ = tiny
    mtp = MTPConfig(3, 1)
    heldout = data_lib.read_shards(str(base / "data/heldout"))
    init = pretrain_mtp.init_heads(model, mtp, "random", jax.random.key(0))
    temps = (1.0, 0.5)  # as in _cfg: test_eval_acceptance_report reuses the compiled scoring
    before = eval_acceptance.evaluate(model, mtp, init, heldout, temps, 4, 4)["results"][0]
    after = eval_acceptance.evaluate(model, mtp, load_mtp_heads(str(base / "full"))[1], heldout, temps, 4, 4)
    after = after["results"][0]
    assert after["alpha"][0] > before["alpha"][0] + 0.1, (before["alpha"], after["alpha"])
    assert after["expected_length"] > before["expected_length"] + 0.2
    losses = [h["loss"] for h in full_run["history"]]
    assert len(losses) == STEPS and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05


def test_interrupted_run_resumes_with_identical_losses(tiny, full_run, monkeypatch):
    model, base, _ = tiny
    cfg = _cfg(base, "interrupted")
    check = pretrain_mtp._check_finite

    def interrupt_at_25(loss, step):
        if step == 25:
            raise KeyboardInterrupt
        check(loss, step)

    monkeypatch.setattr(pretrain_mtp, "_check_finite", interrupt_at_25)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mtp.train(cfg, model, progress=False)
    monkeypatch.setattr(pretrain_mtp, "_check_finite", check)
    assert RunCheckpoints(str(base / "interrupted")).latest_step() == 20
    resumed = pretrain_mtp.train(cfg, model, progress=False)
    assert resumed["resumed_from"] == 20
    want = [h for h in full_run["history"] if h["step"] > 20]
    assert resumed["history"] == want  # bit-exact: same floats, same steps
    got_params = load_mtp_heads(str(base / "interrupted"))[1]
    want_params = load_mtp_heads(str(base / "full"))[1]
    jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
    with pytest.raises(ValueError, match="pretrain.loss"):
        pretrain_mtp.train(_cfg(base, "interrupted", "pretrain.loss=ce"), model, progress=False)


def test_sigterm_checkpoints_the_step_and_the_run_resumes(tiny, full_run, monkeypatch):
    """A SIGTERM at step 23 (between checkpoints) saves step 23 and raises Preempted; running again finishes."""
    model, base, _ = tiny
    cfg = _cfg(base, "preempted")
    check, previous = pretrain_mtp._check_finite, signal.getsignal(signal.SIGTERM)

    def preempt_at_23(loss, step):
        if step == 23:
            os.kill(os.getpid(), signal.SIGTERM)
        check(loss, step)

    monkeypatch.setattr(pretrain_mtp, "_check_finite", preempt_at_23)
    with pytest.raises(Preempted) as stopped:
        pretrain_mtp.train(cfg, model, progress=False)
    monkeypatch.setattr(pretrain_mtp, "_check_finite", check)
    assert stopped.value.step == 23 and stopped.value.exit_code == 143
    assert RunCheckpoints(str(base / "preempted")).latest_step() == 23
    assert not (base / "preempted" / "summary.json").exists()  # an unfinished run leaves no summary
    assert signal.getsignal(signal.SIGTERM) == previous  # the guard put the previous handler back
    resumed = pretrain_mtp.train(cfg, model, progress=False)
    assert resumed["resumed_from"] == 23
    assert resumed["history"] == [h for h in full_run["history"] if h["step"] > 23]


def test_hidden_cache_off_gives_the_same_run(tiny, full_run):
    model, base, _ = tiny
    uncached = pretrain_mtp.train(_cfg(base, "uncached", "pretrain.cache_hidden=false"), model, progress=False)
    np.testing.assert_allclose([h["loss"] for h in uncached["history"]],
                               [h["loss"] for h in full_run["history"]], rtol=1e-4, atol=1e-6)
    assert len(os.listdir(base / "cache")) == 1  # one cache file, made by the cached run


def test_hidden_cache_resumes_an_interrupted_computation(tiny, tmp_path, monkeypatch):
    """Rows run in batches cut to their filled length; a computation stopped after batch 20 of 24 resumes
    from the last count written (batch 16) and ends with the states of whole rows (zero past the fill)."""
    model, base, _ = tiny
    rows = data_lib.layout_rows(data_lib.read_shards(str(base / "data/train")), 32, False)
    batches = trunk_cache.length_batches(rows, 2, multiple=8)
    assert len(batches) == 24 and {L for _, L in batches} > {32}  # some batches are cut
    real, calls = trunk_cache.trunk_hidden, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 21:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trunk_cache, "trunk_hidden", stopping)
    with pytest.raises(KeyboardInterrupt):
        trunk_cache.hidden_cache(model, rows, str(tmp_path), batch_size=2, fingerprint="f", multiple=8)
    calls.clear()
    hidden = np.asarray(trunk_cache.hidden_cache(model, rows, str(tmp_path), batch_size=2, fingerprint="f", multiple=8))
    assert len(calls) == 8 and os.listdir(tmp_path) == ["hidden_f.npy"]
    whole = np.asarray(real(model.params, rows.tokens, rows.positions, rows.segment_ids, cfg=model.cfg))
    filled = rows.segment_ids > 0
    np.testing.assert_allclose(hidden[filled].astype(np.float32), whole[filled].astype(np.float32), atol=2e-2)
    assert not hidden[~filled].astype(np.float32).any()


def test_draft_subvocabulary_run_learns_saves_its_ids_and_continues(tiny):
    """Heads trained on the 24 most frequent completion ids: the ids travel with the heads, eval-acceptance
    scores q on them against the full p exactly as training does, and a continued run keeps them."""
    model, base, _ = tiny
    sub = ("pretrain.draft_vocab=24", f"pretrain.cache_dir={base / 'cache_sub'}", "pretrain.steps=20")
    summary = pretrain_mtp.train(_cfg(base, "sub", *sub), model, progress=False)
    assert summary["draft_vocab"] == 24
    mtp, heads, ids = load_mtp_heads(str(base / "sub"))
    rows = data_lib.layout_rows(data_lib.read_shards(str(base / "data/train")), 32, False)
    counts = np.bincount(rows.tokens[rows.completion], minlength=64)
    assert len(ids) == 24 and counts[ids].min() >= np.delete(counts, ids).max()  # the most frequent ids
    assert sorted(os.listdir(base / "cache_sub"))[1].startswith("logz_")  # hidden_*.npy, logz_*.npy

    heldout = data_lib.read_shards(str(base / "data/heldout"))
    init = pretrain_mtp.init_heads(model, mtp, "random", jax.random.key(0))
    before = eval_acceptance.evaluate(model, mtp, init, heldout, (1.0, 0.5), 4, 4, ids)["results"][0]
    report = eval_acceptance.evaluate(model, mtp, heads, heldout, (1.0, 0.5), 4, 4, ids)
    assert report["draft_vocab"] == 24
    assert report["results"][0]["alpha"][0] > before["alpha"][0] + 0.05, (before["alpha"], report["results"][0])
    # the report's alpha is the training metric's alpha (f32 trunk states, full-vocabulary normaliser)
    rows = data_lib.layout_rows(heldout, 64, pack=False)
    batch = {n: getattr(rows, n) for n in ("tokens", "positions", "segment_ids", "completion")}
    index, num_origins = pretrain_mtp.vocab_index(ids, 64), data_lib.max_loss_origins(rows, 3)

    @jax.jit
    def training_metrics(trunk, heads, batch):
        batch["hidden"], _ = Transformer(TINY).apply({"params": trunk}, batch["tokens"],
                                                                  batch["positions"], None, batch["segment_ids"])
        w = vocab_matrix(TINY, trunk)
        batch["target_logz"] = trunk_cache.full_logz(batch["hidden"], w, temperature=1.0)
        inputs = pretrain_mtp.draft_inputs(TINY, mtp, heads, trunk["embedding"], batch, num_origins, index)
        return draft_loss("tv", *inputs[:4], w[ids], 1.0, target_logz=inputs[4])[1]

    metrics = training_metrics(model.params, heads, batch)
    np.testing.assert_allclose(report["results"][0]["alpha"], np.asarray(metrics["alpha"]), rtol=1e-4)

    # continue from the trained heads with another loss: same ids; with another draft_vocab the heads' layers
    # carry over and the ids are the new size's most frequent (0: the full vocabulary)
    pretrain_mtp.train(_cfg(base, "sub_ce", *sub, f"pretrain.init={base / 'sub'}", "pretrain.loss=ce",
                            "pretrain.steps=2"), model, progress=False)
    np.testing.assert_array_equal(load_mtp_heads(str(base / "sub_ce")).draft_ids, ids)
    for size in (40, 0):
        run = f"sub_{size}"
        pretrain_mtp.train(_cfg(base, run, f"pretrain.draft_vocab={size}", "pretrain.steps=1",
                                f"pretrain.init={base / 'sub'}", "pretrain.learning_rate=1e-12",
                                f"pretrain.cache_dir={base / ('cache_' + run)}"), model, progress=False)
        _, moved, new_ids = load_mtp_heads(str(base / run))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), moved, heads)  # the layers carry over
        if size:
            assert len(new_ids) == size and counts[new_ids].min() >= np.delete(counts, new_ids).max()
        else:
            assert new_ids is None
    with pytest.raises(ValueError, match="expected trunk, random or trained heads"):
        pretrain_mtp.train(_cfg(base, "nowhere", f"pretrain.init={base / 'missing'}"), model, progress=False)


def test_nan_loss_stops_naming_the_step(tiny, monkeypatch):
    """A NaN in the cached hidden states of one row: the run stops at the first step whose batch holds it."""
    model, base, _ = tiny
    cfg = _cfg(base, "nan")
    rows = data_lib.layout_rows(data_lib.read_shards(str(base / "data/train")), 32, False)
    bad_row = 5
    it = data_lib.row_iterator(data_lib.RowSource(rows), 4, cfg.pretrain.seed)
    first = next(s for s in range(1, STEPS + 1)
                 if (next(it)["tokens"] == rows.tokens[bad_row]).all(axis=1).any())
    real_cache = trunk_cache.hidden_cache

    def cache_with_nan(*args, **kwargs):
        hidden = np.array(real_cache(*args, **kwargs))
        hidden[bad_row, 3] = np.nan
        return hidden

    monkeypatch.setattr(trunk_cache, "hidden_cache", cache_with_nan)
    with pytest.raises(FloatingPointError, match=f"nan at step {first};"):
        pretrain_mtp.train(cfg, model, progress=False)
    latest = RunCheckpoints(str(base / "nan")).latest_step()
    assert first > 1 and (latest is None or latest < first)


def test_eval_acceptance_report(tiny, full_run):
    model, base, _ = tiny
    out = base / "report/acc.json"
    report = eval_acceptance.run(_cfg(base, "full"), str(base / "full"), str(out), model=model)
    assert json.loads(out.read_text()) == report
    png = (base / "report/acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert [r["temperature"] for r in report["results"]] == [1.0, 0.5]
    for res in report["results"]:
        assert len(res["alpha"]) == 3 and all(0 < a < 1 for a in res["alpha"])
        assert 1.0 < res["expected_length"] < 4.0
        for head, n in zip(res["heads"], report["num_origins"]):
            assert set(head["fit"]) == {"slope", "intercept", "r2"} and 0 <= head["fit"]["r2"] <= 1
            assert sum(b["count"] for b in head["buckets"]) == n
    # the report's alpha is the training metric's alpha (same origins, f32 trunk hidden states)
    seqs = data_lib.read_shards(str(base / "data/heldout"))
    rows = data_lib.layout_rows(seqs, 64, pack=False)
    mtp, heads, _ = load_mtp_heads(str(base / "full"))
    batch = {n: getattr(rows, n) for n in ("tokens", "positions", "segment_ids", "completion")}
    num_origins = data_lib.max_loss_origins(rows, 3)

    @jax.jit
    def training_metrics(trunk, heads, batch):
        batch["hidden"], _ = Transformer(TINY).apply({"params": trunk}, batch["tokens"],
                                                                  batch["positions"], None, batch["segment_ids"])
        h_d, h_t, targets, masks, _ = pretrain_mtp.draft_inputs(TINY, mtp, heads, trunk["embedding"], batch,
                                                                num_origins)
        return draft_loss("tv", h_d, h_t, targets, masks, vocab_matrix(TINY, trunk), 1.0)[1]

    metrics = training_metrics(model.params, heads, batch)
    np.testing.assert_allclose(report["results"][0]["alpha"], np.asarray(metrics["alpha"]), rtol=1e-4)
    np.testing.assert_allclose(report["results"][0]["expected_length"], float(metrics["expected_length"]), rtol=1e-4)


def test_eval_report_path_defaults_never_write_into_the_package(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert eval_acceptance.default_report_path(str(run_dir)) == str(run_dir / "acceptance.json")
    assert eval_acceptance.default_report_path("out/heads.safetensors") == "out/heads.acceptance.json"
    shipped = eval_acceptance.default_report_path("smollm2-135m-instruct-e2e-tv")  # was ./smollm2-135m-.../
    assert shipped == os.path.join("runs", "eval-acceptance", "smollm2-135m-instruct-e2e-tv", "acceptance.json")


def test_checkpoint_keys_and_export_roundtrip(tiny, full_run, tmp_path):
    model, base, _ = tiny
    ckpt = RunCheckpoints(str(tmp_path / "k"))
    state = {"key": jax.random.split(jax.random.key(7), 2), "x": jnp.arange(3.0)}
    ckpt.save(1, state, None, {"what": "test"})
    ckpt.close()
    restored, meta = RunCheckpoints(str(tmp_path / "k")).restore(1, state)
    assert meta == {"what": "test", "weight_layout": "out_in"}
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(jax.random.uniform(restored["key"][1]), jax.random.uniform(state["key"][1]))

    mtp, heads, ids = load_mtp_heads(str(base / "full"))
    assert ids is None  # trained on the full vocabulary
    export_hf_with_mtp(model, mtp, heads, str(tmp_path / "hf"), draft_ids=np.array([0, 3, 5]))
    mtp2, heads2, ids2 = load_mtp_heads(str(tmp_path / "hf"))
    assert mtp2 == mtp == MTPConfig(3, 1)
    np.testing.assert_array_equal(ids2, [0, 3, 5])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), heads, heads2)
    trunk = load_model(str(tmp_path / "hf"))  # the trunk loader passes over the mtp.* tensors
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), trunk.params, model.params)


def test_heads_file_roundtrip_and_refusals(tiny, full_run, tmp_path):
    model, base, _ = tiny
    mtp, heads, _ = load_mtp_heads(str(base / "full"), TINY)
    path = str(tmp_path / "heads.safetensors")
    save_heads_file(path, TINY, mtp, heads, np.array([1, 4, 9]), model="tiny")
    mtp2, heads2, ids2 = load_mtp_heads(path, TINY)
    assert mtp2 == mtp
    np.testing.assert_array_equal(ids2, [1, 4, 9])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), heads, heads2)  # bf16
    wider = dataclasses.replace(TINY, hidden_size=48, vocab_size=80)
    with pytest.raises(WeightsError, match=r"hidden_size: heads 32, model 48.*vocab_size|vocab_size: heads 64, model 80"):
        load_mtp_heads(path, wider)
    save_heads_file(path, TINY, mtp, heads, np.array([1, 4, 70]), model="tiny")
    with pytest.raises(WeightsError, match="outside the model's vocabulary of 64"):
        load_mtp_heads(path, TINY)
    with open(path, "r+b") as f:  # a truncated download
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_mtp_heads(path, TINY)
    with pytest.raises(WeightsError, match=r"block.*expected|missing"):  # a run's heads for another width
        load_mtp_heads(str(base / "full"), dataclasses.replace(TINY, intermediate_size=64))


def test_heads_of_an_in_out_layout_run_load_converted_and_the_run_refuses_to_resume(tiny, full_run, tmp_path):
    """A run directory written before matrices moved to [out, in]: its heads load as today's params; resuming fails."""
    import orbax.checkpoint as ocp

    _, base, _ = tiny
    mtp, heads, _ = load_mtp_heads(str(base / "full"), TINY)
    to_old = {"wq": (2, 0, 1), "wk": (2, 0, 1), "wv": (2, 0, 1), "wo": (1, 2, 0), "gate": (1, 0), "up": (1, 0),
              "down": (1, 0), "fc": (1, 0)}  # the inverse of checkpoint._FROM_IN_OUT
    old = jax.tree_util.tree_map_with_path(
        lambda p, x: np.transpose(x, to_old[p[-1].key]) if p[-1].key in to_old else x, heads)
    assert old["layers_0"]["fc"].shape == (64, 32) and heads["layers_0"]["fc"].shape == (32, 64)
    ckpt = RunCheckpoints(str(tmp_path / "old"))
    meta = {"mtp": dataclasses.asdict(mtp)}  # no weight_layout: an old run
    ckpt.manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": old}),
                                                 meta=ocp.args.JsonSave(meta)))
    ckpt.close()
    _, converted, _ = load_mtp_heads(str(tmp_path / "old"), TINY)
    jax.tree.map(np.testing.assert_array_equal, converted, heads)
    with pytest.raises(WeightsError, match=r"\[in, out\] weight matrices.*cannot be resumed"):
        RunCheckpoints(str(tmp_path / "old")).restore(5, {"params": heads})


def test_cli_flags_map_onto_config_keys():
    args = build_parser().parse_args(["pretrain-mtp", "--loss", "ce", "--no-cache-hidden", "--learning-rate", "1e-05",
                                      "--steps", "7", "pretrain.seq_len=64"])
    pc = _config_from_args(args, _PRETRAIN_FLAGS).pretrain
    assert (pc.loss, pc.cache_hidden, pc.learning_rate, pc.steps, pc.seq_len) == ("ce", False, 1e-5, 7, 64)
