"""Client keys: made by the owner, shown once, stored only as hashes.

A key is `thox_` and 43 characters of base64url (256 random bits). The database keeps its
sha256 (a key is random, so a fast hash is as strong as a slow one) and its first characters
for lists. A lookup is by hash, then compared in constant time; a revoked key stops working
at its next request, whichever process revoked it (the daemon or `thoxd keys revoke`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from thoxd.access.callers import Caller, Limits
from thoxd.access.database import AccessDb

KEY_PREFIX = "thox_"
_SHOWN = len(KEY_PREFIX) + 4  # characters of a key a list shows: "thox_AbCd"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    created: int
    last_used: int | None
    limits: Limits
    models: tuple[str, ...] | None

    def caller(self) -> Caller:
        models = frozenset(self.models) if self.models is not None else None
        return Caller(self.id, self.name, limits=self.limits, models=models)

    def public(self) -> dict[str, Any]:
        """What GET /api/keys shows: everything but a secret."""
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "created": self.created,
            "last_used": self.last_used,
            "prefix": self.prefix,
            "rate_limit": self.limits.model_dump(),
            "models": list(self.models) if self.models is not None else None,
        }


_COLUMNS = "id, name, prefix, created, last_used, limits, models"


def _record(row: tuple[Any, ...]) -> KeyRecord:
    id_, name, prefix, created, last_used, limits, models = row
    return KeyRecord(
        id=id_,
        name=name,
        prefix=prefix,
        created=created,
        last_used=last_used,
        limits=Limits.model_validate_json(limits),
        models=tuple(json.loads(models)) if models is not None else None,
    )


class KeyStore:
    def __init__(self, db: AccessDb) -> None:
        self.db = db

    def create(
        self, name: str, limits: Limits, models: list[str] | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key: its record, and the key itself (returned this once, never stored)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            name=name,
            prefix=key[:_SHOWN],
            created=int(time.time()),
            last_used=None,
            limits=limits,
            models=tuple(models) if models is not None else None,
        )
        with self.db.connect() as db:
            db.execute(
                "INSERT INTO keys (id, name, hash, prefix, created, limits, models)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    name,
                    key_hash(key),
                    record.prefix,
                    record.created,
                    limits.model_dump_json(),
                    json.dumps(models) if models is not None else None,
                ),
            )
        return record, key

    def list(self) -> list[KeyRecord]:
        """The keys in force, oldest first."""
        with self.db.connect() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE revoked IS NULL ORDER BY created, id"
            ).fetchall()
        return [_record(row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """False when there is no such key in force. The row stays (its usage keeps a name)."""
        with self.db.connect() as db:
            cursor = db.execute(
                "UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (int(time.time()), key_id),
            )
        return cursor.rowcount == 1

    def names(self) -> dict[str, str]:
        """Every key's name by id, revoked ones too (for usage reports)."""
        with self.db.connect() as db:
            return dict(db.execute("SELECT id, name FROM keys").fetchall())

    def resolve(self, key: str) -> KeyRecord | None:
        """The key in force that `key` is, or None."""
        if not key.startswith(KEY_PREFIX) or len(key) > 256:
            return None
        digest = key_hash(key)
        with self.db.connect() as db:
            row = db.execute(
                f"SELECT {_COLUMNS}, hash FROM keys WHERE hash = ? AND revoked IS NULL",
                (digest,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[-1], digest):
            return None
        return _record(row[:-1])
