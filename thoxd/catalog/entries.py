"""models.toml -> ModelSpec: what the box can serve, looked up by id or alias.

The catalog is validated as a whole at start; an error names the entry and the field, so a typo
in models.toml is a one-line message, not a traceback at the first request.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from thoxd.errors import ModelNotFound
from thoxd.units import parse_duration

Capability = Literal["chat", "completion", "embeddings"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"

# Seconds (math.inf: no limit), written as 300, "5m", "1h30m", -1 or "forever".
Duration = Annotated[float, BeforeValidator(parse_duration)]


def _gpu_layers(value: object) -> object:
    if value == "auto":
        return value
    try:
        layers = int(value) if isinstance(value, int | str) and value != "" else None
    except ValueError:
        layers = None
    if layers is None or isinstance(value, bool) or not -1 <= layers <= 1024:
        raise ValueError("n_gpu_layers is 'auto' or a layer count from -1 (all) to 1024")
    return layers


# llama.cpp's n_gpu_layers (-1: all), or "auto": as many as fit the GPU memory budget.
GpuLayers = Annotated[int | Literal["auto"], BeforeValidator(_gpu_layers)]


class CatalogError(Exception):
    """models.toml is missing, unreadable, or has an invalid entry; str() is one line."""

    def __init__(self, message: str) -> None:
        # Names and keys come from the file: escape what would break the line (or a terminal).
        super().__init__("".join(c if c.isprintable() else ascii(c)[1:-1] for c in message))


class SamplingDefaults(BaseModel):
    """Per-model defaults for what a request leaves out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)
    max_tokens: int | None = Field(None, ge=1)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_NAME)
    aliases: tuple[str, ...] = ()
    description: str = ""
    path: str = Field(min_length=1, description="GGUF file, relative to the models directory")
    package: str | None = Field(
        None, description="Python package that assembles the file when it is missing"
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    package_file: str | None = Field(
        None,
        description="the GGUF as a file of the installed `package` distribution, copied when "
        "the file is missing (the package is never imported)",
    )
    n_ctx: int = Field(4096, ge=256, le=1 << 20, description="context window of one request")
    n_gpu_layers: GpuLayers | None = Field(
        None, description="layers offloaded to the GPU (default: the daemon's n_gpu_layers)"
    )
    rpc: tuple[Annotated[str, Field(pattern=r"^[\w.-]+:\d{1,5}$")], ...] = Field(
        (),
        max_length=16,
        description="llama.cpp RPC servers (HOST:PORT, scripts/build-rpc) the model's layers "
        "are split over: n_gpu_layers of them (unset, 0 or 'auto': all) go there, the rest stay "
        "here",
    )
    chat_template: str | None = Field(
        None, description="a built-in template name, or a Jinja template"
    )
    stop: tuple[str, ...] = ()
    capabilities: frozenset[Capability] = frozenset({"chat", "completion"})
    defaults: SamplingDefaults = SamplingDefaults()
    pinned: StrictBool = Field(False, description="loaded at start and never evicted")
    keep_alive: Duration | None = Field(
        None, description="unload after this long idle (default: the daemon's keep_alive)"
    )

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not alias or len(alias) > 128 or alias.strip() != alias:
                raise ValueError(f"invalid alias {alias!r}")
        return value

    @field_validator("path")
    @classmethod
    def _path_stays_inside(cls, value: str) -> str:
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise ValueError("must be a relative path inside the models directory")
        return value

    @field_validator("package_file")
    @classmethod
    def _package_file_is_checked(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        pure = PurePosixPath(value)
        if not value or pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise ValueError("must be a relative path inside the package's distribution")
        # A file taken from someone else's wheel is only trusted through its digest.
        if info.data.get("package") is None or info.data.get("sha256") is None:
            raise ValueError("needs `package` and `sha256` in the same entry")
        return value

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


class Catalog:
    def __init__(self, specs: list[ModelSpec]) -> None:
        self._specs = {spec.id: spec for spec in specs}
        self._names: dict[str, ModelSpec] = {}
        for spec in specs:
            for name in spec.names:
                if name in self._names:
                    raise CatalogError(f"the name '{name}' is used by two catalog entries")
                self._names[name] = spec

    @classmethod
    def load(cls, path: Path) -> Catalog:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path.name}: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{path.name}: not valid UTF-8 (byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"{path.name}: {exc}") from None
        except RecursionError:
            raise CatalogError(f"{path.name}: nested too deeply") from None
        entries = data.get("models")
        if not isinstance(entries, list) or not entries:
            raise CatalogError(f"{path.name}: needs at least one [[models]] entry")
        specs = []
        for i, entry in enumerate(entries):
            label = f"models[{i}]" + (
                f" ({entry['id'][:64]})"
                if isinstance(entry, dict) and isinstance(entry.get("id"), str)
                else ""
            )
            try:
                specs.append(ModelSpec.model_validate(entry))
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"])[:64] or "entry"
                reason = first.get("ctx", {}).get("error", first["msg"])  # no "Value error, "
                raise CatalogError(f"{path.name}: {label}: {field}: {reason}") from None
        return cls(specs)

    def find(self, model_id: str) -> ModelSpec | None:
        """The entry with this id (not alias), if any."""
        return self._specs.get(model_id)

    def get(self, name: str) -> ModelSpec:
        try:
            return self._names[name]
        except KeyError:
            raise ModelNotFound(name) from None

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)
