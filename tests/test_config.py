import pytest

from bebop_jax.config import Config, ConfigError, load_config, parse_override


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  source: /x\ngenerate:\n  temperature: 1\n  max_new_tokens: 8\n")
    cfg = load_config(f, ["generate.top_p=0.9", "generate.max_new_tokens=16"])
    assert isinstance(cfg, Config)
    assert cfg.model.source == "/x" and cfg.model.dtype == "float32"
    assert cfg.generate.temperature == 1.0 and isinstance(cfg.generate.temperature, float)
    assert cfg.generate.max_new_tokens == 16 and cfg.generate.top_p == 0.9
    with pytest.raises(Exception):
        cfg.model.source = "y"  # frozen


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["generate.temprature=0.5"])
    msg = str(e.value)
    assert "generate.temprature" in msg and "temperature" in msg and "max_new_tokens" in msg
    with pytest.raises(ConfigError, match="unknown config key 'nosuch'"):
        load_config(None, ["nosuch.x=1"])


@pytest.mark.parametrize("override,expected", [
    ("generate.max_new_tokens=abc", "expected int"),
    ("generate.max_new_tokens=1.5", "expected int"),
    ("generate.chat=3", "expected bool"),
    ("model.dtype=float16", "'float32' | 'bfloat16'"),
    ("generate=3", "expected a section"),
])
def test_wrong_type_names_key_and_type(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value) and expected in str(e.value)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("generate.temperature")


def test_shipped_configs_load():
    import glob

    files = sorted(glob.glob("configs/*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_rl_actor_devices_is_a_fraction_below_one():
    assert load_config(None, []).rl.actor_devices == 0.0  # actor and learner share all devices
    assert load_config(None, ["rl.actor_devices=0.25"]).rl.actor_devices == 0.25
    for bad in ("1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"'rl.actor_devices': expected a fraction in \[0, 1\)"):
            load_config(None, [f"rl.actor_devices={bad}"])


def test_held_out_evaluation_is_refused_without_a_split():
    with pytest.raises(ConfigError, match="rl.eval_tasks"):
        load_config(None, ["rl.environment=code", "rl.eval_tasks=4"])
    with pytest.raises(ConfigError, match="eval_every"):
        load_config(None, ["rl.eval_every=0"])
