"""thoxd/api/websocket.py: the /v1/stream WebSocket on the real daemon, driven by the websockets
client."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as connect_async
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from tests.conftest import Daemon

MODEL = "thox-coder"
# The device docs' example, verbatim: no "type", no "id".
DOCS_EXAMPLE = {"model": MODEL, "messages": [{"role": "user", "content": "Explain async/await"}]}
# Greedy counting never reaches an end of text: generations run until max_tokens or cancel.
# Greedy counting runs on for as long as it is allowed to; the catalog's repeat penalty would
# make it leave the sequence (and sometimes end early), so it is off.
COUNTING = {
    "model": MODEL,
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
    "temperature": 0,
    "repeat_penalty": 1.0,
}
LONG = {**COUNTING, "max_tokens": 3000}

DELTA_KEYS = {"type", "id", "model", "choices"}
DONE_KEYS = {"type", "id", "model", "finish_reason", "usage", "timings"}
ERROR_KEYS = {"message", "type", "param", "code", "status"}


def ws_url(daemon: Daemon) -> str:
    return f"ws://127.0.0.1:{daemon.port}/v1/stream"


def open_ws(daemon: Daemon, origin: str | None = None) -> ClientConnection:
    return connect(
        ws_url(daemon), origin=Origin(origin) if origin else None, proxy=None, open_timeout=10
    )


@pytest.fixture
def ws(daemon: Daemon) -> Iterator[ClientConnection]:
    with open_ws(daemon) as conn:
        yield conn
    daemon.wait_idle()


def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    ws.send(json.dumps(message))


def recv(ws: ClientConnection, timeout: float = 30.0) -> dict[str, Any]:
    event = json.loads(ws.recv(timeout=timeout))
    assert isinstance(event, dict)
    return event


def check_shape(event: dict[str, Any]) -> None:
    """Every event matches its documented shape exactly."""
    if event["type"] == "delta":
        assert set(event) == DELTA_KEYS
        assert event["choices"] == [
            {"index": 0, "delta": {"content": event["choices"][0]["delta"]["content"]}}
        ]
        assert isinstance(event["choices"][0]["delta"]["content"], str)
    elif event["type"] == "done":
        assert set(event) == DONE_KEYS
        u = event["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert event["timings"]["predicted_n"] == u["completion_tokens"]
    elif event["type"] == "error":
        assert set(event) == {"type", "id", "error"}
        assert set(event["error"]) >= ERROR_KEYS
    else:
        assert event == {"type": "pong"}


def until_done(ws: ClientConnection, ids: set[str]) -> list[dict[str, Any]]:
    """Events in arrival order until each of `ids` has its done or error; none after it."""
    events: list[dict[str, Any]] = []
    finished: set[str] = set()
    while finished != ids:
        event = recv(ws)
        check_shape(event)
        assert event["id"] in ids and event["id"] not in finished, event
        events.append(event)
        if event["type"] != "delta":
            finished.add(event["id"])
    return events


def of(events: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["id"] == request_id]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"]["content"] for e in events if e["type"] == "delta")


def first_delta(ws: ClientConnection) -> dict[str, Any]:
    event = recv(ws)
    assert event["type"] == "delta", event
    return event


# -- requests --------------------------------------------------------------------------------


def test_device_docs_example(ws: ClientConnection) -> None:
    send(ws, {**DOCS_EXAMPLE, "max_tokens": 16})
    content = []
    while True:
        data = recv(ws)
        check_shape(data)
        if data["type"] != "delta":
            break
        content.append(data.get("choices", [{}])[0].get("delta", {}).get("content"))
    assert data["type"] == "done"
    assert all(isinstance(c, str) for c in content) and "".join(content)
    assert data["id"].startswith("chatcmpl-") and data["model"] == MODEL
    assert data["finish_reason"] in ("stop", "length")
    assert 0 < data["usage"]["completion_tokens"] <= 16
    assert data["timings"]["predicted_per_second"] > 0


def test_completion_with_client_id_matches_rest(ws: ClientConnection, daemon: Daemon) -> None:
    body = {**COUNTING, "max_tokens": 12}
    send(ws, {**body, "id": "mine-1", "type": "request", "stream": False})
    events = until_done(ws, {"mine-1"})
    assert all(e["id"] == "mine-1" for e in events)
    done = events[-1]
    rest = httpx.post(daemon.url + "/v1/completions", json=body, timeout=30).json()
    assert text_of(events) == rest["choices"][0]["text"]
    assert done["finish_reason"] == rest["choices"][0]["finish_reason"] == "length"
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [done["usage"][k] for k in counts] == [rest["usage"][k] for k in counts]
    # The REST request found the prompt in the cache the WebSocket request left.
    assert (
        rest["usage"]["prompt_tokens_details"]["cached_tokens"]
        == rest["usage"]["prompt_tokens"] - 1
    )


def test_server_makes_an_id_for_completions(ws: ClientConnection) -> None:
    send(ws, {**COUNTING, "max_tokens": 4})
    event = recv(ws)
    request_id = event["id"]
    assert request_id.startswith("cmpl-")
    until_done(ws, {request_id})


def test_two_requests_interleave_on_one_socket(ws: ClientConnection) -> None:
    send(ws, {**COUNTING, "max_tokens": 30, "id": "a"})
    send(ws, {**DOCS_EXAMPLE, "max_tokens": 30, "temperature": 0, "id": "b"})
    events = until_done(ws, {"a", "b"})
    for request_id in ("a", "b"):
        mine = of(events, request_id)
        assert [e["type"] for e in mine] == ["delta"] * (len(mine) - 1) + ["done"]
        assert text_of(mine)
    # Both decode in the same steps, so their deltas arrive interleaved, told apart by id.
    order = [e["id"] for e in events if e["type"] == "delta"]
    last = {rid: len(order) - 1 - order[::-1].index(rid) for rid in ("a", "b")}
    assert order.index("b") < last["a"] and order.index("a") < last["b"], order


# -- cancel and disconnect --------------------------------------------------------------------


def test_cancel_answers_with_done_and_frees_the_slot(ws: ClientConnection, daemon: Daemon) -> None:
    send(ws, {**LONG, "id": "long"})
    assert first_delta(ws)["id"] == "long"
    send(ws, {"type": "cancel", "id": "long"})
    done = until_done(ws, {"long"})[-1]
    assert done["finish_reason"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 3000
    daemon.wait_idle()


def test_cancel_of_an_unknown_id_is_an_error(ws: ClientConnection) -> None:
    send(ws, {"type": "cancel", "id": "nope"})
    event = recv(ws)
    check_shape(event)
    assert event["id"] == "nope"
    assert event["error"]["code"] == "not_found" and event["error"]["param"] == "id"


def test_duplicate_id_in_flight_is_an_error(ws: ClientConnection) -> None:
    send(ws, {**LONG, "id": "dup"})
    send(ws, {**COUNTING, "max_tokens": 4, "id": "dup"})
    while (event := recv(ws))["type"] == "delta":
        pass
    assert event["type"] == "error" and event["id"] == "dup"
    assert event["error"]["param"] == "id"
    send(ws, {"type": "cancel", "id": "dup"})
    assert until_done(ws, {"dup"})[-1]["finish_reason"] == "cancelled"


def test_queue_full_is_an_error_event(ws: ClientConnection) -> None:
    """2 slots + a queue of 2: the fifth request on the socket is refused, the others run."""
    ids = {f"q{i}" for i in range(5)}
    for request_id in sorted(ids):
        send(ws, {**LONG, "id": request_id})
    refused = None
    while refused is None:
        event = recv(ws)
        if event["type"] == "error":
            refused = event
    assert refused["error"]["code"] == "queue_full"
    for request_id in ids - {refused["id"]}:
        send(ws, {"type": "cancel", "id": request_id})
    events = until_done(ws, ids - {refused["id"]})
    assert [e["finish_reason"] for e in events if e["type"] == "done"] == ["cancelled"] * 4


@pytest.mark.parametrize("graceful", [True, False])
def test_disconnect_frees_the_slots(daemon: Daemon, graceful: bool) -> None:
    cancelled = daemon.cancelled()
    with open_ws(daemon) as ws:
        send(ws, {**LONG, "id": "x"})
        send(ws, {**LONG, "id": "y"})
        first_delta(ws)
        if graceful:
            ws.close()
        else:
            ws.close_socket()  # no closing handshake: the TCP connection just goes away
        daemon.wait_idle()
    # Both stopped because the socket went away, long before their 3000 tokens.
    assert daemon.cancelled() == cancelled + 2
    with open_ws(daemon) as again:
        send(again, {**COUNTING, "max_tokens": 4, "id": "next"})
        assert until_done(again, {"next"})[-1]["finish_reason"] == "length"


def test_cancel_of_a_waiting_request_answers_at_once(ws: ClientConnection) -> None:
    """Both slots busy: the third request waits in the queue, and cancelling it is prompt."""
    for request_id in ("r1", "r2", "w"):
        send(ws, {**LONG, "id": request_id})
    send(ws, {"type": "cancel", "id": "w"})
    deadline = time.monotonic() + 5.0
    try:
        while (event := recv(ws, timeout=max(0.01, deadline - time.monotonic())))["id"] != "w":
            pass
        assert event["type"] == "done" and event["finish_reason"] == "cancelled"
        assert event["usage"]["completion_tokens"] == 0
    finally:
        send(ws, {"type": "cancel", "id": "r1"})
        send(ws, {"type": "cancel", "id": "r2"})


# -- errors: an error event, and the connection stays open -------------------------------------

CHAT_X = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
ERROR_CASES: list[tuple[str, str | bytes, str | None, str, str | None]] = [
    # name, message, expected id ("*" = made by the server), expected code, expected param
    ("temperature", json.dumps({**CHAT_X, "temperature": 5, "id": "v"}), "v", "invalid_value",
     "temperature"),
    ("messages type", json.dumps({**CHAT_X, "messages": "hi", "id": "m"}), "m", "invalid_value",
     "messages"),
    ("unknown model", json.dumps({**CHAT_X, "model": "nope"}), "*", "model_not_found", "model"),
    ("context overflow", json.dumps({**COUNTING, "prompt": "hello " * 9000, "id": "big"}), "big",
     "context_length_exceeded", "prompt"),
    ("no messages or prompt", json.dumps({"model": MODEL, "id": "e"}), "e", "invalid_value",
     "messages"),
    ("several prompts", json.dumps({**COUNTING, "prompt": ["a", "b"], "id": "p"}), "p",
     "invalid_value", "prompt"),
    ("bad type", json.dumps({"type": "hello", "id": "t"}), "t", "invalid_value", "type"),
    ("bad id", json.dumps({**CHAT_X, "id": 7}), None, "invalid_value", "id"),
    ("long id", json.dumps({**CHAT_X, "id": "i" * 129}), None, "invalid_value", "id"),
    ("not json", "{not json", None, "invalid_value", None),
    ("not an object", "[1, 2]", None, "invalid_value", None),
    ("binary", json.dumps(CHAT_X).encode(), None, "invalid_value", None),
    # Raw JSON text with "\ud800", a lone surrogate: not Unicode, so never used nor echoed.
    ("surrogate in prompt", r'{"model": "thox-coder", "prompt": "a\ud800", "id": "s1"}', "s1",
     "invalid_value", "prompt"),
    ("surrogate in messages", r'{"model": "thox-coder", "messages": [{"role": "user",'
     r' "content": "\udc00"}], "id": "s2"}', "s2", "invalid_value", "messages[0].content"),
    ("surrogate in id", r'{"model": "thox-coder", "prompt": "a", "id": "s\ud800"}', None,
     "invalid_value", "id"),
    ("surrogate in cancel id", r'{"type": "cancel", "id": "\ud800"}', None, "invalid_value",
     "id"),
    ("surrogate in a key", r'{"model": "thox-coder", "prompt": "a", "id": "s3", "\ud800": 1}',
     "s3", "invalid_value", None),
    ("keep_alive 10**400", json.dumps({**CHAT_X, "keep_alive": 10**400, "id": "k1"}), "k1",
     "invalid_value", "keep_alive"),
    ("keep_alive -10**400", json.dumps({**CHAT_X, "keep_alive": -(10**400), "id": "k2"}), "k2",
     "invalid_value", "keep_alive"),
    ("keep_alive of 100 000 digits", json.dumps({**CHAT_X, "keep_alive": "1" * 100_000 + "x",
     "id": "k3"}), "k3", "invalid_value", "keep_alive"),
    ("token id 2**32", json.dumps({**COUNTING, "prompt": [2**32], "id": "t1"}), "t1",
     "invalid_value", "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("message", "expected_id", "code", "param"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_event_and_the_connection_stays_open(
    ws: ClientConnection, message: str | bytes, expected_id: str | None, code: str,
    param: str | None,
) -> None:  # fmt: skip
    ws.send(message)
    event = recv(ws)
    check_shape(event)
    assert event["type"] == "error"
    if expected_id == "*":
        assert event["id"].startswith("chatcmpl-")
    else:
        assert event["id"] == expected_id
    error = event["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert "Traceback" not in error["message"] and "site-packages" not in error["message"]
    if code == "context_length_exceeded":
        assert error["n_ctx"] == 8192 and error["n_prompt_tokens"] > 8192
    send(ws, {"type": "ping"})
    assert recv(ws) == {"type": "pong"}
    send(ws, {**COUNTING, "max_tokens": 2, "id": "after"})
    assert until_done(ws, {"after"})[-1]["type"] == "done"


def test_message_over_one_mib_closes_with_1009(ws: ClientConnection) -> None:
    padding = (1 << 20) - len('{"type":"ping","pad":""}')
    ws.send('{"type":"ping","pad":"' + "x" * padding + '"}')  # exactly 1 MiB: still fine
    assert recv(ws) == {"type": "pong"}
    ws.send('{"type":"ping","pad":"' + "x" * (padding + 1) + '"}')
    with pytest.raises(ConnectionClosed) as info:
        recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# -- Origin ---------------------------------------------------------------------------------


def test_foreign_origin_is_refused(daemon: Daemon) -> None:
    with pytest.raises(InvalidStatus) as info:
        open_ws(daemon, origin="https://evil.example")
    assert info.value.response.status_code == 403


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:{port}", "http://localhost:{port}"])
def test_own_origin_or_none_is_accepted(daemon: Daemon, origin: str | None) -> None:
    with open_ws(daemon, origin=origin.format(port=daemon.port) if origin else None) as ws:
        send(ws, {"type": "ping"})
        assert recv(ws) == {"type": "pong"}


# -- load: many requests on several sockets ---------------------------------------------------


def test_twenty_requests_on_four_sockets(daemon: Daemon) -> None:
    """Each socket sends its five requests at once; a full queue is retried; none is lost or
    answered twice."""

    async def one_socket(n: int) -> Counter[str]:
        bodies = {
            f"s{n}-{k}": {**COUNTING, "max_tokens": 6} if k % 2 else {**CHAT_X, "max_tokens": 6}
            for k in range(5)
        }
        finished: Counter[str] = Counter()
        async with connect_async(ws_url(daemon), proxy=None) as ws:
            for request_id, body in bodies.items():
                await ws.send(json.dumps({**body, "id": request_id}))
            while len(finished) < len(bodies):
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                check_shape(event)
                assert event["id"] in bodies, event
                if event["type"] == "done":
                    finished[event["id"]] += 1
                elif event["type"] == "error":
                    assert event["error"]["code"] == "queue_full", event
                    await asyncio.sleep(0.05)
                    await ws.send(json.dumps({**bodies[event["id"]], "id": event["id"]}))
            # Nothing is left to come: the next event answers this ping.
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"type": "pong"}
        return finished

    async def main() -> list[Counter[str]]:
        return await asyncio.gather(*(one_socket(n) for n in range(4)))

    # No deadline on the whole: on a loaded machine it takes longer; each recv has its own.
    results = asyncio.run(main())
    done = Counter[str]()
    for result in results:
        done.update(result)
    assert done == Counter({f"s{n}-{k}": 1 for n in range(4) for k in range(5)})
    daemon.wait_idle()
