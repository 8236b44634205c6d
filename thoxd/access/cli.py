"""`thoxd keys create|list|revoke` and `thoxd usage`: the owner's tools, on the database itself.

They work with the daemon stopped or running (SQLite serialises the writers; a revocation
takes effect at the key's next request). The state directory comes from the settings
(`--config`, THOXD_STATE_DIR, or `--state-dir`). Exit code 0 on success, 1 when the key is not
found, 2 for bad settings or arguments.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from thoxd.access.callers import Limits
from thoxd.access.database import AccessDb
from thoxd.access.keys import KeyStore
from thoxd.access.ledger import UsageLedger
from thoxd.access.report import month_of, parse_time, usage_report
from thoxd.settings import load_settings, settings_error

_DEFAULTS = Limits()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="default: the setting")


def add_access_parsers(commands: Any) -> None:
    """Add `keys` and `usage` to `commands` (the subparsers of `thoxd`)."""
    keys = commands.add_parser(
        "keys",
        help="create, list and revoke client API keys",
        description="Client API keys (in force once owner_key is set).",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key; it is printed once")
    _common(create)
    create.add_argument("name", help="who or what the key is for")
    create.add_argument(
        "--requests-per-minute",
        type=int,
        default=_DEFAULTS.requests_per_minute,
        metavar="N",
        help=f"0: no limit (default {_DEFAULTS.requests_per_minute})",
    )
    create.add_argument(
        "--burst", type=int, default=_DEFAULTS.burst, metavar="N", help="requests at once"
    )
    create.add_argument(
        "--tokens-per-day",
        type=int,
        default=_DEFAULTS.tokens_per_day,
        metavar="N",
        help=f"0: no limit (default {_DEFAULTS.tokens_per_day})",
    )
    create.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="ID",
        help="a catalog id the key may use (repeatable; default: every model)",
    )
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", help="the keys in force (no secrets)")
    _common(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", help="revoke a key at once")
    _common(revoke)
    revoke.add_argument("key_id", metavar="ID", help="the key's id (key_...)")

    usage = commands.add_parser(
        "usage",
        help="tokens and requests served, by model and key",
        description="Usage from the ledger (the current month by default).",
    )
    _common(usage)
    usage.add_argument("--key-id", metavar="ID", help="one key's usage")
    usage.add_argument("--start", metavar="WHEN", help="unix seconds or ISO 8601 (UTC)")
    usage.add_argument("--end", metavar="WHEN", help="unix seconds or ISO 8601 (UTC)")
    usage.add_argument("--json", action="store_true", help="print JSON")


def _database(args: argparse.Namespace) -> AccessDb | None:
    overrides = {"state_dir": args.state_dir} if args.state_dir is not None else {}
    try:
        settings = load_settings(overrides, args.config)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"thoxd: {settings_error(exc)}\n")
        return None
    database = AccessDb.in_state_dir(settings.state_dir)
    database.create()
    return database


def run_keys(args: argparse.Namespace) -> int:
    database = _database(args)
    if database is None:
        return 2
    store = KeyStore(database)
    try:
        if args.keys_command == "create":
            return _create(store, args)
        if args.keys_command == "list":
            return _list(store, as_json=args.json)
        if store.revoke(args.key_id):
            sys.stdout.write(f"revoked {args.key_id}\n")
            return 0
        sys.stderr.write(f"thoxd: no key {args.key_id!r} in force\n")
        return 1
    except sqlite3.Error as exc:
        sys.stderr.write(f"thoxd: the key database could not be used: {exc}\n")
        return 2


def _create(store: KeyStore, args: argparse.Namespace) -> int:
    try:
        limits = Limits(
            requests_per_minute=args.requests_per_minute,
            burst=args.burst,
            tokens_per_day=args.tokens_per_day,
        )
    except ValidationError as exc:
        sys.stderr.write(f"thoxd: {settings_error(exc)}\n")
        return 2
    if not args.name.strip() or len(args.name) > 128:
        sys.stderr.write("thoxd: the name must be 1 to 128 characters\n")
        return 2
    record, key = store.create(args.name, limits, args.models)
    if args.json:
        sys.stdout.write(json.dumps({**record.public(), "key": key}, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"created {record.id} ({record.name})\n{key}\n"
            "This is the only time the key is shown: keep it now.\n"
        )
    return 0


def _list(store: KeyStore, *, as_json: bool) -> int:
    records = store.list()
    if as_json:
        sys.stdout.write(json.dumps([r.public() for r in records], indent=2) + "\n")
        return 0
    if not records:
        sys.stdout.write("no keys\n")
    for r in records:
        used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.last_used)) if r.last_used else "-"
        limits = r.limits
        models = ",".join(r.models) if r.models is not None else "any model"
        sys.stdout.write(
            f"{r.id}  {r.prefix}...  {r.name}  last used {used}  "
            f"{limits.requests_per_minute}/min burst {limits.burst}, "
            f"{limits.tokens_per_day} tokens/day, {models}\n"
        )
    return 0


def run_usage(args: argparse.Namespace) -> int:
    database = _database(args)
    if database is None:
        return 2
    start, end = month_of(time.time())
    try:
        if args.start:
            start = parse_time(args.start, end=False)
        if args.end:
            end = parse_time(args.end, end=True)
    except ValueError:
        sys.stderr.write("thoxd: --start/--end take unix seconds or ISO 8601 dates\n")
        return 2
    names = KeyStore(database).names()
    report = usage_report(
        UsageLedger(database), start, end, client=args.key_id, names=None if args.key_id else names
    )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"{report['period_start']} to {report['period_end']}: {report['total_tokens']} tokens,"
        f" {report['total_requests']} requests\n"
    )
    for model, part in report["breakdown"].items():
        sys.stdout.write(f"  {model}: {part['tokens']} tokens, {part['requests']} requests\n")
    for who, part in report.get("by_key", {}).items():
        sys.stdout.write(
            f"{who} ({part['name']}): {part['total_tokens']} tokens,"
            f" {part['total_requests']} requests\n"
        )
    return 0
