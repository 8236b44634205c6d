"""Child processes the daemon runs for the fleet, supervised: started with the daemon,
restarted when they exit (after RESTART_DELAY, doubling up to RESTART_MAX while they keep
failing), stopped with the daemon; their output goes to thoxd's log.

- llama.cpp's `rpc-server` (scripts/build-rpc) on `rpc_server`, when this box helps serve a
  model split over boxes (thoxd/engine/rpc.py). It has no authentication at all: whoever reaches
  its port can use this box's memory and compute; bind it to a network only the owner's boxes
  share.
- a thoxd of its own for each model split over RPC servers (`rpc_isolate`): llama.cpp aborts the
  process that holds such a model when one of its servers goes away, and that must be a child
  the daemon restarts, not the daemon (thoxd/fleet/split.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger("thoxd.fleet")

RESTART_DELAY = 1.0  # s
RESTART_MAX = 60.0
HEALTHY_AFTER = 30.0  # s running before a restart counts as a fresh start


class Supervised:
    def __init__(
        self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self._command = list(command)
        self._env = dict(env) if env is not None else None
        self._task: asyncio.Task[None] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self.starts = 0  # how many times it was started (restarts included)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"thoxd-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _supervise(self) -> None:
        delay = RESTART_DELAY
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not Path(self._command[0]).is_file():
                    logger.error("%s: %s not found", self.name, self._command[0])
                    return
                started = loop.time()
                self._process = await asyncio.create_subprocess_exec(
                    *self._command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._env,
                )
                self.starts += 1
                logger.info("%s started (pid %d)", self.name, self._process.pid)
                await self._log_output(self._process)
                code = await self._process.wait()
                if loop.time() - started > HEALTHY_AFTER:
                    delay = RESTART_DELAY
                logger.warning("%s exited (%s); restarting in %.0f s", self.name, code, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX)
        finally:
            await self._terminate()

    async def _log_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            logger.info("%s: %s", self.name, line.decode(errors="replace").rstrip()[:500])

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def rpc_server(build: Path, endpoint: str, threads: int) -> Supervised:
    """llama.cpp's rpc-server on `endpoint` (HOST:PORT)."""
    host, _, port = endpoint.rpartition(":")
    binary = build / "bin" / "rpc-server"
    return Supervised("rpc-server", [str(binary), "-H", host, "-p", port, "-t", str(threads)])
