from __future__ import annotations

import stat

from thoxd.access import AccessDb, KeyStore, Limits
from thoxd.access.keys import KEY_PREFIX


def test_a_key_is_random_shown_once_and_stored_only_as_a_hash(database: AccessDb) -> None:
    store = KeyStore(database)
    record, key = store.create("alice", Limits())
    _, other = store.create("bob", Limits())
    assert key.startswith(KEY_PREFIX) and len(key) >= len(KEY_PREFIX) + 43  # 256 bits
    assert key != other
    assert record.prefix == key[: len(record.prefix)] and len(record.prefix) < 12
    # Nothing on disk holds the key (or any long piece of it): the database and its WAL.
    for path in database.path.parent.iterdir():
        data = path.read_bytes()
        assert key.encode() not in data
        assert key[len(record.prefix) :].encode() not in data
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.name


def test_resolve_finds_the_key_in_force_and_nothing_else(database: AccessDb) -> None:
    store = KeyStore(database)
    record, key = store.create("alice", Limits(requests_per_minute=5), ["m1"])
    found = store.resolve(key)
    assert found is not None and found.id == record.id
    assert found.limits.requests_per_minute == 5 and found.models == ("m1",)
    assert store.resolve(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.resolve("not-a-key") is None
    assert store.resolve(KEY_PREFIX + "x" * 1000) is None


def test_revocation_takes_effect_at_the_next_lookup_from_another_store(
    database: AccessDb,
) -> None:
    daemon, cli = KeyStore(database), KeyStore(AccessDb(database.path))
    record, key = daemon.create("alice", Limits())
    assert daemon.resolve(key) is not None
    assert cli.revoke(record.id)
    assert daemon.resolve(key) is None
    assert not cli.revoke(record.id)  # once
    assert [r.id for r in daemon.list()] == []
    assert daemon.names() == {record.id: "alice"}  # kept for usage reports


def test_list_shows_no_secret(database: AccessDb) -> None:
    store = KeyStore(database)
    record, key = store.create("alice", Limits(tokens_per_day=0))
    [shown] = [r.public() for r in store.list()]
    assert shown["id"] == record.id and shown["name"] == "alice"
    assert shown["rate_limit"] == {"requests_per_minute": 60, "burst": 10, "tokens_per_day": 0}
    assert "key" not in shown and key not in str(shown)
