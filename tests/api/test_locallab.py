"""thoxd/api/locallab.py: the /generate server's routes, driven by its own published client
(`locallab-client`) and by its docs' curl examples, on the real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from locallab_client import SyncLocalLabClient

from tests.conftest import Daemon
from thoxd.api.locallab import sse_text

GREEDY = {"do_sample": False, "max_length": 12}


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[SyncLocalLabClient]:
    c = SyncLocalLabClient(daemon.url)
    try:
        yield c
    finally:
        c.close()


def sse_events(text: str) -> list[str]:
    """The data of each event, read as the SSE spec says (one space after the colon dropped,
    the lines of one event joined by newlines)."""
    events, lines = [], []
    for line in text.split("\n"):
        if line == "":
            if lines:
                events.append("\n".join(lines))
                lines = []
        elif line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
    return events


def test_sse_text_frames_a_piece_of_several_lines_as_the_spec_says() -> None:
    for piece in ["plain", " leading space", "two\nlines", "\n", "end\n", "a\n\nb"]:
        assert sse_events(sse_text(piece)) == [piece]


def test_the_client_generates_streams_and_batches(client: SyncLocalLabClient) -> None:
    text = client.generate("Say hello", max_length=8)
    assert isinstance(text, str) and text
    streamed = "".join(client.stream_generate("Count: 1, 2, 3,", max_length=8))
    assert streamed and not streamed.startswith("\nError")
    batch: dict[str, Any] = client.batch_generate(["A haiku", "A joke", "A fact"], max_length=4)
    assert len(batch["responses"]) == 3 and all(isinstance(r, str) for r in batch["responses"])
    assert batch["usage"]["completion_tokens"] <= 12
    chat = client.chat([{"role": "user", "content": "Hi!"}], max_length=6)
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["total_tokens"] == (
        chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )


def test_the_client_manages_models_and_reads_the_device(client: SyncLocalLabClient) -> None:
    assert client.health_check()
    assert {m["id"] for m in client.list_models()} >= {"smollm2-135m-instruct", "gemma-3-270m"}
    assert client.load_model("gemma3")
    assert client.get_current_model()["model_id"] == "gemma-3-270m"
    assert client.unload_model()  # the current model: gemma, the most recently used
    assert client.get_current_model()["model_id"] == "smollm2-135m-instruct"
    assert "cpu" in client.get_system_info()


def test_generate_in_the_docs_shape_and_greedy_is_repeatable(daemon: Daemon) -> None:
    body = {"prompt": "Explain quantum computing in simple terms", **GREEDY}
    first = httpx.post(daemon.url + "/generate", json=body, timeout=60).json()
    assert set(first) == {"response", "model", "usage"}
    assert first["model"] == "smollm2-135m-instruct"  # model_id null: the default model
    usage = first["usage"]
    assert usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = httpx.post(daemon.url + "/generate", json=body, timeout=60).json()
    assert again["response"] == first["response"]  # do_sample false: greedy
    with httpx.stream("POST", daemon.url + "/generate", json={**body, "stream": True}) as r:
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    assert "".join(events[:-1]) == first["response"]  # the pieces are the raw text


def test_the_prompt_is_a_users_turn_for_a_chat_model(daemon: Daemon) -> None:
    generated = httpx.post(
        daemon.url + "/generate", json={"prompt": "Name a color.", **GREEDY}, timeout=60
    ).json()
    chat = httpx.post(
        daemon.url + "/v1/chat/completions",
        json={
            "model": "thox-coder",
            "messages": [{"role": "user", "content": "Name a color."}],
            "max_tokens": 12,
            "temperature": 0,
            "repeat_penalty": 1.15,
            "top_k": 80,
            "top_p": 0.9,
        },
        timeout=60,
    ).json()
    assert generated["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    assert generated["response"] == chat["choices"][0]["message"]["content"]


def test_model_id_picks_the_model(daemon: Daemon) -> None:
    body = {"prompt": "1, 2, 3,", "model_id": "gemma3", **GREEDY}
    answer = httpx.post(daemon.url + "/generate", json=body, timeout=60).json()
    assert answer["model"] == "gemma-3-270m"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": 5}, 400),
        ({"prompt": "x", "temperature": 9}, 400),
        ({}, 400),
        ({"prompt": "x", "model_id": "no-such-model"}, 404),
        ({"prompt": "word " * 9000}, 413),  # longer than the context: "Input too long"
    ],
)
def test_errors_are_detail_messages(daemon: Daemon, body: dict[str, Any], status: int) -> None:
    response = httpx.post(daemon.url + "/generate", json=body, timeout=60)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail


def test_batch_refuses_an_empty_list(daemon: Daemon) -> None:
    response = httpx.post(daemon.url + "/generate/batch", json={"prompts": []})
    assert response.status_code == 400 and "prompts" in response.json()["detail"]


def test_max_time_ends_the_generation_with_what_was_written(daemon: Daemon) -> None:
    # 2000 tokens in 50 ms: no machine decodes that fast, so the limit is what ends it.
    body = {"prompt": "Count from 1 to 2000, one number per line.", "max_length": 2000}
    answer = httpx.post(daemon.url + "/generate", json={**body, "max_time": 0.05}, timeout=60)
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] < 2000
    daemon.wait_idle()  # and its slot is free
