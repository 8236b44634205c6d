"""`thoxd keys` and `thoxd usage` on the database, with the daemon stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thoxd.__main__ import main
from thoxd.access import AccessDb, KeyStore, Limits, UsageLedger


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


@pytest.mark.usefixtures("clean_settings_env")
def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path)]
    code, out = run(
        capsys, "keys", "create", "ci bot", "--requests-per-minute", "5", "--json", *state
    )
    assert code == 0
    created = json.loads(out)
    assert created["name"] == "ci bot" and created["rate_limit"]["requests_per_minute"] == 5
    store = KeyStore(AccessDb.in_state_dir(tmp_path))
    assert store.resolve(created["key"]) is not None
    code, out = run(capsys, "keys", "list", *state)
    assert code == 0 and created["id"] in out and created["key"] not in out
    assert run(capsys, "keys", "revoke", created["id"], *state)[0] == 0
    assert store.resolve(created["key"]) is None
    assert run(capsys, "keys", "revoke", created["id"], *state)[0] == 1
    assert run(capsys, "keys", "list", *state)[1] == "no keys\n"


@pytest.mark.usefixtures("clean_settings_env")
def test_create_refuses_bad_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["keys", "create", "x", "--burst", "0", "--state-dir", str(tmp_path)])
    assert code == 2 and "burst" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_settings_env")
def test_usage_prints_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = AccessDb.in_state_dir(tmp_path)
    database.create()
    record, _ = KeyStore(database).create("alice", Limits())
    ledger = UsageLedger(database)
    ledger.record(record.id, "m1", 30, 12, 2)
    ledger.flush()
    code, out = run(capsys, "usage", "--json", "--state-dir", str(tmp_path))
    assert code == 0
    report = json.loads(out)
    assert report["total_tokens"] == 42 and report["total_requests"] == 2
    assert report["by_key"][record.id]["name"] == "alice"
    code, out = run(capsys, "usage", "--state-dir", str(tmp_path))
    assert code == 0 and "42 tokens, 2 requests" in out and "alice" in out
