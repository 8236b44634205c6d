"""thoxd/api/metrics.py: /metrics parses as Prometheus text, counts requests, tokens and
latencies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from tests.conftest import Daemon
from tests.inproc import LOCAL_CLIENT, make_app, request
from thoxd.api.metrics import method_label, status_label
from thoxd.catalog.entries import Catalog
from thoxd.engine.request import Finished, Timings

MODEL = "smollm2-135m-instruct"  # what thox-coder names
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample, keyed by name and labels; raises if the text is not valid exposition."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(app: Starlette) -> Samples:
    response = asyncio.run(request(app, "GET", "/metrics"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def test_metrics_parse_and_count_requests(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)
    for path in ("/v1/models", "/v1/models", "/v1/models/thox-coder", "/no/such/route"):
        asyncio.run(request(app, "GET", path))
    asyncio.run(request(app, "GET", "/health"))  # 503: the model never loads here
    samples = scrape(app)
    total = "thoxd_http_requests_total"
    assert value(samples, total, route="/v1/models", method="GET", status="200") == 2
    assert value(samples, total, route="/v1/models/{model_id:path}", method="GET", status="200")
    assert value(samples, total, route="unmatched", method="GET", status="404") == 1
    assert value(samples, total, route="/health", method="GET", status="503") == 1
    assert value(samples, "thoxd_http_request_duration_seconds_count", route="/v1/models") == 2
    assert value(samples, "thoxd_http_requests_in_flight") == 1  # the scrape itself
    assert value(samples, "thoxd_model_loaded", model=MODEL) == 0
    assert value(samples, "process_resident_memory_bytes") > 0


def test_junk_methods_and_paths_cannot_grow_the_series(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)

    async def junk() -> None:
        transport = httpx.ASGITransport(app=app, client=LOCAL_CLIENT)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            for i in range(300):
                await http.request(f"JUNK{i}", "/v1/models")  # 405
                await http.request(f"X-{i}", f"/scan/{i}")  # 404

    asyncio.run(junk())
    samples = scrape(app)
    series = {labels for name, labels in samples if name == "thoxd_http_requests_total"}
    assert series == {
        frozenset({("route", "/v1/models"), ("method", "other"), ("status", "405")}),
        frozenset({("route", "unmatched"), ("method", "other"), ("status", "404")}),
    }
    total = "thoxd_http_requests_total"
    assert value(samples, total, route="/v1/models", method="other", status="405") == 300
    assert value(samples, total, route="unmatched", method="other", status="404") == 300


def test_label_values_come_from_known_sets() -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "WEBSOCKET"):
        assert method_label(method) == method
    for junk in ("get", "PROPFIND", "X" * 1000, ""):
        assert method_label(junk) == "other"
    assert status_label(200) == "200" and status_label(503) == "503"
    assert status_label(0) == status_label(1000) == "other"


def test_scraping_never_loads_a_model(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)
    scrape(app)
    assert app.state.engine.state(MODEL) == "unloaded"
    assert app.state.engine.loaded() == []


def test_tokens_and_latencies_from_the_engine_hook(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)
    timings = Timings(cache_n=2, prompt_n=8, prompt_ms=50.0, predicted_n=4, predicted_ms=40.0)
    timings.queue_ms = 10.0
    timings.draft_n, timings.draft_n_accepted = 6, 2
    # Generations stand-ins: the hook reads who asked and whether a choice is a fork.
    asked = SimpleNamespace(client="ip:10.0.0.7", fork_of=None)
    fork = SimpleNamespace(client="ip:10.0.0.7", fork_of=asked)
    app.state.engine.on_finished(MODEL, asked, Finished("length", 10, 4, timings))
    app.state.engine.on_finished(MODEL, asked, Finished("cancelled", 5, 0, Timings()))
    app.state.engine.on_finished(MODEL, fork, Finished("stop", 10, 3, Timings()))
    samples = scrape(app)
    assert value(samples, "thoxd_prompt_tokens_total", model=MODEL) == 25
    assert value(samples, "thoxd_prompt_cached_tokens_total", model=MODEL) == 2
    assert value(samples, "thoxd_generated_tokens_total", model=MODEL) == 7
    assert value(samples, "thoxd_draft_tokens_total", model=MODEL) == 6
    assert value(samples, "thoxd_draft_accepted_tokens_total", model=MODEL) == 2
    assert value(samples, "thoxd_generations_total", model=MODEL, finish_reason="length") == 1
    assert value(samples, "thoxd_generations_total", model=MODEL, finish_reason="cancelled") == 1
    # A request cancelled before its first token has no time to first token (the fork has one).
    assert value(samples, "thoxd_time_to_first_token_seconds_count", model=MODEL) == 2
    assert abs(value(samples, "thoxd_time_to_first_token_seconds_sum", model=MODEL) - 0.06) < 1e-9
    assert abs(value(samples, "thoxd_time_per_output_token_seconds_sum", model=MODEL) - 0.01) < 1e-9
    # The same hook feeds the usage ledger: cancelled tokens count, a fork's prompt does not.
    usage = asyncio.run(request(app, "GET", "/v1/usage")).json()
    assert (usage["total_tokens"], usage["total_requests"]) == (10 + 4 + 5 + 3, 2)
    assert usage["by_key"]["ip:10.0.0.7"]["breakdown"] == {MODEL: {"tokens": 22, "requests": 2}}


def test_each_app_has_its_own_registry(tmp_path: Path, catalog: Catalog) -> None:
    first = make_app(tmp_path / "a", catalog)
    second = make_app(tmp_path / "b", catalog)  # no "Duplicated timeseries" error
    asyncio.run(request(first, "GET", "/v1/models"))
    assert value(scrape(second), "thoxd_http_requests_total", route="/v1/models", method="GET",
                 status="200") == 0  # fmt: skip
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("thoxd_")]


def test_metrics_on_the_daemon(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        before = parse(http.get("/metrics").text)
        done = http.post(
            "/v1/completions",
            json={"model": "thox-coder", "prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0},
        )
        assert done.status_code == 200
        usage = done.json()["usage"]
        after = parse(http.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("thoxd_generated_tokens_total", model=MODEL) == usage["completion_tokens"]
    assert delta("thoxd_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert delta("thoxd_time_to_first_token_seconds_count", model=MODEL) == 1
    completions = {"route": "/v1/completions", "method": "POST", "status": "200"}
    assert delta("thoxd_http_requests_total", **completions) == 1
    assert value(after, "thoxd_model_loaded", model=MODEL) == 1
    assert value(after, "thoxd_model_memory_bytes", model=MODEL) > 100 << 20
    assert value(after, "thoxd_slots", model=MODEL) == 2
    used = value(after, "thoxd_memory_used_bytes")
    # Every loaded model's (other tests may have loaded Gemma into this daemon too).
    assert used == sum(v for (name, _), v in after.items() if name == "thoxd_model_memory_bytes")
    assert value(after, "thoxd_memory_budget_bytes") > used
    gpu_used = value(after, "thoxd_gpu_memory_used_bytes")  # 0 without a GPU
    assert 0 <= gpu_used <= value(after, "thoxd_gpu_memory_budget_bytes")
    assert (("thoxd_queue_depth", frozenset({("model", MODEL)}))) in after
    assert value(after, "thoxd_running_sequences", model=MODEL) == 0
    assert value(after, "process_resident_memory_bytes") > 100 << 20
