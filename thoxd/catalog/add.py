"""`thoxd models add`: put a GGUF file into the models directory and append it to the catalog.

The catalog is edited as text, by appending one `[[models]]` entry, so the user's comments and
layout stay as they were. Nothing is left half-done: the file is copied to a partial file and
renamed (thoxd.catalog.partials; what an interrupted add left is removed by the next one), and
when the catalog no longer loads afterwards its bytes and the models dir are restored.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from thoxd.catalog.entries import _NAME, Catalog, CatalogError, ModelSpec
from thoxd.catalog.files import mark_verified, remove_stale_partials
from thoxd.catalog.gguf import GGUFInfo, GGUFRejected, check_gguf
from thoxd.catalog.partials import SUFFIX as PARTIAL_SUFFIX
from thoxd.catalog.partials import PartialFile
from thoxd.errors import ModelNotFound

_BLOCK = 1 << 20
_DEFAULT_CAPABILITIES = ("chat", "completion")
_MAX_DESCRIPTION = 200  # general.name comes from the file: keep the catalog readable
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_TOML_ESCAPES["\r"] = "\\r"


class AddError(Exception):
    """`models add` refused or failed; str() is the one-line reason."""


@dataclass(frozen=True)
class Added:
    id: str
    path: Path
    sha256: str
    size: int
    how: str  # "copied", "hard-linked" or "already there"
    spec: ModelSpec
    removed: tuple[tuple[Path, int], ...] = ()  # stale partial files (path, size) cleaned first


def format_size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    size, units = n / 1000, ["kB", "MB", "GB"]
    while size >= 1000 and len(units) > 1:
        size, units = size / 1000, units[1:]
    return f"{size:.1f} {units[0]}"


def toml_string(value: str) -> str:
    """`value` as a TOML basic string."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogates from a non-UTF-8 argv
        raise AddError(f"{value!r} is not valid UTF-8") from None
    out = []
    for ch in value:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def default_id(path: Path) -> str:
    """A catalog id from a file name: `Qwen2.5 Coder (Q4).gguf` -> `qwen2.5-coder--q4-`."""
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", path.stem.lower()).lstrip("._:-")[:128]
    if not re.match(_NAME, name):
        raise AddError(f"cannot make an id from the file name {path.name!r}: give one with --id")
    return name


def default_n_ctx(info: GGUFInfo) -> int:
    # The model's full window can need gigabytes of KV cache: cap the default, the user may not.
    if info.context_length is None:
        return 4096
    return max(256, min(info.context_length, 8192))


def entry_text(entry: dict[str, Any]) -> str:
    lines = ["", f"# Added by `thoxd models add` on {time.strftime('%Y-%m-%d')}.", "[[models]]"]
    for key, value in entry.items():
        if isinstance(value, str):
            lines.append(f"{key} = {toml_string(value)}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(toml_string(v) for v in value)}]")
        else:
            lines.append(f"{key} = {int(value)}")
    return "\n".join(lines) + "\n"


