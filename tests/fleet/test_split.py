"""thoxd/fleet/split.py: a model split over llama.cpp RPC servers is served by a thoxd of its
own, so a server going away (llama.cpp then aborts its process) fails that model's requests
cleanly and leaves the daemon serving. The tests with a real rpc-server need scripts/build-rpc;
without it, the one with an unreachable server still runs."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon, free_port, until

BUILD = Path(__file__).resolve().parents[2] / "build" / "rpc"
built = pytest.mark.skipif(
    not (BUILD / "bin" / "rpc-server").exists(), reason="scripts/build-rpc was not run here"
)


def catalog(rpc_port: int) -> str:
    return f"""[[models]]
id = "local"
path = "gemma-3-270m-q4_k_m.gguf"
n_ctx = 1024

[[models]]
id = "split"
path = "gemma-3-270m-q4_k_m.gguf"
n_ctx = 1024
rpc = ["127.0.0.1:{rpc_port}"]
"""


def complete(box: Daemon, model: str, **kw: object) -> httpx.Response:
    body = {"model": model, "prompt": "Count: 1, 2, 3,", "max_tokens": 4, **kw}
    return httpx.post(box.url + "/v1/completions", json=body, timeout=60)


def start_rpc_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(BUILD / "bin" / "rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    until(listening, "rpc-server did not listen")
    return proc


@pytest.fixture
def daemon_with(tmp_path: Path, models_dir: Path) -> Iterator[Callable[[int], Daemon]]:
    started: list[Daemon] = []

    def start(rpc_port: int) -> Daemon:
        (tmp_path / "models.toml").write_text(catalog(rpc_port))
        box = Daemon(
            tmp_path, models_dir, "--catalog", str(tmp_path / "models.toml"),
            "--default-model", "local", "--mdns", "false", "--slots", "1", "--threads", "1",
        )  # fmt: skip
        started.append(box)
        box.wait_ready()
        return box

    yield start
    for box in started:
        box.stop()


def test_a_split_model_whose_server_is_away_fails_alone(
    daemon_with: Callable[[int], Daemon],
) -> None:
    box = daemon_with(free_port())  # nobody listens there
    failed = complete(box, "split")
    assert failed.status_code in (500, 502)  # its process says why, or is still starting
    assert failed.json()["error"]["code"] in ("engine_error", "peer_unavailable")
    assert "Traceback" not in failed.text
    assert complete(box, "local").status_code == 200
    assert box.proc.poll() is None


@built
def test_losing_the_rpc_server_fails_the_split_model_not_the_daemon(
    daemon_with: Callable[[int], Daemon],
) -> None:
    port = free_port()
    server = start_rpc_server(port)
    box = daemon_with(port)
    try:
        served = complete(box, "split")
        assert served.status_code == 200, served.text
        assert served.headers["x-thox-served-by"] == "split (own process)"
        assert served.json()["choices"][0]["text"].startswith(" 4")
        body = {"model": "split", "prompt": "Count: 1,", "max_tokens": 400, "stream": True}
        with httpx.stream(
            "POST", box.url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=60
        ) as stream:
            events = []
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        server.kill()  # llama.cpp aborts the process holding the model
        assert '"peer_unavailable"' in events[-1]
        assert box.proc.poll() is None  # the daemon is still here
        assert complete(box, "local").status_code == 200
        server = start_rpc_server(port)
        until(lambda: complete(box, "split").status_code == 200, "the split model never came back")
    finally:
        server.kill()
        server.wait()
