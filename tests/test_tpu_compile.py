"""TPU programs compiled by the TPU compiler (libtpu) for compile-only devices, on this CPU host.

Nothing here runs on a TPU: each test lowers and compiles, and checks what the compiler reports (that
it compiles at all, that the Pallas kernels are in the program, the bytes it moves). The kernels at
SmolLM2 / Qwen3-0.6B / Qwen3-8B widths on v5e, v5p and v6e; the four steps of a Qwen3-0.6B run (at one
layer: depth changes no kernel and no sharding) on a 2 x 2 fsdp x tensor mesh of each generation; the
plan's roofline bytes of a plain decode step against a hand count of its weights and KV cache.
Skipped, saying why, where libtpu is not installed (`pip install -e ".[tpu]"`; `make test` installs it).
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bebop_jax import plan, plan_tpu, tpu
from bebop_jax.config import ConfigError, load_config
from kernels_pallas import rejection_sampling as rs
from kernels_pallas import tv_loss as tv

pytestmark = [pytest.mark.tpu,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu (the TPU compiler) is not installed: pip install -e '.[tpu]'")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATIONS = {"v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}
WIDTHS = {"smollm2": (576, 49152), "qwen3-0.6b": (1024, 151936), "qwen3-8b": (4096, 151936)}


@pytest.fixture(scope="module", params=list(GENERATIONS))
def slice4(request):
    """(Accelerator, its 4 compile-only devices) of one generation."""
    acc = tpu.accelerator(GENERATIONS[request.param])
    return acc, tpu.compile_only_devices(acc)


def _compile_on(device, fn, *args):
    with jax.default_device(device):
        lowered = jax.jit(fn).lower(*args)
    return lowered.compile()


def test_accelerator_types_parse_as_gcloud_spells_them():
    assert tpu.accelerator("v5p-64") == tpu.Accelerator("v5p-64", "v5p", 32, "v5p:2x4x4")
    assert tpu.accelerator("v5litepod-8").topology == "v5e:2x4"
    assert tpu.accelerator("v6e-256").chips == 256
    for bad in ("v5p-63", "v5p-7", "v4-8", "tpu", "v6e-3"):
        with pytest.raises(ValueError, match=r"config key 'plan.accelerator': .*expected one of v5litepod-1, "):
            tpu.accelerator(bad)


def test_chip_figures_come_from_the_topology(slice4):
    acc, devices = slice4
    chip = tpu.chip_info(devices[0])
    hbm_gib = {"v5e": 16, "v5p": 95, "v6e": 32}[acc.generation]
    assert chip.kind == f"TPU {acc.generation}" and abs(chip.hbm_bytes / 2**30 - hbm_gib) < 1.5
    assert chip.bf16_flops_per_s > 1e14 and chip.hbm_bytes_per_s > 5e11


@pytest.mark.parametrize("width", list(WIDTHS))
def test_fused_acceptance_value_and_gradient_compile_at_model_widths(slice4, width):
    """Value + gradient in bf16 (and f32 at the widest), tiles sized from the chip's VMEM."""
    _, devices = slice4
    d, v = WIDTHS[width]
    dtypes = (jnp.bfloat16, jnp.float32) if width == "qwen3-8b" else (jnp.bfloat16,)
    for dtype in dtypes:
        h = jax.ShapeDtypeStruct((2048, d), dtype)
        w = jax.ShapeDtypeStruct((v, d), dtype)

        def value_and_grad(a, b, c):
            return jax.value_and_grad(lambda a: tv.fused_acceptance(a, b, c, implementation="pallas").sum())(a)

        compiled = _compile_on(devices[0], value_and_grad, h, h, w)
        assert compiled.as_text().count("tpu_custom_call") >= 3  # the three passes


def test_fused_acceptance_gradient_wrt_vocab_compiles_at_8192(slice4):
    _, devices = slice4
    h = jax.ShapeDtypeStruct((1024, 8192), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((151936, 8192), jnp.bfloat16)
    grad = jax.grad(lambda a, b, c: tv.fused_acceptance(a, b, c, implementation="pallas", grad_wrt_vocab=True).sum(),
                    argnums=(0, 2))
    assert "tpu_custom_call" in _compile_on(devices[0], grad, h, h, w).as_text()


def test_tpu_tiles_fit_the_chips_vmem():
    vmem = 64 * 2**20 * 3 // 4  # v5p's budget
    for d, itemsize in ((576, 2), (4096, 2), (8192, 2), (8192, 4)):
        bs = tv.tpu_block_sizes(4096, 151936, d, itemsize, vmem)
        assert tv._vmem_footprint(bs.block_n, bs.block_v, d, itemsize) <= vmem
        assert bs.block_n % 8 == 0 and bs.block_v % 128 == 0
    assert tv.tpu_block_sizes(4096, 151936, 576, 2, vmem) == tv.PALLAS_BLOCK_SIZES  # narrow: the largest tiles
    with pytest.raises(ValueError, match="no TPU tiles fit"):
        tv.tpu_block_sizes(4096, 151936, 1 << 20, 4, vmem)


@pytest.mark.parametrize("batch,num_draft", [(8, 1), (256, 4)])
def test_rejection_kernel_compiles_at_qwen_vocabulary(slice4, batch, num_draft):
    _, devices = slice4
    v = 151936
    args = (jax.ShapeDtypeStruct((batch, num_draft), jnp.int32), jax.ShapeDtypeStruct((batch, num_draft, v), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_draft + 1, v), jnp.float32))

    def sample(d, q, p):
        return rs.rejection_sample(d, q, p, jax.random.key(0), implementation="pallas", validate=False)

    assert "tpu_custom_call" in _compile_on(devices[0], sample, *args).as_text()


