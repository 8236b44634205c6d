"""`GET /v1/usage` (also `/api/v1/usage`, `/usage`): what the engine served, in the Rax shape.

A client key sees its own usage, with its limits and what it used today. The owner (and, with
keys off, anyone: the box is open) sees everyone's, with a part per key (`by_key`), or one key's
with `?key_id=`. `start` and `end` (unix seconds, or ISO 8601 dates or date-times, UTC) choose
the period; the default is the current calendar month. Shape: thoxd/access/report.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.access.ledger import HOUR
from thoxd.access.report import month_of, parse_time, usage_report
from thoxd.errors import Forbidden, InvalidRequest
from thoxd.guards.access import Access, caller_of

PATHS = ("/v1/usage", "/api/v1/usage", "/usage")


class UsageRoutes:
    def __init__(self, access: Access) -> None:
        self.access = access

    def routes(self) -> list[Route]:
        return [Route(path, self.usage, methods=["GET"]) for path in PATHS]

    async def usage(self, request: Request) -> Response:
        caller = caller_of(request)
        sees_all = caller.owner or not self.access.keys_on
        query = request.query_params
        start, end = month_of(time.time())
        try:
            if "start" in query:
                start = parse_time(query["start"], end=False)
            if "end" in query:
                end = parse_time(query["end"], end=True)
        except ValueError:
            raise InvalidRequest(
                "'start' and 'end' are unix seconds or ISO 8601 dates or date-times "
                "(2026-11-01, 2026-11-01T12:00:00Z).",
                param="start" if "start" in query else "end",
            ) from None
        if end < start or end - start > 400 * 24 * HOUR:
            raise InvalidRequest("The period must end after it starts, within 400 days.")
        key_id = query.get("key_id")
        if key_id is not None and not sees_all and key_id != caller.id:
            raise Forbidden("A key may read its own usage only; the owner key reads every key's.")
        client = key_id if sees_all else caller.id
        names = await asyncio.to_thread(self.access.store.names) if client is None else None
        report: dict[str, Any] = await asyncio.to_thread(
            usage_report, self.access.ledger, start, end, client=client, names=names
        )
        if client == caller.id and caller.limits is not None:
            report["rate_limit"] = caller.limits.model_dump()
            report["tokens_today"] = self.access.ledger.tokens_today(caller.id)
        return JSONResponse(report)
