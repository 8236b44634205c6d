"""thoxd/settings.py: CLI override > THOXD_* env > TOML file > default, with bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

import thoxd.settings
from thoxd.settings import Settings, load_settings, settings_error

pytestmark = pytest.mark.usefixtures("clean_settings_env")


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load_settings({})
    assert s.host == "0.0.0.0"
    assert s.port == 8080
    assert s.slots == 4
    assert s.default_model == "thox-coder"
    assert s.log_level == "info"
    assert s.threads == len(os.sched_getaffinity(0))
    assert s.state_dir == tmp_path / "xdg" / "thoxd"
    assert s.catalog.name == "models.toml"
    assert s.catalog.is_file()
    assert (s.n_gpu_layers, s.gpu_memory_budget) == ("auto", "90%")


def test_toml_file_beats_default(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "thoxd.toml", 'port = 9000\nslots = 3\nhost = "127.0.0.1"\n')
    s = load_settings({}, config)
    assert (s.port, s.slots, s.host) == (9000, 3, "127.0.0.1")


def test_env_beats_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "thoxd.toml", "port = 9000\nslots = 3\n")
    monkeypatch.setenv("THOXD_PORT", "9100")
    s = load_settings({}, config)
    assert s.port == 9100
    assert s.slots == 3  # not in the environment: the file still counts


def test_cli_override_beats_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "thoxd.toml", "port = 9000\nqueue_size = 7\n")
    monkeypatch.setenv("THOXD_PORT", "9100")
    monkeypatch.setenv("THOXD_QUEUE_SIZE", "8")
    s = load_settings({"port": "9200"}, config)
    assert s.port == 9200
    assert s.queue_size == 8


def test_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THOXD_LOG_LEVEL", "debug")
    monkeypatch.setenv("THOXD_MAX_BODY_BYTES", "4096")
    s = load_settings({})
    assert s.log_level == "debug"
    assert s.max_body_bytes == 4096


def test_system_config_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = write_toml(tmp_path / "system.toml", "port = 9001\n")
    monkeypatch.setattr(thoxd.settings, "SYSTEM_CONFIG", system)
    assert load_settings({}).port == 9001
    # An explicit --config replaces it.
    other = write_toml(tmp_path / "other.toml", "slots = 2\n")
    s = load_settings({}, other)
    assert (s.port, s.slots) == (8080, 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 0),
        ("port", 70000),
        ("slots", 0),
        ("slots", 65),
        ("threads", 0),
        ("max_body_bytes", 10),
        ("log_level", "loud"),
        ("host", ""),
    ],
)
def test_out_of_bounds_override_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings({field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_out_of_bounds_env_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THOXD_PORT", "0")
    with pytest.raises(ValidationError) as info:
        load_settings({})
    assert info.value.errors()[0]["loc"] == ("port",)


def test_out_of_bounds_toml_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "thoxd.toml", "slots = 0\n")
    with pytest.raises(ValidationError) as info:
        load_settings({}, config)
    assert info.value.errors()[0]["loc"] == ("slots",)


@pytest.mark.parametrize(
    ("text", "field"),
    [("keep_alive = 1" + "0" * 400, "keep_alive"), ("keep_alive = -1" + "0" * 400, "keep_alive"),
     ('keep_alive = "' + "1" * 100_000 + 'x"', "keep_alive"),
     ('memory_budget = "' + "9" * 400 + 'TiB"', "memory_budget")],
    ids=["keep_alive 10**400", "keep_alive -10**400", "keep_alive 100 000 digits",
         "memory_budget 400 digits"],
)  # fmt: skip
def test_durations_and_sizes_past_their_bounds_are_refused(
    tmp_path: Path, text: str, field: str
) -> None:
    # Were an OverflowError (a traceback), "forever", or 43 s of backtracking.
    config = write_toml(tmp_path / "thoxd.toml", text + "\n")
    with pytest.raises(ValidationError) as info:
        load_settings({}, config)
    assert info.value.errors()[0]["loc"] == (field,)
    assert settings_error(info.value).startswith(f"invalid setting {field}: ")


def test_settings_error_gives_a_validator_reason_without_its_prefix() -> None:
    with pytest.raises(ValidationError) as info:
        load_settings({"keep_alive": "soon"})
    assert settings_error(info.value) == (
        "invalid setting keep_alive: 'soon' is not a duration (use seconds, or e.g. 90s, 5m, 1h30m)"
    )


def test_unknown_key_in_toml_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "thoxd.toml", "port = 9000\nprot = 9001\n")
    with pytest.raises(ValidationError) as info:
        load_settings({}, config)
    error = info.value.errors()[0]
    assert error["loc"] == ("prot",)
    assert error["type"] == "extra_forbidden"


def test_missing_config_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings({}, tmp_path / "absent.toml")


def test_resolved_models_dir_defaults_to_state_dir(tmp_path: Path) -> None:
    s = load_settings({"state_dir": str(tmp_path / "state")})
    assert s.models_dir is None
    assert s.resolved_models_dir == tmp_path / "state" / "models"


def test_resolved_models_dir_follows_an_explicit_models_dir(tmp_path: Path) -> None:
    s = load_settings({"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "m")})
    assert s.resolved_models_dir == tmp_path / "m"


def test_systemd_state_directory_sets_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/lib/thoxd:{tmp_path}/other")
    s = load_settings({})
    assert s.state_dir == tmp_path / "lib" / "thoxd"
    assert s.resolved_models_dir == tmp_path / "lib" / "thoxd" / "models"


def test_thoxd_state_dir_beats_systemd_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd"))
    monkeypatch.setenv("THOXD_STATE_DIR", str(tmp_path / "explicit"))
    assert load_settings({}).state_dir == tmp_path / "explicit"


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    assert isinstance(s, Settings)


def test_every_field_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


@pytest.mark.usefixtures("clean_settings_env")
def test_the_owner_key_comes_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "owner_key").write_text("from-the-credential-0123\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = load_settings({})
    assert settings.owner_key is not None
    assert settings.owner_key.get_secret_value() == "from-the-credential-0123"
    assert "from-the-credential" not in repr(settings)  # a secret in logs or tracebacks: no
    monkeypatch.setenv("THOXD_OWNER_KEY", "from-the-environment-0123")  # the environment wins
    assert load_settings({}).owner_key.get_secret_value() == "from-the-environment-0123"  # type: ignore[union-attr]


@pytest.mark.usefixtures("clean_settings_env")
def test_a_short_owner_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THOXD_OWNER_KEY", "short")
    with pytest.raises(ValidationError):
        load_settings({})


@pytest.mark.usefixtures("clean_settings_env")
def test_the_fleet_follows_mdns_or_named_peers_and_its_secret_is_a_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings({}).fleet_on  # mDNS is on by default
    assert not load_settings({"mdns": False}).fleet_on
    named = load_settings({"mdns": False, "fleet_peers": "http://10.0.0.6:8080, http://b:9/"})
    assert named.fleet_on and named.fleet_peers == ["http://10.0.0.6:8080", "http://b:9/"]
    assert not load_settings({"fleet": "false"}).fleet_on
    with pytest.raises(ValidationError):
        load_settings({"fleet_peers": "ftp://10.0.0.6"})
    (tmp_path / "fleet_secret").write_text("one-owners-fleet-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    secret = load_settings({}).fleet_secret
    assert secret is not None and secret.get_secret_value() == "one-owners-fleet-secret"
    monkeypatch.setenv("THOXD_FLEET_SECRET", "short")
    with pytest.raises(ValidationError):
        load_settings({})


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), ("0", 0), ("-1", -1), ("33", 33), (12, 12)]
)
def test_n_gpu_layers_is_auto_or_a_count(value: object, expected: object) -> None:
    assert load_settings({"n_gpu_layers": value}).n_gpu_layers == expected


@pytest.mark.parametrize("value", ["all", "-2", "1025", "", True, 2.5])
def test_n_gpu_layers_refused_says_what_it_takes(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings({"n_gpu_layers": value})
    assert settings_error(info.value) == (
        "invalid setting n_gpu_layers: n_gpu_layers is 'auto' or a layer count from -1 (all) "
        "to 1024"
    )


def test_gpu_memory_budget_is_a_size() -> None:
    assert load_settings({"gpu_memory_budget": "12GiB"}).gpu_memory_budget == "12GiB"
    with pytest.raises(ValidationError):
        load_settings({"gpu_memory_budget": "plenty"})
