"""One process of tests/test_multihost.py's `bebop pretrain-mtp` check:
`python -m tests.multihost_pretrain_worker PROCESS_ID NUM_PROCESSES PORT BASE_DIR`.

Each process has 2 CPU devices (XLA_FLAGS, set by the test); together they form an (fsdp=2, tensor=2)
mesh, fsdp across the processes. Every process runs the command line (`cli.main`, which starts
jax.distributed before any JAX work) three times on the tiny trunk in {BASE_DIR}/model with a 24-id
draft vocabulary, data and caches in BASE_DIR: a cached run interrupted after computing step
INTERRUPT_AT's loss, the same run resumed from its last checkpoint, and a run without the hidden
cache. It writes each run's (step, loss) pairs, and how often it ran the trunk and the log-normalisers for
the caches, as JSON.
"""

from __future__ import annotations

import json
import os
import sys

from bebop_jax import cli, pretrain_mtp, trunk_cache  # imported before jax.distributed starts: importing must not start JAX
from bebop_jax.model.transformer import TransformerConfig

# One trunk layer; the widths, 4 q / 2 KV heads, MLP, vocabulary and the 24-id draft vocabulary divide 2.
# Tied embeddings, scaled up by the test: peaked p, so the TV losses have gradients (a near-uniform p
# puts less mass than q on every draft id, and alpha = sum min(p, q) is then flat in the heads).
CFG = TransformerConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, qk_norm=True, tie_word_embeddings=True,
                        max_position_embeddings=64)
STEPS, INTERRUPT_AT = 4, 3


def overrides(base: str, run: str, cache: str = "cache") -> list[str]:
    """The run's config keys; the one-device reference in the test uses them too."""
    return [f"model.source={base}/model", f"data.dir={base}/data", f"pretrain.cache_dir={base}/{cache}",
            f"pretrain.run_dir={base}/{run}", f"pretrain.steps={STEPS}", "pretrain.batch_size=8",
            "pretrain.seq_len=16", "pretrain.pack=false", "pretrain.learning_rate=0.01", "pretrain.warmup_steps=0",
            "pretrain.checkpoint_every=2", "pretrain.log_every=2", "pretrain.init=trunk", "pretrain.draft_vocab=24",
            "mtp.num_steps=2", "mtp.num_layers=1"]


def main(process_id: str, num_processes: str, port: str, base: str) -> None:
    mesh = [f"mesh.coordinator_address=127.0.0.1:{port}", f"mesh.num_processes={num_processes}",
            f"mesh.process_id={process_id}", "mesh.fsdp=2", "mesh.tensor=2"]
    train, check_finite, trunk_hidden = pretrain_mtp.train, pretrain_mtp._check_finite, trunk_cache.trunk_hidden
    full_logz = trunk_cache.full_logz
    losses, summaries, trunk_calls, logz_calls = [], [], [0], [0]

    def recorded_train(cfg):
        summary = train(cfg, progress=False)
        summaries.append(dict(summary))  # the command drops the history
        return summary

    def interrupt(loss, step):
        losses.append([step, loss])
        check_finite(loss, step)
        if step == INTERRUPT_AT:
            raise KeyboardInterrupt

    def counted_trunk_hidden(*args, **kwargs):
        trunk_calls[0] += 1
        return trunk_hidden(*args, **kwargs)

    def counted_full_logz(*args, **kwargs):
        logz_calls[0] += 1
        return full_logz(*args, **kwargs)

    pretrain_mtp.train, trunk_cache.trunk_hidden = recorded_train, counted_trunk_hidden
    trunk_cache.full_logz = counted_full_logz
    pretrain_mtp._check_finite = interrupt
    try:
        cli.main(["pretrain-mtp", *overrides(base, "run"), *mesh])
    except KeyboardInterrupt:
        pass
    pretrain_mtp._check_finite = check_finite
    cli.main(["pretrain-mtp", *overrides(base, "run"), *mesh])
    cache_calls = {"trunk": trunk_calls[0], "logz": logz_calls[0]}
    cli.main(["pretrain-mtp", *overrides(base, "uncached"), "pretrain.cache_hidden=false", *mesh])
    resumed, uncached = summaries
    result = {"interrupted": losses, "resumed_from": resumed["resumed_from"],
              "resumed": [[h["step"], h["loss"]] for h in resumed["history"]],
              "uncached": [[h["step"], h["loss"]] for h in uncached["history"]],
              "cache_calls": cache_calls}
    with open(os.path.join(base, f"process{process_id}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
