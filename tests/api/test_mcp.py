"""/mcp on the real daemon, driven by the official MCP client SDK as an IDE would drive it: the
device docs' URL, the four tools on real code, errors as the spec names them, progress,
cancellation, the queue shared with REST, raw initialize POSTs, Origin checks, prompts, the
models resource, and the stdio bridge."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from typing import Any, TypeVar

import anyio
import httpx
import jsonschema
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import Daemon

T = TypeVar("T")
CODE = "def add(a, b):\n    return a + b\n"
COUNTING = {"model": "gemma-3-270m", "prompt": "1, 2, 3, 4, 5,", "temperature": 0,
            "repeat_penalty": 1.0, "max_tokens": 3000, "stream": True}  # fmt: skip


def session(daemon: Daemon, use: Callable[[ClientSession], Awaitable[T]]) -> T:
    """Run `use` in an initialized session on the device docs' URL (host aside)."""

    async def main() -> T:
        async with (
            streamable_http_client(daemon.url + "/mcp") as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            return await use(client)

    return asyncio.run(main())


def test_an_ide_lists_four_described_tools(daemon: Daemon) -> None:
    async def use(client: ClientSession) -> Any:
        return (await client.list_tools()).tools

    tools = {tool.name: tool for tool in session(daemon, use)}
    assert set(tools) == {"thox_complete", "thox_explain", "thox_refactor", "thox_test"}
    for tool in tools.values():
        assert tool.description and len(tool.description) > 30
        assert tool.input_schema["type"] == "object" and "model" in tool.input_schema["properties"]
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
    assert tools["thox_refactor"].input_schema["required"] == ["code"]


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("thox_complete", {"code": "def fib(n):\n    ", "language": "python", "max_tokens": 24}),
        ("thox_explain", {"code": CODE, "language": "python", "max_tokens": 40}),
        ("thox_explain", {"error": "ZeroDivisionError: division by zero",
                          "stack_trace": 'File "x.py", line 3, in f\n    return a / b',
                          "max_tokens": 40}),
        ("thox_refactor", {"code": CODE, "max_tokens": 1000}),
        ("thox_test", {"code": CODE, "framework": "pytest", "max_tokens": 80}),
    ],
)  # fmt: skip
def test_each_tool_answers_with_structured_content(
    daemon: Daemon, name: str, arguments: dict[str, Any]
) -> None:
    async def use(client: ClientSession) -> Any:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        return tools[name].output_schema, await client.call_tool(name, arguments)

    schema, result = session(daemon, use)
    assert not result.is_error, result.content
    jsonschema.validate(result.structured_content, schema)
    assert json.loads(result.content[0].text) == result.structured_content
    assert result.structured_content["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"language": "python"}, "'code'"),
        ({"code": CODE, "max_tokens": "lots"}, "max_tokens"),
        ({"code": CODE, "model": "no-such-model"}, "no-such-model"),
        ({"code": "x " * 20000, "max_tokens": 4}, "context"),
    ],
)
def test_bad_arguments_are_tool_errors_an_ide_can_show(
    daemon: Daemon, arguments: dict[str, Any], says: str
) -> None:
    async def use(client: ClientSession) -> Any:
        return await client.call_tool("thox_explain", arguments)

    result = session(daemon, use)
    assert result.is_error
    assert says in result.content[0].text
    assert "Traceback" not in result.content[0].text


def test_an_unknown_tool_is_the_jsonrpc_error_the_spec_names(daemon: Daemon) -> None:
    async def use(client: ClientSession) -> Any:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("thox_nope", {})
        return refused.value

    error = session(daemon, use)
    assert error.error.code == -32602 and "thox_nope" in error.error.message


def test_progress_then_cancel_frees_the_slot(daemon: Daemon) -> None:
    cancelled = daemon.cancelled()

    async def use(client: ClientSession) -> int:
        progress: list[float] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(done)

        arguments = {"code": "1, 2, 3, 4, 5,", "model": "gemma-3-270m", "max_tokens": 3000}
        with anyio.CancelScope() as scope:

            async def cancel_once_progressing() -> None:
                while len(progress) < 2:
                    await anyio.sleep(0.02)
                scope.cancel()  # the client sends notifications/cancelled

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(cancel_once_progressing)
                await client.call_tool("thox_complete", arguments, progress_callback=on_progress)
        assert progress == sorted(progress)
        return len(progress)

    assert session(daemon, use) >= 2
    daemon.wait_idle()
    assert daemon.cancelled() == cancelled + 1  # stopped early, not at its 3000 tokens