# ---------------------------------------------------------------------------------------------------
# The steps of a run, sharded over a 2 x 2 (fsdp x tensor) mesh of each generation

QWEN_06B_RUN = ["plan.model=qwen3-0.6b", "mesh.fsdp=2", "mesh.tensor=2", "rl.prompts_per_step=2", "rl.group_size=4",
                "rl.max_prompt_tokens=64", "rl.max_new_tokens=64", "speculative.num_draft=3", "pretrain.batch_size=4",
                "pretrain.seq_len=256", "plan.compile_layers=[]"]


@pytest.mark.parametrize("step", ["decode", "mtp", "learner", "prefill"])
def test_steps_compile_sharded_with_the_pallas_kernels(slice4, step):
    acc, devices = slice4
    # the heads' draft sub-vocabulary on one generation (training and drafting), the full vocabulary on the others
    draft_vocab = 4096 if step in ("mtp", "decode") and acc.generation == "v5p" else 0
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"),
                      QWEN_06B_RUN + [f"pretrain.draft_vocab={draft_vocab}"])
    model = dataclasses.replace(plan.architecture("qwen3-0.6b"), num_layers=1)
    mesh, rules = plan.plan_mesh(cfg, model, devices, step)  # learner's fsdp x tensor, or the actor's data x tensor
    sizes = plan.compile_step(plan.STEPS[step](cfg, model, plan.Shapes.from_config(cfg)), mesh, rules, devices[0])
    assert sizes["pallas"] == float(step in ("decode", "mtp"))
    assert sizes["flops"] > 0 and sizes["bytes_accessed"] > 0


