"""thoxd/catalog/partials.py: files written whole or not at all, and stale partials cleaned."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from thoxd.catalog.partials import SUFFIX, PartialFile, partial_path, remove_stale


@pytest.fixture
def live_writer() -> Iterator[list[int]]:
    """Locks files as a writer in another process does: flock is per open file, so an fd of
    our own, opened separately, conflicts with the code under test just as that would."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def hold(fds: list[int], path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    fds.append(fd)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_partial_name_is_thoxd_own() -> None:
    assert partial_path(Path("/m/model.gguf")) == Path("/m/model.gguf" + SUFFIX)
    assert SUFFIX == ".thoxd.partial"


def test_commit_renames_the_partial_into_place(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    with PartialFile(target) as partial:
        partial.file.write(b"GGUF data")
        assert names(tmp_path) == ["model.gguf" + SUFFIX]  # written under the partial name
        partial.commit()
    assert names(tmp_path) == ["model.gguf"]
    assert target.read_bytes() == b"GGUF data"


def test_a_write_cut_short_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="disk full"), PartialFile(tmp_path / "m.gguf") as partial:
        partial.file.write(b"half of it")
        raise OSError("disk full")
    assert names(tmp_path) == []


def test_an_interrupt_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), PartialFile(tmp_path / "m.gguf") as partial:
        partial.file.write(b"half of it")
        raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_a_stale_partial_is_replaced(tmp_path: Path) -> None:
    partial_path(tmp_path / "m.gguf").write_bytes(b"left by a killed copy")
    with PartialFile(tmp_path / "m.gguf") as partial:
        partial.file.write(b"new")
        partial.commit()
    assert names(tmp_path) == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"new"


def test_a_partial_being_written_is_not_touched(tmp_path: Path, live_writer: list[int]) -> None:
    busy = partial_path(tmp_path / "m.gguf")
    busy.write_bytes(b"someone is writing this")
    hold(live_writer, busy)
    with pytest.raises(FileExistsError, match="another process is writing it"):
        PartialFile(tmp_path / "m.gguf").__enter__()
    assert busy.read_bytes() == b"someone is writing this"
    assert names(tmp_path) == ["m.gguf" + SUFFIX]


def test_the_partial_is_locked_while_written(tmp_path: Path) -> None:
    with PartialFile(tmp_path / "m.gguf") as partial:
        partial.file.write(b"x" * 1000)
        assert remove_stale([tmp_path]) == []
        assert names(tmp_path) == ["m.gguf" + SUFFIX]
        partial.commit()
    assert names(tmp_path) == ["m.gguf"]


def test_remove_stale_removes_only_thoxd_partials_no_one_writes(
    tmp_path: Path, live_writer: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    stale = partial_path(tmp_path / "big.gguf")
    stale.write_bytes(b"x" * 4096)
    busy = partial_path(tmp_path / "busy.gguf")
    busy.write_bytes(b"being written")
    hold(live_writer, busy)
    others = {
        "big.gguf.partial": b"a download by another tool",
        "big.gguf.part": b"another",
        "notes.txt": b"mine",
        SUFFIX: b"no name before the suffix",
        "model.gguf": b"GGUF",
    }
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ("dir" + SUFFIX)).mkdir()
    (tmp_path / ("link" + SUFFIX)).symlink_to(tmp_path / "notes.txt")
    (tmp_path / "sub").mkdir()
    below = partial_path(tmp_path / "sub" / "deeper.gguf")
    below.write_bytes(b"not in a directory it was asked to clean")

    with caplog.at_level("INFO", logger="thoxd.models"):
        removed = remove_stale([tmp_path])

    assert removed == [(stale, 4096)]
    assert not stale.exists()
    assert busy.exists() and below.exists()
    for name, data in others.items():
        assert (tmp_path / name).read_bytes() == data
    assert (tmp_path / ("dir" + SUFFIX)).is_dir()
    assert (tmp_path / ("link" + SUFFIX)).is_symlink()
    assert [r.getMessage() for r in caplog.records] == [
        f"removed big.gguf{SUFFIX} (4.0 KiB), left by an interrupted copy"
    ]


def test_remove_stale_keeps_the_files_it_is_told_to(tmp_path: Path) -> None:
    odd = tmp_path / ("named-like-one" + SUFFIX)  # a catalog entry's own file
    odd.write_bytes(b"GGUF")
    assert remove_stale([tmp_path], keep=[odd]) == []
    assert odd.exists()


def test_remove_stale_skips_missing_directories(tmp_path: Path) -> None:
    assert remove_stale([tmp_path / "nope", tmp_path / "file"]) == []
