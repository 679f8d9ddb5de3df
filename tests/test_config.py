"""Config system: presets load, overrides apply, and every kind of bad config is one clear exit-2 message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.schema import PRESETS_DIR, ConfigError, load

PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


def run_cli(*args: str, env_home: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if env_home is not None:
        import os

        env = {**os.environ, "LMFORGE_HOME": str(env_home)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_three_required_presets_exist():
    assert {p.stem for p in PRESETS} >= {"pipeline", "tiny", "gpu"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(preset):
    """Every value the preset file sets is the value the loaded config holds (nothing dropped or renamed)."""
    cfg = load(preset)
    assert cfg.name == preset.stem
    loaded = cfg.model_dump(mode="json")
    leaves = list(_leaves(yaml.safe_load(preset.read_text())))
    assert len(leaves) > 3
    for path, value in leaves:
        got = loaded
        for key in path:
            got = got[key]
        where = f"{preset.name}: {'.'.join(map(str, path))}"
        assert got == value, f"{where} is {got!r} after loading, the file says {value!r}"
    # Each preset starts with a comment giving the command that runs it (torchtune style).
    assert preset.read_text().startswith("#")


def _leaves(node, path=()):
    """(path, value) of every scalar in a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and any(isinstance(item, (dict, list)) for item in node):
        for index, item in enumerate(node):
            yield from _leaves(item, (*path, index))
    else:
        yield path, node


def test_preset_by_name_and_values_from_yaml():
    cfg = load("tiny")
    assert cfg.model.base == "tiny"
    assert cfg.model.tiny.num_hidden_layers == 2
    assert load("pipeline").model.base == "smollm2-135m"


def test_dotted_overrides_parse_yaml_values():
    cfg = load("tiny", ["sft.max_steps=7", "sft.target_modules=[q_proj, v_proj]", "sft.packing=true",
                        "model.tiny.seed=3", "serve.vllm_url=http://127.0.0.1:9000/v1"])
    assert cfg.sft.max_steps == 7
    assert cfg.sft.target_modules == ["q_proj", "v_proj"]
    assert cfg.sft.packing is True
    assert cfg.model.tiny.seed == 3
    assert cfg.serve.vllm_url == "http://127.0.0.1:9000/v1"


def test_lmforge_home_env_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "envhome"))
    assert load("tiny").home == (tmp_path / "envhome").resolve()
    assert load("tiny", [f"home={tmp_path / 'explicit'}"]).home == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("LMFORGE_HOME")
    assert load().home.is_absolute()


def test_fingerprint_tracks_content_not_location(tmp_path):
    a = load("tiny", [f"home={tmp_path / 'a'}"])
    b = load("tiny", [f"home={tmp_path / 'b'}"])
    assert a.fingerprint() == b.fingerprint()
    assert load("tiny", ["sft.max_steps=5"]).fingerprint() != a.fingerprint()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_field_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nsft:\n  max_steps: 3\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert f"{path}:4" in message
    assert "sft.lerning_rate" in message
    assert "unknown key" in message


def test_wrong_type_names_field_and_expected_type(tmp_path):
    path = _write(tmp_path, "sft:\n  max_steps: lots\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert "sft.max_steps" in message and "integer" in message and "'lots'" in message
    assert f"{path}:2" in message


def test_wrong_type_in_override_is_reported_as_the_override():
    with pytest.raises(ConfigError,
                       match=r"override 'model.dtype=int3': model\.dtype.*'float32', 'bfloat16' or 'float16'"):
        load("tiny", ["model.dtype=int3"])


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml \(presets: .*tiny"):
        load("nope.yaml")


@pytest.mark.parametrize("override", ["sft.max_steps", "=3", "sft..max_steps=2", "sft.max steps=1"])
def test_bad_override_syntax(override):
    with pytest.raises(ConfigError, match="bad override"):
        load("tiny", [override])


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="sft.max_steps is not a section"):
        load("tiny", ["sft.max_steps.x=1"])


def test_invalid_yaml_reports_line(tmp_path):
    path = _write(tmp_path, "sft:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load(path)


@pytest.mark.integration  # the CLI in a subprocess
@pytest.mark.parametrize(
    "args, expected",
    [
        (["-c", "{bad}"], "unknown key"),
        (["-c", "{bad}", "sft.max_steps=1"], "sft.lerning_rate"),
        (["-c", "missing.yaml"], "config file not found"),
        (["-c", "tiny", "sft.max_steps=-1"], "sft.max_steps: Input should be greater than or equal to 1"),
        (["-c", "tiny", "oops"], "bad override 'oops'"),
    ],
)
def test_cli_bad_config_exits_2_without_traceback(tmp_path, args, expected):
    bad = _write(tmp_path, "sft:\n  lerning_rate: 0.1\n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    for command in (["config", "show"], ["models", "import"]):
        result = run_cli(*command, *args, env_home=tmp_path / "home")
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    # Nothing was started: no state directory was created.
    assert not (tmp_path / "home").exists()


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_config_show_prints_resolved_yaml(tmp_path):
    result = run_cli("config", "show", "-c", "tiny", "sft.max_steps=9", env_home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    import yaml

    shown = yaml.safe_load(result.stdout)
    assert shown["sft"]["max_steps"] == 9
    assert set(shown) >= {"data", "model", "sft", "align", "quantize", "evaluate", "registry", "serve"}


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_without_config_uses_the_pipeline_preset(tmp_path):
    """`make run` calls `lmforge run` with no --config: it must get the preset sized for this machine."""
    import yaml

    from configs.schema import load

    shown = yaml.safe_load(run_cli("config", "show", env_home=tmp_path / "home").stdout)
    preset = load("pipeline")
    assert shown["name"] == "pipeline"
    assert shown["sft"]["max_steps"] == preset.sft.max_steps != load().sft.max_steps
    assert shown["align"]["stages"] == [s.model_dump(mode="json") for s in preset.align.stages]


@pytest.mark.integration  # the CLI in a subprocess
@pytest.mark.parametrize("command", [[], ["models"], ["models", "import"], ["models", "list"], ["config", "show"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout


@pytest.mark.integration  # the CLI in a subprocess
def test_unknown_option_is_a_usage_error():
    result = run_cli("models", "import", "--no-such-flag")
    assert result.returncode == 2
    assert "No such option" in result.stderr
