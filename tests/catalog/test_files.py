"""thoxd/catalog/files.py: model paths that stay inside, packaged files assembled and verified."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import thoxd.catalog.files
from thoxd.catalog.entries import ModelSpec
from thoxd.catalog.files import (
    ModelFileError,
    ensure_model_file,
    model_path,
    remove_stale_partials,
)
from thoxd.catalog.partials import partial_path

CHUNKS = (b"GGUF" + b"\x00" * 296, b"tensor data " * 50)
CONTENT = b"".join(CHUNKS)
SHA = hashlib.sha256(CONTENT).hexdigest()


@dataclass
class FakePackage:
    name: str  # the distribution name, as in models.toml ("fake-model-abc")
    chunks: list[Path]


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePackage]:
    """A tiny importable package that exposes `chunk_paths()` and `EXPECTED_SHA256`."""
    module = f"fake_model_{abs(hash(str(tmp_path))):x}"
    root = tmp_path / "site"
    pkg = root / module
    (pkg / "chunks").mkdir(parents=True)
    paths = []
    for i, data in enumerate(CHUNKS):
        path = pkg / "chunks" / f"part{i}"
        path.write_bytes(data)
        paths.append(path)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"EXPECTED_SHA256 = {SHA!r}\n"
        "def chunk_paths():\n"
        "    here = Path(__file__).parent / 'chunks'\n"
        "    return [here / 'part0', here / 'part1']\n"
    )
    monkeypatch.syspath_prepend(str(root))
    yield FakePackage(module.replace("_", "-"), paths)
    sys.modules.pop(module, None)


def spec_for(package: str | None, sha256: str | None = None, path: str = "m.gguf") -> ModelSpec:
    return ModelSpec(id="fake", path=path, package=package, sha256=sha256)


# -- model_path ---------------------------------------------------------------------------


def test_model_path_inside(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    assert model_path(spec_for(None, path="sub/a.gguf"), models) == models / "sub" / "a.gguf"


def test_model_path_refuses_a_symlink_that_leaves(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"secret")
    (models / "m.gguf").symlink_to(outside)
    with pytest.raises(ModelFileError, match="leaves the models directory") as info:
        model_path(spec_for(None), models)
    assert str(tmp_path) not in str(info.value)


def test_model_path_refuses_a_symlinked_directory_that_leaves(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (models / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ModelFileError):
        model_path(spec_for(None, path="sub/m.gguf"), models)


def test_model_path_allows_a_symlink_that_stays_inside(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "real").mkdir(parents=True)
    (models / "real" / "x.gguf").write_bytes(b"x")
    (models / "m.gguf").symlink_to(models / "real" / "x.gguf")
    assert model_path(spec_for(None), models) == models / "real" / "x.gguf"


# -- ensure_model_file ------------------------------------------------------------------------


def test_assembles_from_the_package(tmp_path: Path, fake_package: FakePackage) -> None:
    models = tmp_path / "models"  # does not exist yet
    messages: list[str] = []
    path = ensure_model_file(spec_for(fake_package.name), models, messages.append)
    assert path == models / "m.gguf"
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in models.iterdir()) == ["m.gguf", "m.gguf.verified"]

    assert messages[0].startswith("assembling m.gguf")
    percents = [int(m.split("%")[0]) for m in messages if "%" in m]
    assert percents == sorted(percents)
    assert percents[-1] == 100
    assert messages[-1] == f"sha256 verified: {SHA[:16]}..."

    stamp = json.loads((models / "m.gguf.verified").read_text())
    st = path.stat()
    assert stamp == {"size": len(CONTENT), "mtime_ns": st.st_mtime_ns, "sha256": SHA}


def test_spec_sha_is_used_when_given(tmp_path: Path, fake_package: FakePackage) -> None:
    path = ensure_model_file(spec_for(fake_package.name, SHA), tmp_path, lambda _: None)
    assert json.loads((tmp_path / "m.gguf.verified").read_text())["sha256"] == SHA
    assert path.read_bytes() == CONTENT


def test_second_call_trusts_the_stamp(
    tmp_path: Path, fake_package: FakePackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(fake_package.name, SHA)
    ensure_model_file(spec, tmp_path, lambda _: None)

    def no_hashing(path: Path) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(thoxd.catalog.files, "_sha256", no_hashing)
    messages: list[str] = []
    assert ensure_model_file(spec, tmp_path, messages.append) == tmp_path / "m.gguf"
    assert messages == []


def test_existing_file_without_stamp_is_hashed_once(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(CONTENT)
    messages: list[str] = []
    ensure_model_file(spec_for(None, SHA), tmp_path, messages.append)
    assert messages == ["checking sha256 of m.gguf"]
    assert (tmp_path / "m.gguf.verified").exists()
    messages.clear()
    ensure_model_file(spec_for(None, SHA), tmp_path, messages.append)
    assert messages == []


def test_corrupted_file_is_refused(tmp_path: Path, fake_package: FakePackage) -> None:
    spec = spec_for(fake_package.name, SHA)
    path = ensure_model_file(spec, tmp_path, lambda _: None)
    # Same size, different bytes, a later mtime: the stamp no longer matches.
    path.write_bytes(CONTENT[:-1] + b"!")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelFileError, match="does not match its sha256"):
        ensure_model_file(spec, tmp_path, lambda _: None)


def test_truncated_file_is_refused(tmp_path: Path, fake_package: FakePackage) -> None:
    spec = spec_for(fake_package.name, SHA)
    path = ensure_model_file(spec, tmp_path, lambda _: None)
    path.write_bytes(CONTENT[:100])
    with pytest.raises(ModelFileError):
        ensure_model_file(spec, tmp_path, lambda _: None)


def test_wrong_expected_sha_removes_partial_and_raises(
    tmp_path: Path, fake_package: FakePackage
) -> None:
    spec = spec_for(fake_package.name, "0" * 64)
    with pytest.raises(ModelFileError, match="does not match its sha256"):
        ensure_model_file(spec, tmp_path, lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_missing_file_without_package_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not in the models dir") as info:
        ensure_model_file(spec_for(None, SHA), tmp_path)
    assert str(tmp_path) not in str(info.value)


def test_unimportable_package_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="unusable"):
        ensure_model_file(spec_for("no-such-package-thoxd-test"), tmp_path, lambda _: None)


def test_package_without_chunk_paths_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"empty_model_{abs(hash(str(tmp_path))):x}"
    (tmp_path / f"{module}.py").write_text("EXPECTED_SHA256 = '0' * 64\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModelFileError, match="unusable"):
            ensure_model_file(spec_for(module), tmp_path / "models", lambda _: None)
    finally:
        sys.modules.pop(module, None)


def test_assembly_cut_short_leaves_no_partial(
    tmp_path: Path, fake_package: FakePackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first chunk is written, then the second cannot be read (a full disk fails the same
    # way): a 241 MiB partial file stayed behind, and the error was a bare OSError.
    monkeypatch.setattr(thoxd.catalog.files, "_BLOCK", 64)
    fake_package.chunks[1].unlink()
    fake_package.chunks[1].mkdir()  # stat() passes, open() fails: after part0 is written
    models = tmp_path / "models"
    with pytest.raises(ModelFileError, match=r"cannot assemble m\.gguf: Is a directory") as info:
        ensure_model_file(spec_for(fake_package.name), models, lambda _: None)
    assert str(tmp_path) not in str(info.value)
    assert list(models.iterdir()) == []


def test_assembly_replaces_what_a_killed_one_left(
    tmp_path: Path, fake_package: FakePackage
) -> None:
    partial_path(tmp_path / "m.gguf").write_bytes(b"GGUF and then the process was killed")
    path = ensure_model_file(spec_for(fake_package.name), tmp_path, lambda _: None)
    assert path.read_bytes() == CONTENT
    assert not partial_path(path).exists()


def test_remove_stale_partials_looks_where_thoxd_writes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "other").mkdir()
    top = partial_path(models / "added.gguf")  # `models add` writes at the top
    beside = partial_path(models / "sub" / "m.gguf")  # assembly writes beside the entry's file
    elsewhere = partial_path(models / "other" / "x.gguf")  # no entry lives there
    for path in (top, beside, elsewhere):
        path.write_bytes(b"x" * 10)
    removed = remove_stale_partials(models, [spec_for(None, path="sub/m.gguf")])
    assert sorted(p.name for p, _ in removed) == sorted([top.name, beside.name])
    assert not top.exists() and not beside.exists()
    assert elsewhere.exists()
