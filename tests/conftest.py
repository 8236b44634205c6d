"""Shared fixtures: the real default model, and a real daemon on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

import thoxd.settings
from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.catalog.files import ensure_model_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load(REPO / "models.toml")


@pytest.fixture(scope="session")
def default_spec(catalog: Catalog) -> ModelSpec:
    return catalog.get("thox-coder")


@pytest.fixture(scope="session")
def gemma_spec(catalog: Catalog) -> ModelSpec:
    """Gemma 3 270M by its id, for tests of what is Gemma's own (its size, its vocabulary)."""
    return catalog.get("gemma-3-270m")


@pytest.fixture(scope="session")
def models_dir(catalog: Catalog) -> Path:
    """Every packaged catalog model's GGUF, assembled once per machine into a test cache: a
    daemon started on it can serve any of them."""
    root = Path(os.environ.get("THOXD_TEST_MODELS", Path.home() / ".cache" / "thoxd-test"))
    for spec in catalog:
        if spec.package is not None:
            ensure_model_file(spec, root)
    return root


@pytest.fixture(scope="session")
def model_file(models_dir: Path, default_spec: ModelSpec) -> Path:
    return models_dir / default_spec.path


@pytest.fixture(scope="session")
def gemma_file(models_dir: Path, gemma_spec: ModelSpec) -> Path:
    return models_dir / gemma_spec.path


GEMMA = "gemma.gguf"


@pytest.fixture
def clean_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No THOXD_* or systemd variables from the outside, and never /etc/thoxd/thoxd.toml."""
    for name in list(os.environ):
        if name.startswith("THOXD_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(thoxd.settings, "SYSTEM_CONFIG", tmp_path / "no-system-config.toml")


@pytest.fixture(scope="session")
def shelf(tmp_path_factory: pytest.TempPathFactory, gemma_file: Path) -> Path:
    """A models dir holding the Gemma file (as gemma.gguf) and a hostile file beside it, for
    catalogs that serve the one file under several ids."""
    root = tmp_path_factory.mktemp("models")
    try:
        os.link(gemma_file, root / GEMMA)
    except OSError:  # another filesystem
        shutil.copyfile(gemma_file, root / GEMMA)
    # A GGUF header whose first key claims 2**40 bytes: the gate must refuse it unread.
    (root / "hostile.gguf").write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
        + (1 << 40).to_bytes(8, "little") + b"x" * 64
    )  # fmt: skip
    return root


def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition`; `timeout` only bounds the wait (past it the state never came)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A real `thoxd serve` subprocess on loopback."""

    def __init__(
        self,
        tmp: Path,
        models_dir: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        module: str = "thoxd",
    ) -> None:
        """`env` is added to this process's environment; `wrapper` comes before the command
        (it must exec it, so that the process id stays the daemon's); `module` is what
        `python -m` runs (tests.faulty_daemon: the daemon with an injected fault)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"thoxd-{self.port}.log"
        self._log = self.log_path.open("w")
        cmd = [
            *wrapper, sys.executable, "-m", module, "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--state-dir", str(tmp / f"state-{self.port}"),
            "--models-dir", str(models_dir),
            *args,
        ]  # fmt: skip
        environ = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=environ)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"thoxd exited: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"thoxd not ready: {self.log()}")

    def busy(self) -> int:
        """Requests running or waiting, from /health."""
        models = httpx.get(self.url + "/health").json()["models"]
        return sum(m["running"] + m["waiting"] for m in models.values())

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no request runs or waits; `timeout` only bounds the wait (past it the slots
        were never freed: a failure of state, whatever the machine's speed)."""
        start = time.monotonic()
        while self.busy():
            assert time.monotonic() - start < timeout, "slots were not freed"
            time.sleep(0.02)

    def cancelled(self) -> float:
        """Generations that ended cancelled (a client left, or cancelled), from /metrics,
        summed over the models (the counter has a line per model)."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in httpx.get(self.url + "/metrics").text.splitlines()
            if line.startswith("thoxd_generations_total{") and '"cancelled"' in line
        )

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    # Two slots and a queue of two keep the overload tests small.
    d = Daemon(tmp_path_factory.mktemp("daemon"), models_dir, "--slots", "2", "--queue-size", "2")
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()
