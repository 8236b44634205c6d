"""MCP at /mcp: the box as a Model Context Protocol server for IDEs, on the official SDK.

Streamable HTTP in the same app and on the same port as the REST API: POST for requests, GET for
the server's stream, DELETE ends a session. It sits behind the same guards (LAN sources, the Host
allowlist, body limits, the shutdown gate); on top of them every /mcp request, not only those that
change state, must come without an `Origin` or from an allowed one, as the MCP spec asks of
servers against DNS rebinding (403 origin_not_allowed, as the cross-site guard answers the
others). The SDK's session manager runs inside the app's lifespan.

    tools       thox_complete, thox_explain, thox_refactor, thox_test (thoxd.api.mcp_tools):
                each with an input and an output schema, structured content and text
    prompts     the same four, for IDEs that offer prompts as slash commands
    resources   thox://models: the catalog and what is loaded
    errors      a tool that fails is a result with isError; an unknown tool, a JSON-RPC error
                (-32602, as the spec names it)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolResult
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from thoxd import __version__
from thoxd.access import Limiter
from thoxd.api.mcp_tools import ThoxTools
from thoxd.engine import Engine
from thoxd.errors import OriginNotAllowed
from thoxd.guards.origins import normal_origins, origin_allowed
from thoxd.guards.shutdown import Shutdown
from thoxd.settings import Settings

_INSTRUCTIONS = (
    "thox is a local LLM appliance on this network. Its tools complete, explain, refactor and "
    "test code with the device's models (thox://models lists them)."
)


class _Server(MCPServer):
    """The SDK's server, with the spec's error for an unknown tool: the SDK answers one with a
    tool result (isError) instead of the JSON-RPC error the spec names."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Any = None
    ) -> CallToolResult | Any:
        if name not in {tool.name for tool in await self.list_tools()}:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {name}")
        return await super().call_tool(name, arguments, context)


class McpRoutes:
    def __init__(
        self, engine: Engine, settings: Settings, shutdown: Shutdown, limiter: Limiter | None = None
    ) -> None:
        self.engine = engine
        self.allowed_origins = normal_origins(settings.allowed_origins)
        self.tools = ThoxTools(engine, settings.default_model, shutdown, limiter)
        self.server = _Server(
            name="thox", title="Thox", version=__version__, instructions=_INSTRUCTIONS
        )
        for fn, name, description in self.tools.all():
            self.server.add_tool(fn, name=name, description=description, structured_output=True)
        _add_prompts(self.server)
        self.server.resource(
            "thox://models",
            name="models",
            description="The models this device serves: ids, aliases, state, context window.",
            mime_type="application/json",
        )(self._models)
        # The app's own guards check Host and sources; the SDK's DNS-rebinding check would
        # refuse the box's .local name and LAN addresses, which the guards allow.
        self.server.streamable_http_app(
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_request_body_size=settings.max_body_bytes,
        )
        self._app = StreamableHTTPASGIApp(self.server.session_manager)

    def routes(self) -> list[BaseRoute]:
        # The instance is the ASGI app: the SDK's transport answers on the raw connection.
        return [Route("/mcp", self, methods=["GET", "POST", "DELETE"])]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The SDK's session manager, for the app's lifespan."""
        async with self.server.session_manager.run():
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(
            origin, headers.get("host"), self.allowed_origins
        ):
            error = OriginNotAllowed(
                f"Web pages from '{origin[:200]}' may not use this device. To allow them, add"
                " the origin to allowed_origins."
            )
            await JSONResponse(error.envelope(), status_code=403)(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _models(self) -> str:
        models = [
            {
                "id": spec.id,
                "aliases": list(spec.aliases),
                "state": self.engine.state(spec.id),
                "context_window": spec.n_ctx,
                "capabilities": list(spec.capabilities),
                "description": spec.description,
            }
            for spec in self.engine.catalog
        ]
        return json.dumps({"models": models})


def _add_prompts(server: MCPServer) -> None:
    """The tools' work as prompts, for IDEs that show prompts as slash commands."""

    @server.prompt(name="thox_explain", description="Explain code or an error.")
    def explain(code: str, language: str = "") -> str:
        return f"Explain what this {language} code does:\n```{language}\n{code}\n```"

    @server.prompt(name="thox_refactor", description="Suggest refactorings for code.")
    def refactor(code: str, language: str = "", goal: str = "") -> str:
        aim = f" Aim for {goal}." if goal else ""
        return f"Suggest refactorings for this code.{aim}\n```{language}\n{code}\n```"

    @server.prompt(name="thox_test", description="Write unit tests for code.")
    def test(code: str, framework: str = "pytest", language: str = "") -> str:
        return f"Write {framework} unit tests for this code:\n```{language}\n{code}\n```"

    @server.prompt(name="thox_complete", description="Complete code.")
    def complete(code: str, language: str = "") -> str:
        return f"Continue this {language} code:\n```{language}\n{code}"
