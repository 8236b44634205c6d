"""A daemon for the guards' tests on a real socket: short deadlines, and a model that never loads
(so nothing competes for the CPU)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Daemon

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0


@pytest.fixture(scope="package")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with 1 s deadlines whose only model cannot load: it serves, and idles."""
    tmp = tmp_path_factory.mktemp("guarded")
    catalog = tmp / "models.toml"
    catalog.write_text(
        '[[models]]\nid = "absent"\npath = "absent.gguf"\nn_ctx = 256\n'
        'capabilities = ["completion"]\n'
    )
    d = Daemon(
        tmp,
        tmp / "models",
        "--catalog", str(catalog), "--default-model", "absent", "--mdns", "false",
        "--header-timeout-seconds", str(HEADER_TIMEOUT),
        "--body-timeout-seconds", str(BODY_TIMEOUT),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert d.proc.poll() is None, d.log()
            try:
                httpx.get(d.url + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.1)
        yield d
    finally:
        d.stop()
