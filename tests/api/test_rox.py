"""thoxd/api/rox.py: /chat (both documents' shapes in one answer) and /hf/generate."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon


def post(daemon: Daemon, path: str, body: Any) -> httpx.Response:
    return httpx.post(daemon.url + path, json=body, timeout=60)


def test_chat_answers_both_shapes(daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
    answer = post(daemon, "/chat", body).json()
    assert answer["content"] == answer["choices"][0]["message"]["content"]  # Rox / the server
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] <= 8


def test_chat_streams_content_events(daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 6}
    full = post(daemon, "/chat", {**body, "temperature": 0}).json()["content"]
    with httpx.stream(
        "POST", daemon.url + "/chat", json={**body, "temperature": 0, "stream": True}
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(set(e) == {"content"} for e in events)
    assert "".join(e["content"] for e in events) == full


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"temperature": 0.7}, ["body", "messages"], "value_error.missing"),
        ({"messages": "hi"}, ["body", "messages"], "list_type"),
        ({"messages": [{"role": "user"}]}, ["body", "messages", 0, "content"],
         "value_error.missing"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
         ["body", "temperature"], "float_type"),
    ],
)  # fmt: skip
def test_a_missing_or_invalid_field_is_422_with_its_place(
    daemon: Daemon, body: dict[str, Any], loc: list[Any], kind: str
) -> None:
    response = post(daemon, "/chat", body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc and error["type"] == kind and error["msg"]


def test_a_prompt_too_long_is_422_on_messages(daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 9000}]}
    response = post(daemon, "/chat", body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "messages"]


def test_an_unknown_model_is_a_detail_message(daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "model_id": "nope"}
    response = post(daemon, "/chat", body)
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_hf_generate(daemon: Daemon) -> None:
    body = {"inputs": "Write a haiku about technology", "parameters": {"max_new_tokens": 8}}
    [answer] = post(daemon, "/hf/generate", body).json()
    assert isinstance(answer["generated_text"], str) and answer["generated_text"]
    missing = post(daemon, "/hf/generate", {"parameters": {}})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "inputs"]
