"""create_app(): the whole daemon assembled explicitly from its parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import psutil  # type: ignore[import-untyped]
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from thoxd.access import AccessDb, KeyStore, Limiter, UsageLedger
from thoxd.api import locallab, rox
from thoxd.api.conversations import ResponseStore
from thoxd.api.dialects import ErrorDialects
from thoxd.api.fleet import FleetRoutes
from thoxd.api.keys import KeyRoutes
from thoxd.api.locallab import LocalLabRoutes
from thoxd.api.mcp import McpRoutes
from thoxd.api.metrics import Metrics, MetricsMiddleware
from thoxd.api.models import ModelRoutes
from thoxd.api.openai import OpenAIRoutes
from thoxd.api.request_ids import RequestIdMiddleware, response_id
from thoxd.api.responses import ResponsesRoutes
from thoxd.api.rox import RoxRoutes
from thoxd.api.roxy import roxy_routes
from thoxd.api.system import SystemRoutes
from thoxd.api.usage import UsageRoutes
from thoxd.api.websocket import StreamRoutes
from thoxd.catalog.entries import Catalog, CatalogError
from thoxd.device.discovery import Discovery
from thoxd.device.info import SystemSampler
from thoxd.engine import Engine, EngineConfig, Finished, Generation, budget_bytes
from thoxd.errors import InvalidRequest, NotFound, ThoxdError
from thoxd.fleet.browse import PeerBrowser
from thoxd.fleet.forward import ForwardingMiddleware
from thoxd.fleet.helper import rpc_server
from thoxd.fleet.peers import Fleet
from thoxd.fleet.routing import Router
from thoxd.fleet.split import SplitModels
from thoxd.fleet.trust import FleetTrust
from thoxd.guards.access import Access, AccessGuard
from thoxd.guards.body_limit import BodyLimitMiddleware
from thoxd.guards.cross_site import CrossSiteGuard
from thoxd.guards.framing import FramingGuard
from thoxd.guards.lan import HostNames, LanGuard, default_names
from thoxd.guards.origins import cors_middleware
from thoxd.guards.shutdown import Shutdown, ShutdownGate
from thoxd.guards.timeouts import BodyTimeoutMiddleware
from thoxd.settings import Settings

logger = logging.getLogger("thoxd")


async def _thoxd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ThoxdError)
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: ThoxdError = NotFound(f"There is no route {request.url.path}.")
    else:
        error = InvalidRequest(f"{request.method} is not allowed on {request.url.path}.")
        error.status = exc.status_code  # type: ignore[misc]
    return JSONResponse(error.envelope(), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log, never to the client.
    logger.error(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        response_id(request.scope),
        exc_info=exc,
    )
    return JSONResponse(ThoxdError("Internal server error.").envelope(), status_code=500)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        models_dir=settings.resolved_models_dir,
        threads=settings.threads,
        slots=settings.slots,
        queue_size=settings.queue_size,
        batch_size=settings.batch_size,
        draft_max=settings.draft_max,
        memory_budget=budget_bytes(settings.memory_budget, psutil.virtual_memory().available),
        keep_alive=settings.keep_alive,
        client_cap=settings.max_slots_per_client,
        rpc_build=settings.rpc_build,
        rpc_in_process=not settings.rpc_isolate,
        n_gpu_layers=settings.n_gpu_layers,
        gpu_memory_budget=settings.gpu_memory_budget,
    )


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    engine: Engine | None = None,
    discovery: Discovery | None = None,
    shutdown: Shutdown | None = None,
) -> Starlette:
    catalog = catalog or Catalog.load(settings.catalog)
    catalog.get(settings.default_model)  # fail at start, not at the first request
    engine = engine or Engine(catalog, engine_config(settings))
    discovery = discovery or Discovery(settings)
    shutdown = shutdown or Shutdown()  # thoxd.server drives it on SIGTERM
    metrics = Metrics(engine)
    # Keys and usage: one SQLite file in the state directory (thoxd/access/).
    database = AccessDb.in_state_dir(settings.state_dir)
    database.create()
    ledger = UsageLedger(database)
    # Several boxes as one (thoxd/fleet/): peers polled, requests forwarded once trusted; and
    # models split over RPC servers, each served by a process of its own.
    split = SplitModels(settings, catalog) if settings.rpc_isolate else None
    fleet = router = browser = None
    if settings.fleet_on or split:
        secret = settings.fleet_secret if settings.fleet_on else None
        trust = FleetTrust(secret.get_secret_value() if secret else None, discovery.install_id)
        static = settings.fleet_peers if settings.fleet_on else []
        fleet = Fleet(trust, static=static, poll_seconds=settings.fleet_poll_seconds)
        router = Router(fleet, engine, settings.default_model, split)
        browser = PeerBrowser(discovery, fleet) if settings.mdns and settings.fleet_on else None
    # This box as a helper for models split over boxes: llama.cpp's rpc-server, supervised.
    helper = None
    if settings.rpc_server:
        helper = rpc_server(settings.rpc_build, settings.rpc_server, settings.threads)
    trust_peers = fleet.trust if fleet is not None else None
    access = Access(settings, KeyStore(database), ledger, Limiter(ledger), trust_peers)

    def finished(model: str, gen: Generation, done: Finished) -> None:
        # Tokens and latencies, counted in one place, on the engine thread. A choice of n > 1
        # shares its prompt with the first: the prompt counts once, the request once.
        metrics.observe_finished(model, done)
        fork = gen.fork_of is not None
        prompt = 0 if fork else done.prompt_tokens
        ledger.record(gen.client, model, prompt, done.completion_tokens, 0 if fork else 1)

    engine.on_finished = finished

    def forwarded(client: str, model: str, prompt: int, completion: int) -> None:
        # Tokens a client used on another box count here too, where its limits are kept.
        ledger.record(client, model, prompt, completion, 1)

    sampler = SystemSampler(settings.resolved_models_dir)
    hosts = HostNames(
        default_names(settings.hostname, settings.allowed_hosts),
        claimed=lambda: discovery.host_name,
    )

    mcp = McpRoutes(engine, settings, shutdown, access.limiter)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Load in the background: the socket binds at once and /health says "loading".
        engine.start()  # the keep_alive clock
        ledger.start()  # writes usage once a second
        loading = asyncio.create_task(_load_at_start(engine, settings.default_model))
        sampler.start()  # /system/info reads its snapshots
        # mDNS probes and registers in its own task: `discovery.wait_ready()` says when.
        await discovery.start()
        if fleet is not None and settings.fleet_on:
            fleet.start()  # polls its peers
        if split:
            split.start()
        if browser is not None:
            browser.start()  # once mDNS has registered
        if helper is not None:
            helper.start()
        try:
            async with mcp.running():  # the MCP SDK's sessions
                yield
        finally:
            loading.cancel()
            if helper is not None:
                await helper.stop()
            if split:
                await split.stop()
            if browser is not None:
                await browser.stop()
            if fleet is not None:
                await fleet.stop()
            await discovery.stop()  # goodbyes first, so clients stop coming
            await engine.close()
            sampler.stop()
            await asyncio.to_thread(ledger.close)  # the last second's usage

    system = SystemRoutes(
        engine, settings.default_model, sampler=sampler, metrics=metrics, identity=discovery
    )
    openai = OpenAIRoutes(engine, shutdown, ledger)
    models = ModelRoutes(engine, fleet)
    routes = [
        *openai.routes(),
        # Stored responses for previous_response_id: in memory, bounded (api/conversations.py).
        *ResponsesRoutes(engine, ResponseStore(), shutdown).routes(),
        *models.routes(),
        *system.routes(),
        *StreamRoutes(engine, settings, shutdown, access, router).routes(),
        *mcp.routes(),
        *KeyRoutes(engine, access).routes(),
        *UsageRoutes(access).routes(),
        *FleetRoutes(
            engine, fleet if settings.fleet_on else None, discovery, helper, settings.rpc_server
        ).routes(),
        # The seed documents' own routes, thin adapters over the same rules (README, "Seeds").
        *LocalLabRoutes(engine, settings.default_model, shutdown).routes(),
        *RoxRoutes(engine, settings.default_model, shutdown).routes(),
        *roxy_routes(openai, models),
    ]
    # Their errors in their own shapes (thoxd/api/dialects.py).
    dialects = {
        **dict.fromkeys(locallab.PATHS, locallab.render_error),
        **dict.fromkeys(rox.PATHS, rox.render_error),
    }
    app = Starlette(
        routes=routes,
        middleware=[
            # Outermost: a seed route's errors, whoever raised them, in its own shape.
            Middleware(ErrorDialects, renderers=dialects),
            # First: a body length said two ways closes the connection (thoxd/guards/framing.py).
            Middleware(FramingGuard),
            # Every answer names its request, refusals included (thoxd/api/request_ids.py).
            Middleware(RequestIdMiddleware),
            # Then who is asking, and by which name (thoxd/guards/lan.py).
            Middleware(LanGuard, hosts=hosts, allow_public_clients=settings.allow_public_clients),
            Middleware(MetricsMiddleware, metrics=metrics, routes=routes),
            *cors_middleware(settings.allowed_origins),  # answers preflights itself
            # Keys and rate limits, once keys are on; who is asking, for everyone after it.
            Middleware(AccessGuard, access=access),
            Middleware(BodyTimeoutMiddleware, seconds=settings.body_timeout_seconds),
            Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes),
            # After CORS, so an allowed page can read its 415; after the size check, so a
            # too-large body is a 413 whatever its type (thoxd/guards/cross_site.py).
            Middleware(CrossSiteGuard, allowed_origins=settings.allowed_origins),
            Middleware(ShutdownGate, shutdown=shutdown),
            # Last: a request for a model served elsewhere goes there (thoxd/fleet/forward.py).
            *(
                [Middleware(ForwardingMiddleware, router=router, on_usage=forwarded)]
                if router is not None
                else []
            ),
        ],
        exception_handlers={
            ThoxdError: _thoxd_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.discovery = discovery
    app.state.shutdown = shutdown
    app.state.metrics = metrics
    app.state.sampler = sampler
    app.state.settings = settings
    app.state.access = access
    app.state.fleet = fleet
    return app


async def _load_at_start(engine: Engine, default: str) -> None:
    """The default model, then the pinned ones; each failure is logged and left in its state."""
    default_id = engine.catalog.get(default).id
    names = [default_id, *(s.id for s in engine.catalog if s.pinned and s.id != default_id)]
    for name in names:
        try:
            await engine.load(name)
        except ThoxdError as exc:
            logger.error("model %s could not be loaded at start: %s", name, exc.message)


def reload_catalog(engine: Engine, settings: Settings) -> bool:
    """Re-read models.toml (on SIGHUP); an invalid file leaves the old catalog serving."""
    try:
        catalog = Catalog.load(settings.catalog)
        catalog.get(settings.default_model)
    except CatalogError as exc:
        logger.error("models.toml not reloaded, the old catalog stays: %s", exc)
        return False
    except ThoxdError:
        logger.error(
            "models.toml not reloaded, the old catalog stays: it has no default model %r",
            settings.default_model,
        )
        return False
    stale = engine.replace_catalog(catalog)
    logger.info(
        "models.toml reloaded: %d models%s",
        len(catalog),
        f"; {', '.join(stale)} will reload with their new entries once idle" if stale else "",
    )
    return True
