"""thoxd/fleet/helper.py: rpc-server run as a supervised child (a stand-in script here: what is
supervised is the process, whatever it serves)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from thoxd.fleet import helper
from thoxd.fleet.helper import Supervised, rpc_server


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "rpc-server"
    path.write_text(f'#!/bin/sh\necho "args: $*"\n{body}\n')
    path.chmod(0o755)
    return path


async def _until(condition: Callable[[], bool], limit: int = 500) -> None:
    for _ in range(limit):  # bounded: ~5 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


def test_it_is_restarted_when_it_exits_and_stopped_with_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helper, "RESTART_DELAY", 0.01)
    crashing = Supervised("crashing", [str(_script(tmp_path, "exit 3"))])

    async def scenario() -> None:
        crashing.start()
        await _until(lambda: crashing.starts >= 3)  # exited, restarted, again
        await crashing.stop()

    asyncio.run(scenario())


def test_stopping_terminates_a_running_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    running = Supervised(
        "running", [str(_script(tmp_path, f"echo $$ > {pid_file}\nexec sleep 60"))]
    )

    async def scenario() -> int:
        running.start()
        await _until(lambda: running.running and pid_file.exists())
        pid = int(pid_file.read_text())
        await running.stop()
        return pid

    pid = asyncio.run(scenario())
    assert not running.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_missing_binary_is_said_once_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = rpc_server(tmp_path, "127.0.0.1:50052", 1)

    async def scenario() -> None:
        missing.start()
        await asyncio.sleep(0.1)
        await missing.stop()

    asyncio.run(scenario())
    assert missing.starts == 0
    assert f"{tmp_path}/bin/rpc-server not found" in caplog.text
