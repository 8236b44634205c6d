"""thoxd/device/install_id.py: one random id per install, kept in the state dir."""

from __future__ import annotations

import re
import stat
import threading
from pathlib import Path

import pytest

from thoxd.device.install_id import load_install_id


def test_made_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state" / "deeper"
    first = load_install_id(state)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    path = state / "install-id"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == first + "\n"
    assert load_install_id(state) == first
    assert load_install_id(tmp_path / "another") != first
    assert [p.name for p in state.iterdir()] == ["install-id"]  # no temporary files left


def test_damaged_file_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "install-id").write_text("not an id /home/someone\n")
    fresh = load_install_id(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{16}", fresh)
    assert load_install_id(tmp_path) == fresh
    assert "damaged" in caplog.text and "/home" not in caplog.text


def test_unwritable_state_dir_gives_an_id_for_this_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    ephemeral = load_install_id(blocker / "state")  # a file where the dir should be
    assert re.fullmatch(r"[0-9a-f]{16}", ephemeral)
    assert "this run only" in caplog.text


def test_concurrent_first_starts_agree(tmp_path: Path) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        ids.append(load_install_id(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