def test_plain_decode_step_reads_bf16_weights_and_the_cache_in_place(slice4):
    """A plain decode step on the actor's mesh (data=2 x tensor=2): its weights are the bf16 ones counted by
    hand (the tied embedding read as the LM head), the program holds no f32 copy of the LM head and no
    transposed or copied KV cache (keys [B, K, H, S], values [B, K, S, H], written in place by their scatters), and the
    plan's bytes count those scatters by their updates."""
    acc, devices = slice4
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"),
                      QWEN_06B_RUN + ["rl.prompts_per_step=4", "rl.group_size=8"])
    hf = plan.KNOWN_MODELS["qwen3-0.6b"]
    model = dataclasses.replace(plan.architecture("qwen3-0.6b"), num_layers=2)
    mesh, rules = plan.plan_mesh(cfg, model, devices, "decode")
    shapes = dataclasses.replace(plan.Shapes.from_config(cfg), num_draft=0)
    step = plan.build_decode(cfg, model, shapes)
    d, v, ff, h = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"], hf["head_dim"]
    n, k = hf["num_attention_heads"], hf["num_key_value_heads"]
    matrices = v * d + 2 * (d * n * h * 2 + d * k * h * 2 + 3 * d * ff)  # embedding; q, o, k, v, gate/up/down
    norms = 2 * (2 * d + 2 * h) + d  # two per block, q/k norms, the final one: replicated
    assert plan.per_device_bytes(step.counted["params"][0], mesh, rules) == 2 * matrices // 2 + 2 * norms  # bf16
    compiled = plan.compile_program(step, mesh, rules, devices[0])
    hlo = compiled.as_text()
    assert f"f32[{v // 2},{d}]" not in hlo  # the LM head is read in bf16, never converted
    rows_k = f"{shapes.rollout_rows // 2},{k // 2}"
    caches = (f"[{rows_k},{h},{shapes.cache_len}]", f"[{rows_k},{shapes.cache_len},{h}]")  # KVCache k, v
    copies = [line for line in hlo.splitlines() if any(c in line.split("=")[-1].split("(")[0] for c in caches)
              and any(f" {op}(" in line for op in ("copy", "transpose"))]
    assert not copies, copies[:2]
    # The roofline's bytes: HBM traffic by the compiled program's layouts (weights prefetched into VMEM
    # counted once, at their copy; KV-cache writes by their updates), against a hand count.
    traffic = plan.hbm_traffic(hlo)
    trunk_cache = 2 * 2 * (shapes.rollout_rows // 2) * (k // 2) * shapes.cache_len * h * 2  # k, v x 2 layers, bf16
    assert traffic["scatter"] <= 0.02 * trunk_cache  # never the whole cache (some generations scatter in VMEM)
    assert traffic["prefetch"] > 0  # the compiler prefetches weights into VMEM here
    floor = plan.read_floor(step, model, 0, mesh, rules)  # no heads, no heads' cache: a plain step
    assert floor == 2 * matrices // 2 + 2 * norms + trunk_cache
    assert floor <= sum(traffic.values()) <= 1.3 * floor, (traffic, floor)
    cost = compiled.cost_analysis()
    assert (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"] > 1.5 * floor


def test_plan_reports_tpu_figures_and_bad_input_is_one_line(capsys, tmp_path):
    # a small Qwen3 (an HF config.json, as a user's own model is given): ten decode compiles of it take ~1 min
    tiny = dict(model_type="qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=128, vocab_size=8192, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=True, max_position_embeddings=4096)
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"),
                      QWEN_06B_RUN + [f"plan.model={tmp_path}", "plan.accelerator=v5p-8", "plan.compile_layers=[1, 2]",
                                      "plan.steps=[decode]"])
    plans, spec = plan_tpu.run(cfg)
    out = capsys.readouterr().out
    assert "TPU v5p" in out and "FITS" in out and "pallas" in out and "compile-time prediction" in out
    assert "extrapolated from 1 and 2 layers" in out and "plan.compile_layers=[]" in out  # the table's caveat
    assert [r.num_draft for r in spec] == [0, 1, 2, 3, 4] and plans[0].pallas
    assert spec[0].speedups(spec[0]) == [1.0, 1.0, 1.0]
    for overrides, message in [(["plan.accelerator=v5p-7"], "plan.accelerator.*expected one of"),
                               (["plan.accelerator=v5p-16"], r"config key 'mesh'.*needs 4 devices, but 8"),
                               (["plan.accelerator=v5litepod-4", "plan.model=qwen3-32b", "plan.steps=[learner]"],
                                r"plan.model.*qwen3-32b.*GiB per device on v5litepod-4")]:
        with pytest.raises(ConfigError, match=message):
            plan_tpu.run(load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"), QWEN_06B_RUN + overrides))


def test_cli_plan_without_libtpu_names_the_extra():
    """With libtpu hidden from the process: a one-line error naming the key and the install command."""
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'libtpu' else real(n, *a); "
            "from bebop_jax import cli; cli.main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "plan", "--config", "configs/qwen3-8b-v5p-64.yaml",
                           "--accelerator", "v5p-64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "plan.accelerator" in proc.stderr and "pip install -e '.[tpu]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_verify_step_relayouts_no_weight():
    """A K=3 verify step (4 positions a row through the trunk and the heads' layer) at Qwen3-8B's widths on a
    v5p-8 (fsdp 2 x tensor 2) reads each weight as stored: no instruction outside a fusion writes a weight-sized
    array (a relayout). Reshaping the attention output projection wo [D, N, H] to [D, N*H] was one: (8, 128)
    tiles over (N, H) are not tiles over (D, N*H), so the TPU copied wo in every layer of every multi-token step
    (+34 MB a layer; at Qwen3-0.6B's widths the compiler happened not to)."""
    devices = tpu.compile_only_devices(tpu.accelerator("v5p-8"))
    cfg = load_config(os.path.join(REPO, "configs", "qwen3-8b-v5p-64.yaml"), QWEN_06B_RUN + ["plan.model=qwen3-8b"])
    hf = plan.KNOWN_MODELS["qwen3-8b"]
    model = dataclasses.replace(plan.architecture("qwen3-8b"), num_layers=1)
    mesh, rules = plan.plan_mesh(cfg, model, devices, "decode")
    step = plan.build_decode(cfg, model, dataclasses.replace(plan.Shapes.from_config(cfg), num_draft=3))
    hlo = plan.compile_program(step, mesh, rules, devices[0]).as_text()
    wo_shard = hf["hidden_size"] * hf["num_attention_heads"] * hf["head_dim"] * 2 // 2  # bf16, over tensor = 2
    relayouts = [m for m in plan.hbm_instructions(hlo)
                 if m.op in ("copy", "reshape", "transpose") and m.bytes >= wo_shard]  # its write (read from VMEM)
    assert not relayouts, relayouts
