"""All of thoxd's settings, declared once, read once (in `__main__`) and passed down.

Precedence: CLI flag > THOXD_* environment > a systemd credential (owner_key, fleet_secret) >
TOML file (`--config`, or /etc/thoxd/thoxd.toml when present) > the defaults below. Every field
carries a description (it becomes the `--help` text) and bounds (a bad value is refused before
anything starts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from thoxd.catalog.entries import Duration, GpuLayers
from thoxd.units import parse_size

SYSTEM_CONFIG = Path("/etc/thoxd/thoxd.toml")


def _default_state_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY; otherwise the XDG data home.
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "thoxd"


def _usable_cores() -> int:
    # The cores this process may run on (cgroups and affinity), not the machine's total.
    return len(os.sched_getaffinity(0))


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _repo_catalog() -> Path:
    return _repo_root() / "models.toml"


def _size(value: str) -> str:
    parse_size(value)  # raises ValueError with the reason
    return value


def _comma_list(value: Any) -> Any:
    # A flag or THOXD_* variable gives "a,b"; the TOML file gives a list.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# scheme://host[:port]; "null" (pages opened from files, sandboxed frames) or "*" (any origin)
Origin = Annotated[
    str,
    Field(min_length=1, max_length=256, pattern=r"^(\*|null|[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+/?)$"),
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="THOXD_", extra="forbid", validate_default=True, frozen=True
    )

    host: str = Field("0.0.0.0", description="Address to listen on.", min_length=1)
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on.")
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where thoxd keeps its state (the install id, assembled models).",
    )
    models_dir: Path | None = Field(
        None, description="Where model files live (default: STATE_DIR/models)."
    )
    catalog: Path = Field(
        default_factory=_repo_catalog, description="The models.toml catalog to serve from."
    )
    default_model: str = Field(
        "thox-coder",
        min_length=1,
        max_length=128,
        description="Catalog id or alias of the model loaded at start.",
    )
    threads: int = Field(
        default_factory=_usable_cores,
        ge=1,
        le=512,
        description="CPU threads for llama.cpp (default: every usable core).",
    )
    slots: int = Field(
        4, ge=1, le=64, description="Sequences decoded together per model (continuous batching)."
    )
    queue_size: int = Field(
        16, ge=0, le=4096, description="Requests that may wait for a slot; past it, 503."
    )
    batch_size: int = Field(
        256,
        ge=32,
        le=8192,
        description="The prefill chunk of a step (256 halves running streams' worst stall "
        "against 512, same prefill speed on a CPU); a model offloaded to a GPU prefills a prompt "
        "running alone up to 2048 tokens a step, as llama-server does.",
    )
    draft_max: int = Field(
        15,
        ge=0,
        le=63,
        description="Speculative decoding by prompt lookup: most tokens drafted per sequence "
        "and step from earlier text of its prompt or output, checked in the same step; each step "
        "drafts only as many as its measured cost says pay off. 0 turns it off.",
    )
    # -- models: thoxd/engine/runtime.py --
    memory_budget: Annotated[str, AfterValidator(_size)] = Field(
        "80%",
        description="Memory all loaded models may use together: bytes ('6GiB'), or a share of "
        "the RAM available at start as a percentage (the default: 80 percent). A load that does "
        "not fit evicts idle models, least recently used first, or is refused.",
    )
    n_gpu_layers: GpuLayers = Field(
        "auto",
        description="Layers of each model llama.cpp offloads to the GPUs it was built for: "
        "'auto' (the default: as many as fit gpu_memory_budget), a count (-1: all, 0: none). "
        "models.toml may set a model's own. Nothing is offloaded without a GPU build.",
    )
    gpu_memory_budget: Annotated[str, AfterValidator(_size)] = Field(
        "90%",
        description="GPU memory all loaded models may use together: bytes ('20GiB'), or a share "
        "of the GPUs' total memory as a percentage (the default: 90 percent). Evicts and refuses "
        "as memory_budget does.",
    )
    keep_alive: Duration = Field(
        float("inf"),
        description="Unload a model after this long idle (seconds, '5m', 'forever'); "
        "models.toml and each request may set their own.",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, le=1 << 30, description="Largest request body accepted; past it, 413."
    )
    allowed_origins: Annotated[list[Origin], NoDecode, BeforeValidator(_comma_list)] = Field(
        default_factory=list,
        max_length=64,
        description="Web origins (scheme://host[:port], comma-separated; 'null' for pages opened "
        "from files, '*' for any) besides the device itself whose pages may call the API (CORS, "
        "without credentials) and open the /v1/stream WebSocket; other browser origins are "
        "refused.",
    )
    # -- safe on a LAN: thoxd/guards/lan.py --
    allowed_hosts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=253, pattern=r"^(\*|[\w.:\[\]-]+)$")]],
        NoDecode,
        BeforeValidator(_comma_list),
    ] = Field(
        default_factory=list,
        max_length=64,
        description="Host names (or addresses, comma-separated) clients may reach the device by, "
        "besides HOSTNAME.local, the OS host name, its own addresses and localhost; other Host "
        "headers get 403 (DNS rebinding). '*' turns the check off (behind a reverse proxy).",
    )
    allow_public_clients: bool = Field(
        False,
        description="Serve clients from any address; by default only loopback, private "
        "(RFC 1918), link-local and unique local (ULA) addresses are served, others get 403.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        ge=0.5,
        le=300,
        description="Longest time a client may take to send a request's headers (from the "
        "connection, or the request's first byte); then the connection is closed.",
    )
    body_timeout_seconds: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description="Longest time a request body may take to arrive after its headers; then "
        "408 and the connection is closed.",
    )
    max_connections: int = Field(
        1024,
        ge=4,
        le=65536,
        description="Most connections open at once, WebSockets included; past it a new "
        "connection gets 503 and is closed. Lowered at start if the open file limit cannot "
        "hold it with a reserve.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity."
    )
    # -- access: thoxd/access/, thoxd/guards/access.py --
    owner_key: SecretStr | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Turns keys on: every API request then needs a key (Authorization: Bearer, "
        "or X-Api-Key), and this one is the owner's (it manages keys, bypasses limits). Set it "
        "in the environment (THOXD_OWNER_KEY, a systemd EnvironmentFile) or the TOML file, "
        "never on the command line. Unset: no keys, as a local device needs none.",
    )
    client_rate_limit: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="With keys off: requests per minute each client address may make (guests; "
        "0, the default, is no limit, so IDE autocompletion on a private box is not throttled).",
    )
    client_rate_burst: int = Field(
        10,
        ge=1,
        le=1_000_000,
        description="With client_rate_limit: requests a guest may "
        "send at once before the per-minute rate applies.",
    )
    max_slots_per_client: int = Field(
        0,
        ge=0,
        le=64,
        description="Fair share: most slots of a model one client (a key, or an address with "
        "keys off) may hold while others wait; 0 is no cap (waiting requests still take turns "
        "between clients).",
    )
    # -- discovery (mDNS): thoxd/device/discovery.py --
    hostname: str = Field(
        "thox",
        min_length=1,
        max_length=60,
        pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$",
        description="mDNS host name: the box answers as HOSTNAME.local (HOSTNAME-2.local, ... "
        "when another responder holds it).",
    )
    mdns: bool = Field(
        True, description="Advertise the box with mDNS: HOSTNAME.local, _thox._tcp, _http._tcp."
    )
    mdns_interfaces: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.:%@-]+$")]],
        NoDecode,
        BeforeValidator(_comma_list),
    ] = Field(
        default_factory=list,
        max_length=32,
        description="Interfaces (names or addresses, comma-separated) to advertise on; "
        "empty: every LAN interface.",
    )
    mdns_loopback: bool = Field(
        False, description="Advertise on loopback too (tests, or a box that has no LAN)."
    )
    # -- fleet: several boxes as one (thoxd/fleet/) --
    fleet: bool | None = Field(
        None,
        description="Find other thoxd boxes (mDNS, and fleet_peers) and forward to them the "
        "requests this box cannot serve now. Unset: on when mdns is on or fleet_peers is set.",
    )
    fleet_secret: SecretStr | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Shared by the boxes of one owner: only peers that prove they hold it are "
        "sent requests or accepted from (others are listed, never used). Environment "
        "(THOXD_FLEET_SECRET), TOML file or systemd credential; never on the command line.",
    )
    fleet_peers: Annotated[
        list[Annotated[str, Field(pattern=r"^https?://[\w.:\[\]%-]+(:\d+)?/?$")]],
        NoDecode,
        BeforeValidator(_comma_list),
    ] = Field(
        default_factory=list,
        max_length=64,
        description="Peers by URL (http://HOST:PORT, comma-separated), for networks without "
        "multicast; found peers are added to them.",
    )
    rpc_server: str = Field(
        "",
        pattern=r"^$|^[\w.:-]+:\d{1,5}$",
        description="HOST:PORT to run llama.cpp's rpc-server on as a helper for a model split "
        "over boxes (README, 'Fleet'); empty: none. It has no authentication: a private address.",
    )
    rpc_isolate: bool = Field(
        True,
        description="Serve each model split over RPC servers from a thoxd process of its own: "
        "llama.cpp aborts the process holding one when a server goes away.",
    )
    rpc_build: Path = Field(
        default_factory=lambda: _repo_root() / "build" / "rpc",
        description="Where scripts/build-rpc put rpc-server (bin/) and libggml-rpc.so (lib/).",
    )
    fleet_poll_seconds: float = Field(
        2.0, ge=0.2, le=60, description="How often each peer's load is read (GET /fleet/status)."
    )
    # -- shutdown (systemd's TimeoutStopSec, 90 s by default, must cover the grace period) --
    shutdown_grace_seconds: float = Field(
        10.0,
        ge=0,
        le=60,
        description="On SIGTERM, how long running generations may go on before open streams "
        "are ended (SSE: a final shutting_down error event; WebSocket: close 1001).",
    )

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.state_dir / "models"

    @property
    def fleet_on(self) -> bool:
        return self.fleet if self.fleet is not None else (self.mdns or bool(self.fleet_peers))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        credentials = _Credentials(settings_cls)
        return init_settings, env_settings, credentials, TomlConfigSettingsSource(settings_cls)


CREDENTIALS = ("owner_key", "fleet_secret")


class _Credentials(PydanticBaseSettingsSource):
    """systemd credentials: `LoadCredential=owner_key:FILE` puts the owner key in
    $CREDENTIALS_DIRECTORY/owner_key, readable by this service only (fleet_secret likewise)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return {}
        found = {}
        for name in CREDENTIALS:
            path = Path(directory) / name
            if path.is_file():
                found[name] = path.read_text().strip()
        return found


def settings_error(exc: Exception) -> str:
    """The one line a command prints when `load_settings` refused."""
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        reason = error.get("ctx", {}).get("error", error["msg"])  # without "Value error, "
        return f"invalid setting {field}: {reason}"
    return str(exc)


def load_settings(overrides: Mapping[str, Any], config_file: Path | None = None) -> Settings:
    """Settings from CLI `overrides`, the environment and a TOML file, in that order."""
    if config_file is None and SYSTEM_CONFIG.is_file():
        config_file = SYSTEM_CONFIG
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    sourced = type(
        "Settings",
        (Settings,),
        {"model_config": SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})},
    )
    return Settings.model_validate(sourced(**overrides).model_dump())
