"""The real daemon on a loopback port, driven by the official OpenAI SDK and raw sockets."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Daemon
from thoxd.catalog.entries import ModelSpec


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="not-required", max_retries=0)


# Greedy counting never reaches an end of text: generations run until max_tokens or cancel.
# Greedy counting runs on for as long as it is allowed to. The catalog's repeat penalty would
# make it leave the sequence (and sometimes end early), so it is off.
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "repeat_penalty": 1.0}
NO_PENALTY = {"repeat_penalty": 1.0}


# -- the device docs' examples ---------------------------------------------------------------


def test_device_docs_chat_example(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="thox-coder",
        messages=[{"role": "user", "content": "Write a quicksort in Python"}],
        max_tokens=32,
    )
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == "thox-coder"
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )
    timings = response.model_extra["timings"]  # type: ignore[index]
    assert timings["predicted_n"] == response.usage.completion_tokens
    assert timings["predicted_per_second"] > 0


def test_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="thox-coder",
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    assert 0 < usage_chunks[0].usage.completion_tokens <= 24  # type: ignore[union-attr]
    # The same request without streaming gives the same text (greedy).
    plain = client.chat.completions.create(
        model="thox-coder",
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=24,
        temperature=0,
    )
    assert plain.choices[0].message.content == text


def test_completions_with_a_list_of_prompts(client: openai.OpenAI) -> None:
    # Counting: confident greedy text, the same alone or beside another sequence (free text can
    # diverge between llama.cpp's one-row and multi-row kernels; README, "Concurrency").
    prompts = ["1, 2, 3, 4, 5, 6,", "10, 20, 30, 40, 50,"]
    response = client.completions.create(
        model="thox-coder", prompt=prompts, max_tokens=6, temperature=0, extra_body=NO_PENALTY
    )
    assert response.object == "text_completion"
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.text for c in response.choices)
    alone = client.completions.create(
        model="thox-coder", prompt=prompts[1], max_tokens=6, temperature=0, extra_body=NO_PENALTY
    )
    assert alone.choices[0].text == response.choices[1].text
    assert response.choices[0].text.startswith(" 7, 8")


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    def run() -> str | None:
        return client.completions.create(
            model="thox-coder", prompt="Once upon a time", max_tokens=16, temperature=1.0,
            seed=42,
        ).choices[0].text  # fmt: skip

    assert run() == run()


def test_stop_and_max_tokens(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model="thox-coder", prompt="1, 2, 3,", max_tokens=12, temperature=0
    ).choices[0]
    assert full.finish_reason == "length"
    stop = full.text.strip()[:2]
    cut = client.completions.create(
        model="thox-coder", prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text


def test_embeddings(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="thox-coder", input=["hello world", "goodbye"])
    assert [d.index for d in response.data] == [0, 1]
    for d in response.data:
        assert math.isclose(math.sqrt(sum(v * v for v in d.embedding)), 1.0, rel_tol=1e-3)
    assert response.usage.prompt_tokens > 0
    # The SDK asks for base64 by default when numpy is absent or present: both decode the same.
    single = client.embeddings.create(model="thox-coder", input="hello world")
    assert single.data[0].embedding == pytest.approx(response.data[0].embedding, abs=1e-5)


def test_models_list_and_retrieve(client: openai.OpenAI, default_spec: ModelSpec) -> None:
    models = client.models.list().data
    entry = next(m for m in models if m.id == default_spec.id)
    extra = entry.model_extra or {}
    assert extra["context_window"] == 8192
    assert "thox-coder" in extra["aliases"]
    assert set(extra["capabilities"]) >= {"chat", "completion", "embeddings"}
    assert extra["state"] == "loaded"
    assert client.models.retrieve("thox-coder").id == default_spec.id


# -- errors, as the SDK surfaces them -------------------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 5), ("temperature", "hot"), ("max_tokens", -1), ("n", 99), ("top_p", 2),
     ("stop", ["a", "b", "c", "d", "e"]), ("messages", "hi")],
)  # fmt: skip
def test_bad_parameters_are_400_naming_the_param(
    client: openai.OpenAI, field: str, value: object
) -> None:
    body = {"model": "thox-coder", "messages": [{"role": "user", "content": "x"}], field: value}
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body=body, cast_to=httpx.Response)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field


TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [("/completions", {"suffix": "return x"}, "suffix"),  # Gemma has no FIM tokens
     ("/completions", {"logprobs": 1, "echo": True}, "logprobs")],
)  # fmt: skip
def test_output_we_cannot_give_is_refused_not_ignored(
    client: openai.OpenAI, path: str, fields: dict[str, object], param: str
) -> None:
    base: dict[str, object] = {"model": "gemma-3-270m", "max_tokens": 2, "prompt": "x"}
    with pytest.raises(openai.BadRequestError) as info:
        client.post(path, body={**base, **fields}, cast_to=httpx.Response)
    assert info.value.code == "unsupported_parameter"
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param


def test_options_that_change_nothing_are_accepted(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="thox-coder",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        logprobs=False,
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert response.choices[0].message.content
    assert response.choices[0].logprobs is None


def test_overlong_prompt_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="thox-coder", prompt="hello " * 9000, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    body = info.value.body
    assert isinstance(body, dict)
    assert body["n_ctx"] == 8192 and body["n_prompt_tokens"] > 8192


def test_huge_max_tokens_is_accepted_and_bounded(daemon: Daemon) -> None:
    body = {"model": "thox-coder", "prompt": "Tell me a story.", "max_tokens": 10**9,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", daemon.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert any(line.startswith("data: {") for line in lines)
    daemon.wait_idle()


def test_raw_http_errors(daemon: Daemon) -> None:
    url = daemon.url + "/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["message"] == "The request body is not valid JSON."

    huge = b'{"model": "thox-coder", "messages": [], "pad": "' + b"x" * (2 << 20) + b'"}'
    too_big = httpx.post(url, content=huge)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "payload_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"model": "thox-coder", "pad": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    json_type = {"content-type": "application/json"}
    assert httpx.post(url, content=chunked(), headers=json_type).status_code == 413
    assert httpx.get(daemon.url + "/v1/nope").json()["error"]["code"] == "not_found"
    for response in (bad_json, too_big):
        text = response.text
        assert "Traceback" not in text and "/root" not in text and "site-packages" not in text


def test_queue_full_is_503_with_retry_after(daemon: Daemon) -> None:
    """2 slots + a queue of 2: the fifth concurrent request is refused, the others run."""
    body = {"model": "thox-coder", **COUNTING, "max_tokens": 400, "stream": True}
    daemon.wait_idle(timeout=30.0)  # the daemon is shared: start from empty slots
    with httpx.Client(timeout=30) as http, contextlib.ExitStack() as streams:
        # Each stream's context manager is kept: a dropped one would close its response.
        for _ in range(4):
            response = streams.enter_context(
                http.stream("POST", daemon.url + "/v1/completions", json=body)
            )
            assert response.status_code == 200
        assert daemon.busy() == 4  # 2 running, 2 waiting: none has ended early
        refused = http.post(daemon.url + "/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
    daemon.wait_idle()


# -- disconnects and a responsive event loop -------------------------------------------------


def _raw_post(daemon: Daemon, body: dict[str, object]) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_slot(daemon: Daemon, stream: bool) -> None:
    body = {"model": "thox-coder", **COUNTING, "max_tokens": 3000, "stream": stream}
    cancelled = daemon.cancelled()
    sock = _raw_post(daemon, body)
    try:
        deadline = time.monotonic() + 10
        while not daemon.busy():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if stream:
            received = b""
            while b"data:" not in received:
                received += sock.recv(4096)
    finally:
        sock.close()
    daemon.wait_idle(timeout=60)
    assert daemon.cancelled() == cancelled + 1  # stopped because the client left, not at its end


def test_health_answers_while_generating(daemon: Daemon) -> None:
    """The event loop is never blocked by generation: /health answers between the tokens of a
    running stream, which keeps streaming meanwhile."""
    body = {"model": "thox-coder", **COUNTING, "max_tokens": 3000, "stream": True}
    with (
        httpx.Client(base_url=daemon.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as stream,
    ):
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        for _ in range(20):
            health = httpx.get(daemon.url + "/health")
            assert health.status_code == 200
            # Answered while the generation runs, not after it: the loop was free.
            assert sum(m["running"] for m in health.json()["models"].values()) >= 1
            assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
    daemon.wait_idle(timeout=60)


def test_daemon_still_serves_after_all_of_the_above(client: openai.OpenAI) -> None:
    response = client.completions.create(model="thox-coder", prompt="Hello", max_tokens=4)
    assert response.choices[0].text is not None
