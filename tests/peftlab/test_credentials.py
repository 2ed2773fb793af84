"""What needs no server: credentials on disk, error messages, argument parsing, start-up."""

import json
import stat
import subprocess
import sys

import pytest

from peftlab import cli
from peftlab.client import ConfigError, config_path, error_message, load_config, save_config


@pytest.fixture
def no_env(monkeypatch):
    for name in ("PEFTLAB_CONFIG", "PEFTLAB_URL", "PEFTLAB_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_saved_config_is_private_and_read_back(tmp_path, monkeypatch, no_env):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = save_config("http://lab.example:8000/", "plt_secret")
    assert path == tmp_path / "xdg" / "peftlab" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"url": "http://lab.example:8000", "token": "plt_secret"}
    assert load_config() == ("http://lab.example:8000", "plt_secret")
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left


def test_environment_overrides_the_file(tmp_path, monkeypatch, no_env):
    monkeypatch.setenv("PEFTLAB_CONFIG", str(tmp_path / "c.json"))
    save_config("http://saved", "plt_saved")
    monkeypatch.setenv("PEFTLAB_TOKEN", "plt_env")
    assert load_config() == ("http://saved", "plt_env")
    monkeypatch.setenv("PEFTLAB_URL", "http://env")
    assert load_config() == ("http://env", "plt_env")


def test_default_path_is_under_home(tmp_path, monkeypatch, no_env):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path() == tmp_path / ".config" / "peftlab" / "config.json"


def test_missing_credentials_say_to_log_in(tmp_path, monkeypatch, no_env, capsys):
    monkeypatch.setenv("PEFTLAB_CONFIG", str(tmp_path / "none.json"))
    with pytest.raises(ConfigError, match="peftlab login"):
        load_config()
    assert cli.main(["runs", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error: no PEFT Lab credentials") and "Traceback" not in err


def test_unreadable_config_is_a_clear_error(tmp_path, monkeypatch, no_env):
    broken = tmp_path / "c.json"
    broken.write_text("{not json")
    monkeypatch.setenv("PEFTLAB_CONFIG", str(broken))
    with pytest.raises(ConfigError, match="c.json"):
        load_config()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"detail": "Not found."}, "Not found."),
        (
            {"method_config": {"r": ["Ensure this value is >= 1."]}},
            "method_config.r: Ensure this value is >= 1.",
        ),
        ({"method_config.r": ["Too small."]}, "method_config.r: Too small."),
        ({"name": ["Required."], "steps": ["Bad."]}, "name: Required.; steps: Bad."),
        ({"non_field_errors": ["Pick one."]}, "Pick one."),
        (["Plain list."], "Plain list."),
        ({"points": [{}, {"step": ["Bad."]}]}, "points.1.step: Bad."),
    ],
)
def test_error_bodies_read_as_one_line(body, message):
    assert error_message(body) == message


@pytest.mark.parametrize(
    ("raw", "value"),
    [("8", 8), ("0.05", 0.05), ("true", True), ("null", None), ('"8"', "8"),
     ("all-linear", "all-linear"), ("q_proj,v_proj", "q_proj,v_proj"), ('["q", "v"]', '["q", "v"]'),
     ("NaN", "NaN"), ('{"a": 1}', '{"a": 1}')],
)  # fmt: skip
def test_set_values_are_json_scalars_or_strings(raw, value):
    assert cli.parse_value(raw) == value


def test_grid_values_split_on_commas():
    assert cli._parse_grid("lora.r=4, 8,16") == ("lora.r", [4, 8, 16])
    with pytest.raises(cli.UsageError, match="METHOD.FIELD"):
        cli._parse_grid("r=4,8")


def test_bad_set_is_a_usage_error(no_env, capsys):
    code = cli.main(["runs", "launch", "--model", "m", "--dataset", "1", "--method", "lora",
                     "--set", "r"])  # fmt: skip
    assert code == 2
    assert "--set expects FIELD=VALUE" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("login", "runs", "sweep", "train", "models", "datasets"):
        assert f"\n    {command} " in out


def test_remote_commands_and_the_sdk_start_without_torch_or_django():
    code = "import sys, peftlab, peftlab.cli; peftlab.init; "
    code += "print(sorted({'torch', 'django'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
