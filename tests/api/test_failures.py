"""What clients see when the engine fails, on every surface: the whole app in-process (with its
lifespan) around the real model, failures injected through the engine's fault seam.

A failed step: a 500 `engine_error` envelope (plain), an error event (SSE, WebSocket), and the
next request is served. A model that gave up, or failed to load: /health says `error` with the
reason, and a request loads it again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from thoxd.app import create_app, engine_config
from thoxd.catalog.entries import Catalog
from thoxd.engine import Engine, Faults
from thoxd.engine.scheduler import MAX_FAILURES
from thoxd.settings import Settings

MODEL = "thox-coder"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count to ten."}],
    "max_tokens": 8,
}


class Armed(Faults):
    """Generation decodes fail (-1) while `decodes` > 0, embedding chunks raise while `embeds`
    > 0, and loads raise while `loads` > 0; each failure counts one down."""

    def __init__(self) -> None:
        self.decodes = 0
        self.embeds = 0
        self.loads = 0

    def decode(self, model_id: str, n_tokens: int) -> int | None:
        if self.decodes > 0:
            self.decodes -= 1
            return -1
        return None

    def embed(self, model_id: str, n_tokens: int) -> None:
        if self.embeds > 0:
            self.embeds -= 1
            raise RuntimeError("injected")

    def load(self, model_id: str) -> None:
        if self.loads > 0:
            self.loads -= 1
            raise RuntimeError("injected")


def _client(tmp: Path, models_dir: Path, catalog: Catalog, faults: Faults) -> TestClient:
    settings = Settings(
        state_dir=tmp / "state", models_dir=models_dir, mdns=False, slots=2, draft_max=0
    )
    config = dataclasses.replace(engine_config(settings), faults=faults)
    app = create_app(settings, catalog=catalog, engine=Engine(catalog, config))
    return TestClient(app, base_url="http://127.0.0.1:8080", client=("127.0.0.1", 40000))


@pytest.fixture(scope="module")
def faults() -> Armed:
    return Armed()


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, catalog: Catalog, faults: Armed
) -> Iterator[TestClient]:
    with _client(tmp_path_factory.mktemp("failures"), models_dir, catalog, faults) as client:
        client.post("/models/load", json={"model_id": MODEL}).raise_for_status()
        yield client


def _assert_engine_error(error: dict[str, object]) -> None:
    assert error["code"] == "engine_error"
    assert error["type"] == "server_error"
    assert "Traceback" not in str(error["message"])


def test_a_failed_step_is_a_500_envelope_and_the_next_request_is_served(
    client: TestClient, faults: Armed
) -> None:
    faults.decodes = 1
    failed = client.post("/v1/chat/completions", json=CHAT)
    assert failed.status_code == 500
    _assert_engine_error(failed.json()["error"])
    served = client.post("/v1/chat/completions", json=CHAT)
    assert served.status_code == 200
    assert served.json()["choices"][0]["message"]["content"]


def test_a_failed_step_ends_an_sse_stream_with_an_error_event(
    client: TestClient, faults: Armed
) -> None:
    faults.decodes = 1
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as stream:
        assert stream.status_code == 200
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    _assert_engine_error(json.loads(events[-1])["error"])
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_failed_step_on_the_responses_api_is_a_500_then_a_failed_response(
    client: TestClient, faults: Armed
) -> None:
    body = {"model": MODEL, "input": "Count to ten.", "max_output_tokens": 8}
    faults.decodes = 1
    failed = client.post("/v1/responses", json=body)
    assert failed.status_code == 500
    _assert_engine_error(failed.json()["error"])
    faults.decodes = 1
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        assert stream.status_code == 200
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "response.failed"
    response = events[-1]["response"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert "Traceback" not in response["error"]["message"]
    assert client.post("/v1/responses", json=body).status_code == 200


def test_a_failed_step_is_an_error_event_and_the_socket_serves_on(
    client: TestClient, faults: Armed
) -> None:
    faults.decodes = 1
    with client.websocket_connect("ws://127.0.0.1:8080/v1/stream") as ws:
        ws.send_json({**CHAT, "id": "a"})
        while (event := ws.receive_json())["type"] == "delta":
            pass
        assert event["type"] == "error"
        assert event["id"] == "a"
        _assert_engine_error(event["error"])
        ws.send_json({**CHAT, "id": "b"})
        while (event := ws.receive_json())["type"] == "delta":
            pass
        assert event == {**event, "type": "done", "id": "b"}


def test_a_failed_embedding_is_a_500_envelope(client: TestClient, faults: Armed) -> None:
    faults.embeds = 1
    body = {"model": MODEL, "input": "The cat sat on the mat."}
    failed = client.post("/v1/embeddings", json=body)
    assert failed.status_code == 500
    _assert_engine_error(failed.json()["error"])
    served = client.post("/v1/embeddings", json=body)
    assert served.status_code == 200
    assert len(served.json()["data"][0]["embedding"]) > 0


def test_a_model_that_gave_up_shows_in_health_and_reloads_on_request(
    client: TestClient, faults: Armed
) -> None:
    for _ in range(MAX_FAILURES):
        faults.decodes = 1
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 500
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "error"
    assert health.json()["error"] == f"{MAX_FAILURES} steps in a row failed"
    listed = client.get(f"/v1/models/{MODEL}").json()
    assert listed["state"] == "error"
    served = client.post("/v1/chat/completions", json=CHAT)
    assert served.status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_a_failed_load_at_start_is_an_error_in_health_not_loading(
    tmp_path: Path, models_dir: Path, catalog: Catalog
) -> None:
    faults = Armed()
    faults.loads = 1000
    with _client(tmp_path, models_dir, catalog, faults) as client:
        # The load at start runs in the background; a request for the model joins it, or
        # (once it has failed) tries again, and fails too while loads fail.
        refused = client.post("/models/load", json={"model_id": MODEL})
        assert refused.status_code == 500
        _assert_engine_error(refused.json()["error"])
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error"
        assert "RuntimeError" in health.json()["error"]
        faults.loads = 0
        assert client.post("/models/load", json={"model_id": MODEL}).status_code == 200
        assert client.get("/health").status_code == 200
