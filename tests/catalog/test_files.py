"""thoxd/catalog/files.py: model paths that stay inside, packaged files assembled and verified."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import thoxd.catalog.files
from tests.conftest import REPO
from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.catalog.files import (
    ModelFileError,
    ensure_model_file,
    model_path,
    packaged_file,
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


@dataclass
class FakeDistribution:
    name: str  # as in models.toml ("fake-dist-abc")
    module: str
    file: Path  # the model inside it
    package_file: str  # its name relative to site-packages, as RECORD lists it


@pytest.fixture
def fake_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeDistribution]:
    """An installed distribution (dist-info with a RECORD) holding a model file, whose package
    must never be imported: its __init__ raises."""
    module = f"fake_dist_{abs(hash(str(tmp_path))):x}"
    site = tmp_path / "site"
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text("raise ImportError('needs what thoxd lacks')\n")
    model = site / module / "model.gguf"
    model.write_bytes(CONTENT)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    name = module.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(
        f"{module}/__init__.py,,\n{module}/model.gguf,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield FakeDistribution(name, module, model, f"{module}/model.gguf")
    sys.modules.pop(module, None)


def spec_for(package: str | None, sha256: str | None = None, path: str = "m.gguf") -> ModelSpec:
    return ModelSpec(id="fake", path=path, package=package, sha256=sha256)


def spec_in(dist: FakeDistribution, sha256: str = SHA, package_file: str = "") -> ModelSpec:
    return ModelSpec(
        id="fake",
        path="m.gguf",
        package=dist.name,
        package_file=package_file or dist.package_file,
        sha256=sha256,
    )


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


# -- a file inside an installed distribution (package_file) ---------------------------------


def test_copies_the_file_of_an_installed_distribution(
    tmp_path: Path, fake_distribution: FakeDistribution
) -> None:
    models = tmp_path / "models"
    messages: list[str] = []
    path = ensure_model_file(spec_in(fake_distribution), models, messages.append)
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in models.iterdir()) == ["m.gguf", "m.gguf.verified"]
    assert messages[0] == f"assembling m.gguf (0 MB) from {fake_distribution.name}"
    assert [m for m in messages if "%" in m][-1].split() == ["100%", "0/0", "MB"]
    assert messages[-1] == f"sha256 verified: {SHA[:16]}..."
    assert json.loads((models / "m.gguf.verified").read_text())["sha256"] == SHA
    # Found through the metadata: the package's own code never ran.
    assert fake_distribution.module not in sys.modules
    assert fake_distribution.file.read_bytes() == CONTENT  # the source stays


def test_the_copy_is_not_made_again(tmp_path: Path, fake_distribution: FakeDistribution) -> None:
    spec = spec_in(fake_distribution)
    ensure_model_file(spec, tmp_path, lambda _: None)
    fake_distribution.file.unlink()  # the copy no longer needs its source
    messages: list[str] = []
    assert ensure_model_file(spec, tmp_path, messages.append) == tmp_path / "m.gguf"
    assert messages == []


def test_a_distribution_that_is_not_installed_is_refused(tmp_path: Path) -> None:
    spec = ModelSpec(
        id="fake",
        path="m.gguf",
        package="thoxd-test-no-such-dist",
        package_file="x/m.gguf",
        sha256=SHA,
    )
    with pytest.raises(ModelFileError, match="package thoxd-test-no-such-dist is not installed"):
        ensure_model_file(spec, tmp_path / "models", lambda _: None)
    assert not (tmp_path / "models").exists()


def test_a_file_the_distribution_does_not_list_is_refused(
    tmp_path: Path, fake_distribution: FakeDistribution
) -> None:
    other = f"{fake_distribution.module}/other.gguf"
    (fake_distribution.file.parent / "other.gguf").write_bytes(CONTENT)  # there, not in RECORD
    with pytest.raises(ModelFileError, match=f"has no file {re.escape(other)}") as info:
        ensure_model_file(spec_in(fake_distribution, package_file=other), tmp_path, lambda _: None)
    assert str(tmp_path) not in str(info.value)
    assert not (tmp_path / "m.gguf").exists()


def test_a_listed_file_that_is_gone_is_refused(
    tmp_path: Path, fake_distribution: FakeDistribution
) -> None:
    fake_distribution.file.unlink()
    with pytest.raises(ModelFileError, match=r"model\.gguf of package .* is missing") as info:
        packaged_file(spec_in(fake_distribution))
    assert str(tmp_path) not in str(info.value)


def test_a_packaged_file_with_another_sha256_is_refused_and_not_kept(
    tmp_path: Path, fake_distribution: FakeDistribution
) -> None:
    models = tmp_path / "models"
    with pytest.raises(ModelFileError, match="does not match its sha256"):
        ensure_model_file(spec_in(fake_distribution, sha256="0" * 64), models, lambda _: None)
    assert list(models.iterdir()) == []  # no partial file, no stamp


def test_the_catalog_finds_its_packaged_files_where_they_are_installed() -> None:
    # The real entries (scripts/_install installs their distributions): found without import.
    packaged = [s for s in Catalog.load(REPO / "models.toml") if s.package_file is not None]
    assert packaged
    for spec in packaged:
        assert packaged_file(spec).stat().st_size > 50_000_000


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
