"""Who is asking: the owner, a client key, or a guest known by its address."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """A caller's rate limits; 0 means unlimited. The defaults are the Rax free tier."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    requests_per_minute: int = Field(60, ge=0, le=1_000_000)
    burst: int = Field(10, ge=1, le=1_000_000)
    tokens_per_day: int = Field(100_000, ge=0, le=10**12)


@dataclass(frozen=True)
class Caller:
    """`id` is what the queue's fair share, the limiter and the ledger count by: "owner", a key's
    id ("key_..."), or "ip:ADDRESS" for a guest (keys off)."""

    id: str
    name: str = ""
    owner: bool = False
    limits: Limits | None = None  # None: no limits at all
    models: frozenset[str] | None = None  # catalog ids this caller may use; None: every model

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


OWNER = Caller("owner", "owner", owner=True)


def guest(address: str, limits: Limits | None) -> Caller:
    return Caller(f"ip:{address}", address, limits=limits)
