"""Daemons for the guards' tests on a real socket: short deadlines, and a model that never loads
(so nothing competes for the CPU)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0


def absent_model_daemon(tmp: Path, *args: str, wrapper: tuple[str, ...] = ()) -> Daemon:
    """A daemon whose only model cannot load, once it answers /health (with 503)."""
    catalog = tmp / "models.toml"
    catalog.write_text(
        '[[models]]\nid = "absent"\npath = "absent.gguf"\nn_ctx = 256\n'
        'capabilities = ["completion"]\n'
    )
    d = Daemon(
        tmp,
        tmp / "models",
        "--catalog", str(catalog), "--default-model", "absent", "--mdns", "false", *args,
        wrapper=wrapper,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        if d.proc.poll() is not None:
            d.stop()
            raise RuntimeError(f"thoxd exited: {d.log()}")
        try:
            httpx.get(d.url + "/health", timeout=1)
            return d
        except httpx.TransportError:
            if time.monotonic() > deadline:
                d.stop()
                raise TimeoutError(f"thoxd not serving: {d.log()}") from None
            time.sleep(0.1)


@pytest.fixture(scope="package")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with 1 s deadlines whose only model cannot load: it serves, and idles."""
    d = absent_model_daemon(
        tmp_path_factory.mktemp("guarded"),
        "--header-timeout-seconds", str(HEADER_TIMEOUT),
        "--body-timeout-seconds", str(BODY_TIMEOUT),
    )  # fmt: skip
    try:
        yield d
    finally:
        d.stop()