def test_a_full_queue_is_a_tool_error_that_says_when_to_retry(daemon: Daemon) -> None:
    """Tools share the slots and the queue with REST: two slots and two waiting are taken."""
    streams: list[httpx.Response] = []
    started = threading.Barrier(5)

    def hold() -> None:
        with (
            httpx.Client(base_url=daemon.url, timeout=120) as http,
            http.stream("POST", "/v1/completions", json=COUNTING) as response,
        ):
            streams.append(response)
            started.wait()
            with suppress(httpx.HTTPError):
                for _ in response.iter_lines():
                    if not streams:
                        break

    holders = [threading.Thread(target=hold) for _ in range(4)]
    for thread in holders:
        thread.start()
    try:
        started.wait(timeout=60)

        async def use(client: ClientSession) -> Any:
            arguments = {"code": CODE, "max_tokens": 5, "model": COUNTING["model"]}
            return await client.call_tool("thox_explain", arguments)

        result = session(daemon, use)
        assert result.is_error
        assert "Retry in" in result.content[0].text
    finally:
        streams.clear()  # the holders stop reading and leave
        for thread in holders:
            thread.join(timeout=60)
    daemon.wait_idle()


@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18"])
def test_a_raw_initialize_gets_a_result_for_each_protocol_version(
    daemon: Daemon, version: str
) -> None:
    message = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "1"}},
    }  # fmt: skip
    headers = {"Accept": "application/json, text/event-stream"}
    response = httpx.post(daemon.url + "/mcp", json=message, headers=headers)
    assert response.status_code == 200
    assert response.headers["mcp-session-id"]
    data = next(line[6:] for line in response.text.splitlines() if line.startswith("data: "))
    result = json.loads(data)["result"]
    assert result["protocolVersion"] == version
    assert result["serverInfo"]["name"] == "thox" and "tools" in result["capabilities"]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_pages_from_other_origins_are_refused(daemon: Daemon, method: str) -> None:
    headers = {"Origin": "https://evil.example", "Accept": "application/json, text/event-stream"}
    response = httpx.request(method, daemon.url + "/mcp", headers=headers, json={})
    assert response.status_code == 403
    own = {**headers, "Origin": daemon.url}  # a page the device itself served may
    assert httpx.request(method, daemon.url + "/mcp", headers=own, json={}).status_code != 403
    assert response.json()["error"]["code"] == "origin_not_allowed"


def test_prompts_and_the_models_resource(daemon: Daemon) -> None:
    async def use(client: ClientSession) -> Any:
        prompts = (await client.list_prompts()).prompts
        prompt = await client.get_prompt("thox_test", {"code": CODE, "framework": "unittest"})
        resource = await client.read_resource("thox://models")
        return prompts, prompt, resource

    prompts, prompt, resource = session(daemon, use)
    assert {p.name for p in prompts} == {"thox_complete", "thox_explain", "thox_refactor",
                                         "thox_test"}  # fmt: skip
    assert "unittest" in prompt.messages[0].content.text
    models = json.loads(resource.contents[0].text)["models"]
    ids = {m["id"] for m in models}
    assert {"gemma-3-270m", "smollm2-135m-instruct"} <= ids
    assert all(m["state"] in ("loaded", "loading", "unloaded", "error") for m in models)


def test_the_stdio_bridge_relays_to_the_daemon(daemon: Daemon) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "thoxd", "mcp-stdio", "--url", daemon.url + "/mcp"]
    )

    async def main() -> Any:
        async with (
            stdio_client(params) as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            names = {tool.name for tool in (await client.list_tools()).tools}
            result = await client.call_tool("thox_complete", {"code": "x = ", "max_tokens": 4})
            return names, result

    names, result = asyncio.run(main())
    assert "thox_complete" in names
    assert not result.is_error and result.structured_content["completion"]


@pytest.fixture(autouse=True)
def _idle_after(daemon: Daemon) -> Iterator[None]:
    yield
    daemon.wait_idle()
