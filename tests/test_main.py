"""thoxd/__main__.py: the command line, up to (never including) starting the server."""

from __future__ import annotations

from pathlib import Path

import pytest

import thoxd.server
import thoxd.settings
from thoxd.__main__ import build_parser, main
from thoxd.catalog.partials import partial_path
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


def test_parser_has_a_flag_for_every_settings_field_but_the_secrets() -> None:
    parser = build_parser()
    for name in Settings.model_fields:
        if name in ("owner_key", "fleet_secret"):  # never on the command line (/proc/PID/cmdline)
            with pytest.raises(SystemExit):
                parser.parse_args(["serve", "--" + name.replace("_", "-"), "x" * 20])
            continue
        value = "debug" if name == "log_level" else "7"
        args = parser.parse_args(["serve", "--" + name.replace("_", "-"), value])
        assert getattr(args, name) == value, name


def test_unset_flags_stay_out_of_the_overrides() -> None:
    # SUPPRESS keeps unset flags out, so the environment and the file still count.
    args = build_parser().parse_args(["serve", "--port", "9000"])
    given = {k for k in vars(args) if k in Settings.model_fields}
    assert given == {"port"}


# ---------------------------------------------------------------- models.toml at start

GOOD_ENTRY = b'[[models]]\nid = "x"\naliases = ["thox-coder"]\npath = "x.gguf"\n'
BROKEN_CATALOGS = {
    "invalid UTF-8": (GOOD_ENTRY + b'description = "caf\xe9"\n', "not valid UTF-8 (byte 79)"),
    "TOML syntax": (GOOD_ENTRY + b"n_ctx = \n", "Invalid value (at line 5, column 9)"),
    "default model missing": (
        b'[[models]]\nid = "other"\npath = "o.gguf"\n',
        "the default model 'thox-coder' is not in it",
    ),
    "entry fails validation": (GOOD_ENTRY + b"n_ctx = 1\n", "models[0] (x): n_ctx: "),
    "keep_alive no float holds": (
        GOOD_ENTRY + b"keep_alive = 1" + b"0" * 400 + b"\n",
        "models[0] (x): keep_alive: the number is out of range",
    ),
    "key with a newline": (GOOD_ENTRY + b'"a\\nb" = 1\n', "models[0] (x): a\\nb: Extra inputs"),
    "nested too deeply": (GOOD_ENTRY + b"x = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
}


@pytest.mark.parametrize(("text", "reason"), BROKEN_CATALOGS.values(), ids=BROKEN_CATALOGS.keys())
def test_broken_catalog_exits_2_in_one_line_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: bytes, reason: str
) -> None:
    # The autouse fixture fails the test if serve() or even logging is reached.
    catalog = tmp_path / "models.toml"
    catalog.write_bytes(text)
    assert main(["serve", "--catalog", str(catalog)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("thoxd: models.toml")
    assert reason in err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err and str(tmp_path) not in err


def test_missing_catalog_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--catalog", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err == (
        "thoxd: cannot read catalog nope.toml: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [("--memory-budget", "9" * 400 + "TiB", "memory_budget"),
     ("--keep-alive", "1" * 100_000 + "x", "keep_alive"),
     ("--keep-alive", "1" * 400, "keep_alive")],
    ids=["memory_budget 400 digits", "keep_alive 100 000 digits", "keep_alive 400 digits"],
)  # fmt: skip
def test_long_duration_or_size_setting_exits_2_in_one_line(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, field: str
) -> None:
    # memory_budget: an OverflowError traceback; keep_alive: 400 digits were "forever".
    assert main([flag, value]) == 2
    err = capsys.readouterr().err
    what = "a size" if field == "memory_budget" else "a duration"
    assert err == (
        f"thoxd: invalid setting {field}: {what} is at most 64 characters long, not {len(value)}\n"
    )


def test_start_removes_stale_partials_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    catalog = tmp_path / "models.toml"
    catalog.write_bytes(b'[[models]]\nid = "thox-coder"\npath = "sub/m.gguf"\n')
    stale = [partial_path(models / "added.gguf"), partial_path(models / "sub" / "m.gguf")]
    for path in stale:
        path.write_bytes(bytes(3 << 20))
    foreign = models / "download.gguf.partial"
    foreign.write_bytes(b"not named by thoxd")
    seen: list[list[str]] = []

    def serve(settings: Settings) -> int:
        seen.append(sorted(str(p.relative_to(models)) for p in models.rglob("*")))
        return 0

    monkeypatch.setattr(thoxd.server, "serve", serve)
    monkeypatch.setattr(thoxd.server, "configure_logging", lambda level: None)
    args = ["--catalog", str(catalog), "--models-dir", str(models)]
    with caplog.at_level("INFO", logger="thoxd.models"):
        assert main(args) == 0
    assert seen == [["download.gguf.partial", "sub"]]
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"removed {p.name} (3.0 MiB), left by an interrupted copy" for p in stale
    ]
