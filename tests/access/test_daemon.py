"""Keys, usage and fair share on the real daemon (an owner key, a fresh state directory), with
the OpenAI SDK: what the issue's probe does, restarts included."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import Daemon

OWNER = "the-owner-key-of-this-test-box"
MODEL = "thox-coder"
# SmolLM2's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>), banned so that a
# completion runs to max_tokens: the flood's length is known, whatever the text.
NO_END = {"0": -100, "1": -100, "2": -100}

pytestmark = pytest.mark.slow


class Box:
    def __init__(self, tmp: Path, models_dir: Path) -> None:
        self.tmp, self.models_dir = tmp, models_dir
        self.state = tmp / "state"
        self.daemon = self.start()

    def start(self) -> Daemon:
        d = Daemon(
            self.tmp, self.models_dir, "--slots", "2", "--state-dir", str(self.state),
            env={"THOXD_OWNER_KEY": OWNER},
        )  # fmt: skip
        d.wait_ready()
        return d

    def restart(self, kill: bool = False) -> None:
        if kill:
            self.daemon.proc.kill()
            self.daemon.proc.wait()
            self.daemon.stop()  # closes its log
        else:
            assert self.daemon.stop() == 0
        self.daemon = self.start()

    def call(self, method: str, path: str, key: str | None = OWNER, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.daemon.url + path, headers=headers, timeout=60, **kw)

    def new_key(self, name: str, **limits: int) -> dict[str, Any]:
        body = {"name": name, "rate_limit": limits} if limits else {"name": name}
        response = self.call("POST", "/api/keys", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.daemon.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("keys"), models_dir)
    try:
        yield b
    finally:
        b.daemon.stop()


def test_keys_usage_and_revocations_survive_restarts(box: Box) -> None:
    alice, mallory = box.new_key("alice"), box.new_key("mallory")
    with pytest.raises(openai.AuthenticationError):
        box.sdk("not-a-key").models.list()
    answer = box.sdk(alice["key"]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6
    )
    assert answer.usage is not None
    served = answer.usage.total_tokens
    usage = box.call("GET", "/v1/usage", alice["key"]).json()
    assert (usage["total_tokens"], usage["total_requests"]) == (served, 1)
    assert usage["key_id"] == alice["id"] and usage["tokens_today"] == served
    assert box.call("DELETE", f"/api/keys/{mallory['id']}").status_code == 200

    box.restart()  # SIGTERM: everything written
    assert box.call("GET", "/v1/models", alice["key"]).status_code == 200
    assert box.call("GET", "/v1/models", mallory["key"]).status_code == 401
    everyone = box.call("GET", "/v1/usage").json()
    assert everyone["by_key"][alice["id"]]["total_tokens"] == served
    one = box.call("GET", "/v1/usage", params={"key_id": alice["id"]}).json()
    assert one["total_tokens"] == served

    # SIGKILL after the ledger's writer has written: nothing counted is lost.
    box.sdk(alice["key"]).completions.create(model=MODEL, prompt="1, 2,", max_tokens=3)
    database = box.state / "access.db"
    for _ in range(200):  # bounded: the writer runs once a second
        with sqlite3.connect(database) as db:
            [(requests,)] = db.execute("SELECT sum(requests) FROM usage").fetchall()
        if requests == 2:
            break
        time.sleep(0.05)
    box.restart(kill=True)
    assert box.call("GET", "/v1/usage", alice["key"]).json()["total_requests"] == 2

    # No key is kept in clear anywhere in the state directory.
    for path in box.state.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert alice["key"].encode() not in data and mallory["key"].encode() not in data
            assert OWNER.encode() not in data


def test_a_flood_from_one_key_does_not_hold_back_anothers_request(box: Box) -> None:
    flooder = box.new_key("flood", requests_per_minute=600, burst=100)["key"]
    single = box.new_key("single")["key"]
    finished: list[str] = []
    lock = threading.Lock()

    def complete(key: str, name: str, max_tokens: int) -> None:
        box.sdk(key).completions.create(
            model=MODEL, prompt="1, 2, 3,", max_tokens=max_tokens, logit_bias=NO_END
        )
        with lock:
            finished.append(name)

    flood = [threading.Thread(target=complete, args=(flooder, f"flood-{i}", 48)) for i in range(6)]
    for thread in flood:
        thread.start()
    for _ in range(600):  # until 2 run and 4 wait (bounded)
        health = box.call("GET", "/health").json()["models"]
        if sum(m["waiting"] for m in health.values()) == 4:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the flood never queued")
    complete(single, "single", 4)
    for thread in flood:
        thread.join(timeout=300)
    # FIFO would run four of the flood's requests before it; fair share, one slot turnover.
    assert finished.index("single") <= 2, finished
    assert len(finished) == 7


def test_mcp_tool_calls_count_against_the_key(box: Box) -> None:
    key = box.new_key("ide", requests_per_minute=6, burst=2)["key"]

    async def session() -> list[bool]:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,  # the MCP SDK's httpx
            streamable_http_client(box.daemon.url + "/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as mcp,
        ):
            await mcp.initialize()
            await mcp.list_tools()  # protocol messages (and the POSTs they are) do not count
            results = []
            for _ in range(3):
                result = await mcp.call_tool("thox_explain", {"code": "x = 1", "max_tokens": 2})
                results.append(result.is_error)
                if result.is_error:
                    assert "Rate limit reached" in str(result.content)
                    assert "Retry in" in str(result.content)
            return results

    assert asyncio.run(session()) == [False, False, True]
