"""thoxd/__main__.py: the command line, up to (never including) starting the server."""

from __future__ import annotations

from pathlib import Path

import pytest

import thoxd.server
import thoxd.settings
from thoxd.__main__ import build_parser, main
from thoxd.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_settings_env")


@pytest.fixture(autouse=True)
def never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that got past validation by mistake fails instead of starting the daemon."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("main() went on to start the server")

    monkeypatch.setattr(thoxd.server, "serve", refuse)
    monkeypatch.setattr(thoxd.server, "configure_logging", refuse)


def test_invalid_port_returns_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("thoxd: invalid setting port: ")
    assert err.count("\n") == 1
    assert err.endswith("\n")


def test_invalid_setting_after_serve_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--slots", "0"]) == 2
    assert capsys.readouterr().err.startswith("thoxd: invalid setting slots: ")


def test_invalid_env_setting_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("THOXD_QUEUE_SIZE", "-1")
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("thoxd: invalid setting queue_size: ")


def test_missing_config_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "/nonexistent.toml"]) == 2
    err = capsys.readouterr().err
    assert err == "thoxd: config file not found: /nonexistent.toml\n"


def test_unknown_key_in_config_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "thoxd.toml"
    config.write_text("colour = 'blue'\n")
    assert main(["--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("thoxd: invalid setting colour: ")


def test_serve_help_exits_0_and_lists_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--port", "--host", "--slots", "--max-body-bytes", "--config"):
        assert flag in out
    assert "TCP port to listen on." in out


def test_help_exits_0_and_lists_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--port" in capsys.readouterr().out


def test_help_says_serve_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: thoxd serve" in out
    assert "default command" in out


def test_version_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("thoxd ")


def test_bad_choice_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "loud"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_parser_has_a_flag_for_every_settings_field() -> None:
    parser = build_parser()
    for name in Settings.model_fields:
        value = "debug" if name == "log_level" else "7"
        args = parser.parse_args(["serve", "--" + name.replace("_", "-"), value])
        assert getattr(args, name) == value, name


def test_unset_flags_stay_out_of_the_overrides() -> None:
    # SUPPRESS keeps unset flags out, so the environment and the file still count.
    args = build_parser().parse_args(["serve", "--port", "9000"])
    given = {k for k in vars(args) if k in Settings.model_fields}
    assert given == {"port"}
