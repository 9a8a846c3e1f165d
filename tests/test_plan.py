"""`bebop plan`: the per-device bytes it counts against a hand count of the architectures, the CLI end to
end on a tiny model (in a subprocess that re-executes itself with 8 fake devices), and its errors."""

import json
import os
import subprocess
import sys

import pytest

from bebop_jax import cli, plan
from bebop_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


def hand_count(hf: dict) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of a Qwen3 trunk, from its config.json numbers."""
    V, D, F, L = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    N, K, H = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    attention = D * N * H * 2 + D * K * H * 2  # wq, wo; wk, wv
    matrices = L * (attention + 3 * D * F) + V * D * (1 if hf["tie_word_embeddings"] else 2)
    norms = L * (2 * D + 2 * H) + D  # attn / mlp norms, q / k norms per layer; the final norm
    return matrices, norms


@pytest.mark.parametrize("config, billions", [("qwen3-8b-v5p-64", 8.19), ("qwen3-32b-v5p-128", 32.76)])
def test_parameter_and_optimizer_bytes_per_device_match_a_hand_count(config, billions):
    cfg = load_config(os.path.join(REPO, "configs", f"{config}.yaml"))
    matrices, norms = hand_count(plan.KNOWN_MODELS[cfg.plan.model])
    assert (matrices + norms) / 1e9 == pytest.approx(billions, abs=0.005)  # Qwen's model cards: 8.2B, 32.8B
    shards = cfg.mesh.fsdp * cfg.mesh.tensor
    assert cfg.mesh.data * shards == cfg.plan.devices
    counted = plan.counted_bytes(cfg, "learner")
    # every matrix is split over fsdp x tensor (float32), the norm scales are replicated
    assert counted["params"] == matrices * 4 // shards + norms * 4
    assert 0 <= counted["optimizer"] - 2 * counted["params"] < 64  # AdamW's mu and nu, and a step count
    assert counted["kv_cache"] == 0


def test_kv_cache_bytes_per_device_match_a_hand_count():
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"))
    hf, rl, k = plan.KNOWN_MODELS["qwen3-8b"], cfg.rl, cfg.speculative.num_draft
    slots = -(-(rl.max_prompt_tokens + rl.max_new_tokens + k + 2) // 64) * 64
    rows = rl.prompts_per_step * rl.group_size // (cfg.plan.devices // cfg.mesh.tensor)  # the actor: data x tensor
    per_layer = 2 * rows * slots * (hf["num_key_value_heads"] // cfg.mesh.tensor) * hf["head_dim"] * 2  # k, v in bf16
    counted = plan.counted_bytes(cfg, "decode")
    assert counted["kv_cache"] == (hf["num_hidden_layers"] + cfg.mtp.num_layers) * per_layer
    learner = plan.counted_bytes(cfg, "learner")["params"]  # f32 master weights over fsdp x tensor
    fsdp = cfg.mesh.fsdp  # the actor's bf16 weights (+ heads) are over tensor only
    assert counted["optimizer"] == 0 and learner * fsdp / 2 < counted["params"] < learner * fsdp


TINY_HF = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def test_cli_plans_a_tiny_model_on_8_fake_devices(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    overrides = [f"plan.model={tmp_path}", "plan.devices=8", "plan.hbm_gib=0.01", "plan.compile_layers=[1, 2]",
                 "plan.steps=[learner, decode]", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "rl.prompts_per_step=2",
                 "rl.group_size=4", "rl.max_prompt_tokens=40", "rl.max_new_tokens=24", "mtp.num_steps=2",
                 "speculative.num_draft=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # it must re-exec
    proc = subprocess.run([sys.executable, "-m", "bebop_jax.cli", "plan", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "on 8 devices (data=2 x fsdp=2 x tensor=2)" in out and "MiB per device" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("learner ", "decode "))}
    assert set(rows) == {"learner", "decode"}
    cfg = load_config(None, overrides)
    for name, row in rows.items():
        numbers = [float(x) for x in row if x.replace(".", "", 1).isdigit() and "." in x]
        params, optimizer, kv_cache, io, temporaries, per_layer, total = numbers
        counted = plan.counted_bytes(cfg, name)
        assert params == pytest.approx(counted["params"] / MIB, abs=0.005)
        assert optimizer == pytest.approx(counted["optimizer"] / MIB, abs=0.005)
        assert kv_cache == pytest.approx(counted["kv_cache"] / MIB, abs=0.005)
        # the compiled (and extrapolated) arguments are the counted ones plus the small batch
        assert 0 <= io < 0.01 and temporaries > 0 and per_layer >= 0
        assert total == pytest.approx(params + optimizer + kv_cache + io + temporaries, abs=0.02)
        assert "FITS" in row and row[-3:-1] == ["2", "layers"]
    assert "extrapolated linearly to 3" in out


def test_extrapolated_sizes_never_fall_below_the_deeper_compile(monkeypatch):
    """A size that shrinks between the two compiled depths (the TPU compiler's buffer assignment is not
    exactly linear) is reported at the deeper compile's figure, not extrapolated below it (or below zero)."""
    by_depth = {1: dict(temporaries=3 * MIB, flops=1e9, bytes_accessed=2e9),
                2: dict(temporaries=2 * MIB, flops=2e9, bytes_accessed=3e9)}

    def fake_compile(step, mesh, rules, lower_on=None):
        depth = sum(k.startswith("layers_") for k in step.args[0])  # args[0]: the trunk's parameters
        return dict(by_depth[depth], arguments=0, outputs=0, aliased=0, pallas=0.0, seconds=0.0)

    monkeypatch.setattr(plan, "compile_step", fake_compile)
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"), ["plan.compile_layers=[1, 2]"])
    mesh, rules = plan.plan_mesh(cfg, plan.architecture("qwen3-8b"), None, "prefill")
    p = plan.plan_step(cfg, "prefill", mesh, rules)
    assert p.temporaries == 2 * MIB  # not 3 - 35 = -32 MiB
    assert p.flops == pytest.approx(36e9) and p.bytes_accessed == pytest.approx(37e9)  # growing sizes: linear


def test_unknown_model_and_bad_settings_are_named_before_any_work():
    with pytest.raises(SystemExit, match=r"plan.model.*'qwen9-1t'.*qwen3-8b, qwen3-14b"):
        cli.main(["plan", "plan.model=qwen9-1t"])
    with pytest.raises(SystemExit, match="mesh data=1 x fsdp=8 x tensor=4 needs 32 devices, but 64"):
        cli.main(["plan", "--config", os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"), "--devices", "64"])
    with pytest.raises(SystemExit, match="speculative.num_draft.*mtp.num_steps=2"):
        cli.main(["plan", "mtp.num_steps=2", "speculative.num_draft=3"])