def add_model(
    source: Path,
    catalog_path: Path,
    models_dir: Path,
    *,
    model_id: str | None = None,
    aliases: Sequence[str] = (),
    capabilities: Sequence[str] = (),
    n_ctx: int | None = None,
    link: bool = False,
) -> Added:
    """Check `source`, place it in `models_dir`, append its entry to `catalog_path`."""
    try:
        info = check_gguf(source)
    except GGUFRejected as exc:
        raise AddError(f"{source.name}: not accepted: {exc}") from None
    if source.name.endswith(PARTIAL_SUFFIX):
        raise AddError(f"{source.name}: a name ending in {PARTIAL_SUFFIX} is for unfinished copies")
    original: bytes | None = None
    specs: list[ModelSpec] = []
    if catalog_path.exists():
        try:
            specs = list(Catalog.load(catalog_path))
            original = catalog_path.read_bytes()
        except (CatalogError, OSError) as exc:
            raise AddError(f"the catalog does not load, fix it first: {exc}") from None
    taken = {name for spec in specs for name in spec.names}
    # What a killed earlier copy left (up to a whole model) goes before this one is written.
    removed = tuple(remove_stale_partials(models_dir, specs))

    entry: dict[str, Any] = {"id": model_id or default_id(source)}
    if aliases:
        entry["aliases"] = list(dict.fromkeys(aliases))
    if info.name and info.name.strip():
        entry["description"] = info.name.strip()[:_MAX_DESCRIPTION]
    entry["path"] = source.name
    entry["sha256"] = "0" * 64  # replaced once the file is placed
    entry["n_ctx"] = n_ctx if n_ctx is not None else default_n_ctx(info)
    entry["capabilities"] = list(dict.fromkeys(capabilities or _DEFAULT_CAPABILITIES))
    try:
        spec = ModelSpec.model_validate(entry)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "entry"
        raise AddError(f"invalid {field}: {first['msg']}") from None
    if spec.id in spec.aliases:
        raise AddError(f"the alias '{spec.id}' repeats the id")
    if used := [name for name in spec.names if name in taken]:
        raise AddError(f"the name '{used[0]}' is already used in {catalog_path.name}")

    entry_text(entry)  # refuses text TOML cannot hold before any file moves
    dest = models_dir / source.name
    sha256, how = _place(source, dest, link)
    entry["sha256"] = sha256
    try:
        check_gguf(dest, root=models_dir)  # confinement, and what was written is still sane
        _append(catalog_path, original, entry_text(entry))
        spec = Catalog.load(catalog_path).get(spec.id)
    except (GGUFRejected, CatalogError, ModelNotFound, AddError, OSError) as exc:
        _restore(catalog_path, original)
        if how != "already there":
            _remove(dest)
        raise AddError(f"{exc}; nothing was changed") from None
    return Added(spec.id, dest, sha256, dest.stat().st_size, how, spec, removed)


def _place(source: Path, dest: Path, link: bool) -> tuple[str, str]:
    """Copy or hard-link `source` to `dest`; return (sha256, how)."""
    if os.path.lexists(dest):
        sha256 = _same_file(source, dest)
        with contextlib.suppress(OSError):
            mark_verified(dest, sha256)
        return sha256, "already there"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, dest)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise AddError(
                    f"--link needs {source.name} on the same filesystem as the models dir "
                    f"{dest.parent}; leave out --link to copy it"
                ) from None
            raise AddError(f"cannot hard-link {source.name}: {exc.strerror}") from None
        try:
            sha256 = _copy(dest, None)
            mark_verified(dest, sha256)
        except OSError as exc:
            _remove(dest)
            raise AddError(f"cannot read {dest.name}: {exc.strerror}") from None
        return sha256, "hard-linked"
    try:
        with PartialFile(dest) as partial:  # a copy cut short leaves no file named `dest`
            sha256 = _copy(source, partial.file)
            partial.commit()
    except OSError as exc:
        raise AddError(f"cannot copy {source.name}: {exc.strerror}") from None
    try:
        mark_verified(dest, sha256)
    except OSError as exc:
        _remove(dest)
        raise AddError(f"cannot copy {source.name}: {exc.strerror}") from None
    return sha256, "copied"


def _same_file(source: Path, dest: Path) -> str:
    """The sha256 of `dest` when it holds the same bytes as `source`; else refuse."""
    try:
        if os.path.samefile(source, dest):
            return _copy(dest, None)
        if source.stat().st_size == dest.stat().st_size:
            digest = _copy(dest, None)
            if digest == _copy(source, None):
                return digest
    except OSError:
        pass
    raise AddError(f"{dest} already exists and is a different file; not overwriting it")


def _copy(source: Path, out: BinaryIO | None) -> str:
    """sha256 of `source`, written to `out` when given."""
    digest = hashlib.sha256()
    with source.open("rb") as src:
        while block := src.read(_BLOCK):
            digest.update(block)
            if out is not None:
                out.write(block)
    return digest.hexdigest()


def _append(catalog_path: Path, original: bytes | None, text: str) -> None:
    # Append in place (not write-and-rename): keeps the file's owner, mode and any symlink.
    if original is None:
        text = "# The models this box can serve (see models.toml in thoxd's repository).\n" + text
    elif original and not original.endswith(b"\n"):
        text = "\n" + text
    with catalog_path.open("ab") as f:
        f.write(text.encode("utf-8"))


def _restore(catalog_path: Path, original: bytes | None) -> None:
    with contextlib.suppress(OSError):
        if original is None:
            catalog_path.unlink()
        else:
            os.truncate(catalog_path, len(original))


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".verified")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
