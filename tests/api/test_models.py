"""The models surface of a real daemon: /v1/models, /models/*, JIT loads by requests, a budget
that holds two models while three are asked for in turn, refused loads, keep_alive.

The catalog serves the Gemma file under several ids; `--memory-budget` is set from the
engine's own estimate so that exactly two of them fit.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GEMMA, Daemon
from thoxd.catalog.entries import Catalog
from thoxd.engine.runtime import Engine, EngineConfig

SLOTS = 2
CATALOG = f"""
[[models]]
id = "a"
aliases = ["first"]
path = "{GEMMA}"
n_ctx = 512
capabilities = ["completion", "embeddings"]

[[models]]
id = "b"
path = "{GEMMA}"
n_ctx = 512
capabilities = ["completion"]

[[models]]
id = "c"
path = "{GEMMA}"
n_ctx = 512
capabilities = ["completion"]

[[models]]
id = "huge"
path = "{GEMMA}"
n_ctx = 65536
capabilities = ["completion"]

[[models]]
id = "bad"
path = "hostile.gguf"
"""


@pytest.fixture(scope="module")
def budget(shelf: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    path = tmp_path_factory.mktemp("catalog") / "models.toml"
    path.write_text(CATALOG)
    config = EngineConfig(models_dir=shelf, threads=2, slots=SLOTS, queue_size=4, batch_size=256)
    catalog = Catalog.load(path)
    estimate = Engine(catalog, config).estimate(catalog.get("a"))
    assert estimate is not None
    return int(estimate.total * 2.5)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, shelf: Path, budget: int) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("models-daemon")
    catalog = tmp / "models.toml"
    catalog.write_text(CATALOG)
    d = Daemon(
        tmp, shelf,
        "--catalog", str(catalog), "--default-model", "a",
        "--slots", str(SLOTS), "--memory-budget", str(budget), "--threads", "2",
    )  # fmt: skip
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _complete(box: Daemon, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(box.url + "/v1/completions", json=body, timeout=60)


def _states(box: Daemon) -> dict[str, str]:
    data = httpx.get(box.url + "/v1/models").json()["data"]
    return {m["id"]: m["state"] for m in data}


def test_every_catalog_model_is_listed_with_its_state(box: Daemon) -> None:
    data = httpx.get(box.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["a", "b", "c", "huge", "bad"]
    a = data[0]
    assert a["state"] == "loaded" and a["aliases"] == ["first"]
    assert a["context_window"] == a["max_tokens"] == 512
    assert a["capabilities"] == ["completion", "embeddings"]
    assert a["memory"]["total_bytes"] > a["memory"]["weights_bytes"] > 200_000_000
    assert data[1]["memory"] is None
    one = httpx.get(box.url + "/v1/models/first").json()
    assert one["id"] == "a" and one["state"] == "loaded"
    assert httpx.get(box.url + "/v1/models/nope").status_code == 404


def test_available_tells_what_each_model_would_cost(box: Daemon, budget: int) -> None:
    body = httpx.get(box.url + "/models/available").json()
    entries = {m["id"]: m for m in body["data"]}
    a, huge = entries["a"]["memory_estimate"], entries["huge"]["memory_estimate"]
    assert huge["kv_cache_bytes"] > a["kv_cache_bytes"] * 50
    assert entries["bad"]["memory_estimate"] is None  # refused by the gate
    assert body["memory"]["budget_bytes"] == budget
    assert {"gpu_bytes", "gpu_layers"} <= a.keys()  # what of it would be on a GPU
    assert body["models"] == body["data"]  # the list locallab-client's list_models() reads


def test_three_models_asked_for_in_turn_under_a_budget_for_two(box: Daemon) -> None:
    for model in ("a", "b", "a", "c"):  # b is the least recently used when c comes
        assert _complete(box, model).status_code == 200
    states = _states(box)
    assert (states["a"], states["b"], states["c"]) == ("loaded", "unloaded", "loaded")
    current = httpx.get(box.url + "/models/current").json()
    assert current["model_id"] == "c"
    assert {m["id"] for m in current["data"]} == {"a", "c"}
    assert current["memory"]["used_bytes"] <= current["memory"]["budget_bytes"]
    assert current["memory"]["gpu_used_bytes"] <= current["memory"]["gpu_budget_bytes"]
    slots = current["data"][0]["slots"]
    assert (slots["total"], slots["running"], slots["waiting"]) == (SLOTS, 0, 0)
    assert 0 <= slots["parked"] < SLOTS


def test_a_streaming_model_is_never_evicted_and_refuses_unload(box: Daemon) -> None:
    for model in ("b", "c"):  # b is the older of the two residents
        assert _complete(box, model).status_code == 200
    # Counting goes on for as long as it is allowed to: the stream outlives the checks.
    body = {"model": "b", "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", box.url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)  # b is decoding now
        assert _complete(box, "a").status_code == 200  # so c, though newer, makes room
        assert _states(box)["b"] == "loaded" and _states(box)["c"] == "unloaded"
        assert box.busy() == 1
        refused = httpx.post(box.url + "/models/unload", json={"model_id": "b"})
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "model_busy"
    box.wait_idle()
    freed = httpx.post(box.url + "/models/unload", json={"model_id": "b"})
    assert freed.status_code == 200 and freed.json()["unloaded"] is True
    assert _states(box)["b"] == "unloaded"


def test_load_and_unload_routes(box: Daemon) -> None:
    loaded = httpx.post(box.url + "/models/load", json={"model_id": "c"}, timeout=60)
    assert loaded.status_code == 200
    assert loaded.json()["id"] == "c" and loaded.json()["state"] == "loaded"
    assert loaded.json()["status"] == "success"  # what locallab-client checks
    unknown = httpx.post(box.url + "/models/load", json={"model_id": "zz"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model_id"
    missing = httpx.post(box.url + "/models/load", json={})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model_id"
    # Two are loaded: the body-less form of the /generate server's docs unloads the current
    # one, the most recently used (c, just loaded), as /models/current names it.
    assert len([s for s in _states(box).values() if s == "loaded"]) == 2
    assert httpx.get(box.url + "/models/current").json()["model_id"] == "c"
    unloaded = httpx.post(box.url + "/models/unload")
    assert unloaded.status_code == 200 and unloaded.json()["id"] == "c"
    assert unloaded.json()["status"] == "Model unloaded successfully"
    assert _states(box)["c"] == "unloaded"
    again = httpx.post(box.url + "/models/unload", json={"model_id": "huge"})
    assert again.status_code == 200 and again.json()["unloaded"] is False
    assert again.json()["status"] == "Model was not loaded"


def test_a_load_is_visible_as_loading(box: Daemon) -> None:
    httpx.post(box.url + "/models/unload", json={"model_id": "b"})
    seen: set[str] = set()
    load = threading.Thread(target=_complete, args=(box, "b"))
    load.start()
    while load.is_alive():
        seen.add(httpx.get(box.url + "/v1/models/b").json()["state"])
    load.join()
    assert "loading" in seen
    assert _states(box)["b"] == "loaded"


def test_refused_loads_say_why_and_the_box_keeps_serving(box: Daemon) -> None:
    hostile = _complete(box, "bad")  # refused by our own header check, before llama.cpp
    assert hostile.status_code == 422
    assert hostile.json()["error"]["code"] == "model_file_rejected"
    assert "over the limit" in hostile.json()["error"]["message"]
    huge = _complete(box, "huge")
    assert huge.status_code == 507
    message = huge.json()["error"]["message"]
    assert "needs about" in message and "KV cache" in message and "budget" in message
    states = _states(box)
    assert states["bad"] == states["huge"] == "error"
    assert httpx.get(box.url + "/v1/models/bad").json()["error"]
    assert httpx.get(box.url + "/health").status_code == 200
    assert _complete(box, "a").status_code == 200


def test_keep_alive_of_a_request_and_scrapes_do_not_count_as_use(box: Daemon) -> None:
    assert _complete(box, "c", keep_alive="1s").status_code == 200
    deadline = time.monotonic() + 4
    while _states(box)["c"] != "unloaded":
        assert time.monotonic() < deadline, "keep_alive did not unload the model"
        for path in ("/health", "/metrics", "/v1/models/c", "/models/current", "/system/info"):
            httpx.get(box.url + path)
        time.sleep(0.1)
    bad = _complete(box, "a", keep_alive="soon")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_health_stays_ok_when_the_default_model_was_unloaded(box: Daemon) -> None:
    box.wait_idle()
    assert httpx.post(box.url + "/models/unload", json={"model_id": "a"}).status_code == 200
    health = httpx.get(box.url + "/health").json()
    assert health["status"] == "ok" and health["model_state"] == "unloaded"
    assert _complete(box, "first").status_code == 200  # and the next request loads it
    assert _states(box)["a"] == "loaded"


def test_sighup_reads_the_catalog_again(box: Daemon) -> None:
    """Last in this module: it changes the box's catalog."""
    catalog = box.log_path.parent / "models.toml"
    # An invalid file is refused; the old catalog keeps serving.
    catalog.write_text(CATALOG + "\n[[models]]\nid = 'broken'\n")
    box.proc.send_signal(signal.SIGHUP)
    _wait_for_log(box, "not reloaded")
    assert "broken" not in _states(box)
    assert _complete(box, "b").status_code == 200
    # A valid one: "d" is new, "huge" is gone, "b" changes its context once idle.
    changed = "\n".join(
        f'[[models]]\nid = "{i}"\npath = "{GEMMA}"\nn_ctx = {n}\ncapabilities = ["completion"]\n'
        for i, n in [("a", 512), ("b", 1024), ("d", 512)]
    )
    catalog.write_text(changed)
    box.proc.send_signal(signal.SIGHUP)
    _wait_for_log(box, "models.toml reloaded")
    states = _states(box)
    assert "huge" not in states and states["d"] == "unloaded"
    assert _complete(box, "d").status_code == 200
    assert httpx.get(box.url + "/v1/models/b").json()["context_window"] == 1024
    long_prompt = {"prompt": "word " * 700}  # fits 1024, not 512: the new entry serves it
    assert _complete(box, "b", **long_prompt).status_code == 200
    assert box.proc.poll() is None


def _wait_for_log(box: Daemon, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in box.log_path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in the log"
        time.sleep(0.05)
