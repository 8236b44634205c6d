"""Rate limits per caller: requests per minute with a burst, and tokens per day.

Requests are counted by `limits` (moving windows, in memory): `requests_per_minute` in any
minute, and at most `burst` in the time `burst` requests take at that rate (60/min with a burst
of 10: 10 in any 10 seconds), so a client may send a burst at once and then the steady rate.
Tokens come from the usage ledger (since midnight UTC, persisted), checked before a request is
let in: the request that crosses the line finishes, the next one is refused.

Every limited answer carries X-RateLimit-Limit (requests per minute), X-RateLimit-Remaining
(requests that may be sent now), X-RateLimit-Reset (seconds until one more is allowed), and,
with a daily token limit, X-RateLimit-Limit-Tokens / X-RateLimit-Remaining-Tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from thoxd.access.callers import Caller, Limits
from thoxd.access.ledger import DAY, UsageLedger
from thoxd.errors import RateLimitExceeded


@dataclass(frozen=True)
class _Windows:
    minute: RateLimitItem
    burst: RateLimitItem | None  # None when the burst is the whole minute's allowance


def _windows(limits: Limits) -> _Windows | None:
    rpm = limits.requests_per_minute
    if rpm == 0:
        return None
    burst = None
    if limits.burst < rpm:
        burst = RateLimitItemPerSecond(limits.burst, max(1, math.ceil(limits.burst * 60 / rpm)))
    return _Windows(RateLimitItemPerMinute(rpm), burst)


class Limiter:
    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self._moving = MovingWindowRateLimiter(MemoryStorage())

    async def admit(self, caller: Caller) -> dict[str, str]:
        """Count one request of `caller`; its X-RateLimit-* headers, or RateLimitExceeded."""
        limits = caller.limits
        if limits is None:
            return {}
        headers: dict[str, str] = {}
        if limits.tokens_per_day:
            used = self.ledger.tokens_today(caller.id)
            headers["X-RateLimit-Limit-Tokens"] = str(limits.tokens_per_day)
            headers["X-RateLimit-Remaining-Tokens"] = str(max(0, limits.tokens_per_day - used))
            if used >= limits.tokens_per_day:
                now = time.time()
                raise RateLimitExceeded(
                    f"This key has used its {limits.tokens_per_day} tokens for today (UTC);"
                    " the count starts again at midnight UTC.",
                    kind="tokens",
                    retry_after=max(1, math.ceil(DAY - now % DAY)),
                    limit_headers=headers,
                )
        windows = _windows(limits)
        if windows is None:
            return headers
        items = [w for w in (windows.burst, windows.minute) if w is not None]
        refused = None
        for item in items:
            if not await self._moving.hit(item, caller.id):
                refused = item
                break
        stats = [await self._moving.get_window_stats(item, caller.id) for item in items]
        now = time.time()
        tightest = min(stats, key=lambda s: s.remaining)
        headers["X-RateLimit-Limit"] = str(limits.requests_per_minute)
        headers["X-RateLimit-Remaining"] = str(max(0, tightest.remaining))
        headers["X-RateLimit-Reset"] = str(max(0, math.ceil(tightest.reset_time - now)))
        if refused is not None:
            wait = await self._moving.get_window_stats(refused, caller.id)
            rpm = limits.requests_per_minute
            reached = (
                f"{limits.burst} requests at once (then {rpm} per minute)"
                if refused is windows.burst
                else f"{rpm} requests per minute"
            )
            raise RateLimitExceeded(
                f"Rate limit reached: {reached}.",
                kind="requests",
                retry_after=max(1, math.ceil(wait.reset_time - now)),
                limit_headers=headers,
            )
        return headers
