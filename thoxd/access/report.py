"""Usage in the Rax docs' shape, for `GET /v1/usage` and `thoxd usage`.

    {"object": "usage", "total_tokens", "total_requests", "period_start", "period_end",
     "breakdown": {model: {"tokens", "requests"}},
     "key_id" (one caller's usage) | "by_key": {id: {"name", "total_tokens", "total_requests",
                                                     "breakdown"}} (the owner's view)}

Periods are read at the hour: usage is kept by hour (UTC). The default period is the current
calendar month, as the Rax example shows it.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Any

from thoxd.access.ledger import UsageLedger, UsageRow

UTC = dt.UTC


def month_of(now: float) -> tuple[int, int]:
    """The calendar month holding `now`: its first and last second (unix, UTC)."""
    day = dt.datetime.fromtimestamp(now, UTC)
    first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_day = calendar.monthrange(first.year, first.month)[1]
    return int(first.timestamp()), int(first.timestamp()) + last_day * 86_400 - 1


def parse_time(text: str, *, end: bool) -> int:
    """Unix seconds, an ISO 8601 date (an end date means its last second) or date-time (UTC
    when no offset is given). ValueError otherwise."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if len(text) == 10:  # YYYY-MM-DD
        day = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), UTC)
        return int(day.timestamp()) + (86_399 if end else 0)
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _totals(rows: list[UsageRow]) -> dict[str, Any]:
    breakdown: dict[str, dict[str, int]] = {}
    for row in rows:
        model = breakdown.setdefault(row.model, {"tokens": 0, "requests": 0})
        model["tokens"] += row.tokens
        model["requests"] += row.requests
    return {
        "total_tokens": sum(r.tokens for r in rows),
        "total_requests": sum(r.requests for r in rows),
        "breakdown": breakdown,
    }


def usage_report(
    ledger: UsageLedger,
    start: int,
    end: int,
    *,
    client: str | None = None,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One client's usage (`client`), or everyone's with a per-client part (`names`: the key
    names to show). Blocking (SQLite): call it from a worker thread."""
    rows = ledger.report(start, end, client)
    report: dict[str, Any] = {
        "object": "usage",
        **_totals(rows),
        "period_start": iso(start),
        "period_end": iso(end),
    }
    if client is not None:
        report["key_id"] = client
        return report
    by_client: dict[str, list[UsageRow]] = {}
    for row in rows:
        by_client.setdefault(row.client, []).append(row)
    report["by_key"] = {
        who: {"name": _name(who, names or {}), **_totals(part)} for who, part in by_client.items()
    }
    return report


def _name(client: str, names: dict[str, str]) -> str:
    if client in names:
        return names[client]
    return client.removeprefix("ip:") if client.startswith("ip:") else client
