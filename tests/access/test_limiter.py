from __future__ import annotations

import asyncio

from thoxd.access import AccessDb, Caller, Limiter, Limits, UsageLedger
from thoxd.errors import RateLimitExceeded


def admit_all(limiter: Limiter, caller: Caller, n: int) -> list[dict[str, str] | RateLimitExceeded]:
    async def run() -> list[dict[str, str] | RateLimitExceeded]:
        answers: list[dict[str, str] | RateLimitExceeded] = []
        for _ in range(n):
            try:
                answers.append(await limiter.admit(caller))
            except RateLimitExceeded as exc:
                answers.append(exc)
        return answers

    return asyncio.run(run())


def test_a_burst_is_let_in_then_refused_with_retry_after(database: AccessDb) -> None:
    limiter = Limiter(UsageLedger(database))
    # 6 a minute with a burst of 3: at most 3 in any 30 s (a window no slow machine outlasts).
    caller = Caller("key_a", limits=Limits(requests_per_minute=6, burst=3, tokens_per_day=0))
    answers = admit_all(limiter, caller, 5)
    allowed = [a for a in answers if isinstance(a, dict)]
    refused = [a for a in answers if isinstance(a, RateLimitExceeded)]
    assert len(allowed) == 3 and len(refused) == 2
    assert [a["X-RateLimit-Remaining"] for a in allowed] == ["2", "1", "0"]
    assert all(a["X-RateLimit-Limit"] == "6" for a in allowed)
    error = refused[0]
    assert error.status == 429 and error.kind == "requests"
    assert 1 <= int(error.headers["Retry-After"]) <= 30
    assert error.headers["X-RateLimit-Remaining"] == "0"
    assert error.envelope()["error"]["code"] == "rate_limit_exceeded"
    assert error.envelope()["error"]["type"] == "requests"


def test_the_minute_limit_holds_when_the_burst_is_the_whole_minute(database: AccessDb) -> None:
    limiter = Limiter(UsageLedger(database))
    caller = Caller("key_a", limits=Limits(requests_per_minute=4, burst=10, tokens_per_day=0))
    answers = admit_all(limiter, caller, 6)
    assert [isinstance(a, dict) for a in answers] == [True] * 4 + [False] * 2


def test_callers_are_counted_apart_and_unlimited_ones_not_at_all(database: AccessDb) -> None:
    limiter = Limiter(UsageLedger(database))
    limits = Limits(requests_per_minute=1, burst=1, tokens_per_day=0)
    assert isinstance(admit_all(limiter, Caller("a", limits=limits), 2)[1], RateLimitExceeded)
    assert isinstance(admit_all(limiter, Caller("b", limits=limits), 1)[0], dict)
    assert admit_all(limiter, Caller("owner", owner=True), 50) == [{}] * 50


def test_tokens_per_day_refuses_once_used_up(database: AccessDb) -> None:
    ledger = UsageLedger(database)
    limiter = Limiter(ledger)
    caller = Caller("key_a", limits=Limits(requests_per_minute=0, tokens_per_day=100))
    [first] = admit_all(limiter, caller, 1)
    assert isinstance(first, dict) and first["X-RateLimit-Remaining-Tokens"] == "100"
    ledger.record("key_a", "m1", 60, 50, 1)  # the request that crosses the line finished
    [refused] = admit_all(limiter, caller, 1)
    assert isinstance(refused, RateLimitExceeded) and refused.kind == "tokens"
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86_400


def test_zero_means_no_request_limit(database: AccessDb) -> None:
    limiter = Limiter(UsageLedger(database))
    caller = Caller("key_a", limits=Limits(requests_per_minute=0, tokens_per_day=0))
    assert admit_all(limiter, caller, 30) == [{}] * 30
