"""The access database: one SQLite file in the state directory, for keys and usage.

Connections are made per thread (SQLite's rule); WAL lets the usage writer commit while the
event loop reads a key. The file and its WAL are created owner-only (0600): they hold key
hashes and who used what.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

FILE_NAME = "access.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,      -- sha256 of the key, hex; the key itself is never stored
    prefix TEXT NOT NULL,           -- its first characters, to recognise it in a list
    created INTEGER NOT NULL,
    last_used INTEGER,
    revoked INTEGER,
    limits TEXT NOT NULL,           -- JSON: requests_per_minute, burst, tokens_per_day
    models TEXT                     -- JSON list of catalog ids, or NULL for every model
);
CREATE TABLE IF NOT EXISTS usage (
    client TEXT NOT NULL,           -- "owner", a key id, or "ip:ADDRESS"
    model TEXT NOT NULL,
    hour INTEGER NOT NULL,          -- unix time of the hour's start (UTC)
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client, model, hour)
);
"""


class AccessDb:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> AccessDb:
        return cls(state_dir / FILE_NAME)

    def create(self) -> None:
        """Make the file (owner-only) and its tables; harmless when they exist."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._open()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # outside a transaction, as SQLite asks
            db.executescript(_SCHEMA)
        finally:
            db.close()
        self.path.chmod(0o600)

    def _open(self) -> sqlite3.Connection:
        old = os.umask(0o077)  # the -wal and -shm files SQLite makes next to it too
        try:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        finally:
            os.umask(old)
        db.execute("PRAGMA busy_timeout=5000")
        return db

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for this thread: a transaction per `with`, committed at its end."""
        db = self._open()
        try:
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()
