"""Several real daemons on loopback acting as one (thoxd/fleet/): found over mDNS, trusted by a
shared secret, requests forwarded by model and load, a peer killed mid-stream.

    A  gemma-3-270m, one slot             the box the client talks to
    B  gemma-3-270m, smollm2 ("smol")     takes A's overflow
    C  smollm2 ("smol"), c-only           the only box serving c-only
    D  d-only, another secret             found, listed untrusted, never used
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from openai import OpenAI

from tests.conftest import Daemon, until
from thoxd.fleet.trust import HEADER, FleetTrust

SECRET = "one-owners-fleet-secret"
GEMMA = """[[models]]
id = "gemma-3-270m"
path = "gemma-3-270m-q4_k_m.gguf"
n_ctx = 2048
chat_template = "gemma"
stop = ["<end_of_turn>", "<start_of_turn>"]
"""


def smol(model_id: str, aliases: str = "[]") -> str:
    return f'''[[models]]
id = "{model_id}"
aliases = {aliases}
path = "smollm2-135m-instruct-q4_1.gguf"
n_ctx = 2048
stop = ["<|im_end|>", "<|im_start|>"]
'''


BOXES = {
    "a": (GEMMA, "gemma-3-270m", SECRET, "1"),
    "b": (GEMMA + smol("smollm2", '["smol"]'), "gemma-3-270m", SECRET, "2"),
    "c": (smol("smollm2", '["smol"]') + smol("c-only"), "c-only", SECRET, "2"),
    "d": (smol("d-only"), "d-only", "another-owners-secret", "1"),
}


def peers_of(box: Daemon) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in httpx.get(box.url + "/fleet").json()["peers"]}


def install_id(box: Daemon) -> str:
    return str(httpx.get(box.url + "/fleet").json()["self"]["id"])


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[dict[str, Daemon]]:
    tmp = tmp_path_factory.mktemp("fleet")
    tag = secrets.token_hex(3)  # names of our own: other mDNS tests may run on this machine
    boxes: dict[str, Daemon] = {}
    try:
        for name, (catalog, default, secret, slots) in BOXES.items():
            (tmp / f"{name}.toml").write_text(catalog)
            boxes[name] = Daemon(
                tmp, models_dir,
                "--catalog", str(tmp / f"{name}.toml"), "--default-model", default,
                "--slots", slots, "--threads", "1", "--fleet-poll-seconds", "0.5",
                "--mdns", "true", "--mdns-loopback", "true", "--hostname", f"fleet-{tag}-{name}",
                env={"THOXD_FLEET_SECRET": secret},
            )  # fmt: skip
        for box in boxes.values():
            box.wait_ready()
        ids = {name: install_id(box) for name, box in boxes.items()}
        until(
            lambda: (
                {ids["b"], ids["c"], ids["d"]} <= set(peers_of(boxes["a"]))
                and ids["c"] in peers_of(boxes["b"])
            ),
            "the boxes did not find each other over mDNS",
        )
        yield boxes
    finally:
        for box in boxes.values():
            if box.proc.poll() is None:
                box.stop()


def test_boxes_find_each_other_over_mdns_and_trust_only_their_owners(
    fleet: dict[str, Daemon],
) -> None:
    peers = peers_of(fleet["a"])
    b, c, d = (peers[install_id(fleet[n])] for n in "bcd")
    assert b["trusted"] and c["trusted"] and not d["trusted"]
    assert b["models"] == ["gemma-3-270m", "smollm2"]
    assert c["models"] == ["c-only", "smollm2"]
    assert b["name"].startswith("fleet-") and b["name"].endswith(".local")
    assert b["url"].startswith("http://127.0.0.1:")
    assert {"slots", "running", "waiting"} <= set(b["load"])
    # /v1/models: the fleet's models, with where each runs (D's are no model of this fleet).
    models = {m["id"]: m for m in httpx.get(fleet["a"].url + "/v1/models").json()["data"]}
    assert models["gemma-3-270m"]["location"] == "local"
    assert models["gemma-3-270m"]["peers"] == [b["name"]]
    assert models["c-only"]["location"] == "fleet" and models["c-only"]["peers"] == [c["name"]]
    assert sorted(models["smollm2"]["peers"]) == sorted([b["name"], c["name"]])
    assert "d-only" not in models
    got = httpx.get(fleet["a"].url + "/v1/models/c-only").json()
    assert got["id"] == "c-only" and got["location"] == "fleet"


def test_a_model_only_c_serves_streams_back_through_a(fleet: dict[str, Daemon]) -> None:
    client = OpenAI(base_url=fleet["a"].url + "/v1", api_key="none")
    stream = client.chat.completions.create(
        model="c-only",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1  # token by token, not one block
    with httpx.stream(
        "POST",
        fleet["a"].url + "/v1/completions",
        json={"model": "c-only", "prompt": "Hi", "max_tokens": 4, "stream": True},
    ) as response:
        assert (
            response.headers["x-thox-served-by"]
            == peers_of(fleet["a"])[install_id(fleet["c"])]["name"]
        )
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    plain = client.completions.create(model="c-only", prompt="Hi", max_tokens=3)
    assert plain.model == "c-only" and plain.usage is not None
    # A counts what its clients used on C (the ledger is written once a second).
    until(
        lambda: (
            httpx.get(fleet["a"].url + "/v1/usage")
            .json()["breakdown"]
            .get("c-only", {})
            .get("requests", 0)
            >= 3
        ),
        "A's usage does not show the forwarded requests",
    )


def test_a_websocket_request_is_relayed_event_by_event(fleet: dict[str, Daemon]) -> None:
    async def scenario() -> list[dict[str, Any]]:
        url = fleet["a"].url.replace("http://", "ws://") + "/v1/stream"
        events = []
        async with websockets.connect(url) as ws:
            messages = [{"role": "user", "content": "Hello"}]
            request = {"id": "r1", "model": "c-only", "max_tokens": 6, "messages": messages}
            await ws.send(json.dumps(request))
            while not events or events[-1]["type"] == "delta":
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return events

    def relayed() -> int:
        usage = httpx.get(fleet["a"].url + "/v1/usage").json()
        return int(usage["breakdown"].get("c-only", {}).get("requests", 0))

    before = relayed()
    events = asyncio.run(scenario())
    until(lambda: relayed() > before, "A's usage does not show the relayed request")
    assert events[-1]["type"] == "done", events[-1]
    assert all(e["id"] == "r1" and e["model"] == "c-only" for e in events)
    assert len(events) >= 3  # deltas, then done
    assert events[-1]["usage"]["completion_tokens"] == 6
    assert events[-1]["finish_reason"] == "length"


def test_a_forwarded_request_is_never_forwarded_again(fleet: dict[str, Daemon]) -> None:
    """B serves no c-only: signed as a peer's request, B answers itself (404) instead of sending
    it on to C."""
    path = "/v1/completions"
    header = FleetTrust(SECRET, "tester").sign("POST", path, "ip:127.0.0.1")
    body = {"model": "c-only", "prompt": "Hi", "max_tokens": 2}
    signed = httpx.post(fleet["b"].url + path, json=body, headers={HEADER: header})
    assert signed.status_code == 404
    assert signed.json()["error"]["code"] == "model_not_found"
    plain = httpx.post(fleet["b"].url + path, json=body, timeout=60)
    assert plain.status_code == 200  # unsigned, B forwards it to C


def test_with_every_slot_of_a_busy_the_overflow_goes_to_b(fleet: dict[str, Daemon]) -> None:
    a = fleet["a"]
    b_name = peers_of(a)[install_id(fleet["b"])]["name"]
    body = {"model": "gemma-3-270m", "prompt": "Count: 1, 2,", "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", a.url + "/v1/completions", json=body, timeout=60) as long:
        assert "x-thox-served-by" not in long.headers  # A's own slot
        lines = long.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # running on A now
        assert a.busy() == 1
        short = httpx.post(
            a.url + "/v1/completions",
            json={"model": "gemma-3-270m", "prompt": "Hi", "max_tokens": 3},
            timeout=60,
        )
        assert short.status_code == 200
        assert short.headers["x-thox-served-by"] == b_name
    a.wait_idle()  # the long stream was cancelled when its client left


def test_a_peer_with_another_secret_is_never_used(fleet: dict[str, Daemon]) -> None:
    response = httpx.post(
        fleet["a"].url + "/v1/completions",
        json={"model": "d-only", "prompt": "Hi", "max_tokens": 2},
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    served = httpx.get(fleet["d"].url + "/metrics").text
    assert "thoxd_generations_total{" not in served  # D generated nothing for anyone


def test_killing_c_mid_stream_gives_a_clean_error_and_c_leaves(fleet: dict[str, Daemon]) -> None:
    a, c = fleet["a"], fleet["c"]
    c_id = install_id(c)
    body = {"model": "c-only", "prompt": "A long story:", "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    events = []
    with httpx.stream("POST", a.url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    c.proc.kill()
    assert response.status_code == 200
    last = json.loads(events[-1])
    assert last["error"]["code"] == "peer_unavailable"
    assert last["error"]["status"] == 502
    assert "Traceback" not in "".join(events)
    until(lambda: c_id not in peers_of(a), "C is still listed")
    # The next request for a model C served goes to B; the one only C served is gone.
    b_name = peers_of(a)[install_id(fleet["b"])]["name"]
    smol_answer = httpx.post(
        a.url + "/v1/completions", json={"model": "smol", "prompt": "Hi", "max_tokens": 2}
    )
    assert smol_answer.status_code == 200
    assert smol_answer.headers["x-thox-served-by"] == b_name
    gone = httpx.post(a.url + "/v1/completions", json={"model": "c-only", "prompt": "Hi"})
    assert gone.status_code == 404
