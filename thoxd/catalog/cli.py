"""`thoxd models list|add|check`: the catalog and its files, from the command line.

`list` also asks a running daemon (GET /v1/models on loopback, standard library only) which models
are loaded; `add` lives in thoxd/catalog/add.py. Output goes to stdout, reasons to stderr; the exit
code is 0 on success, 1 when something failed, 2 for bad settings or a catalog that does not load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from thoxd.catalog.add import AddError, add_model, format_size
from thoxd.catalog.entries import Catalog, CatalogError, ModelSpec
from thoxd.catalog.files import ModelFileError, model_path, packaged_file, verify_sha256
from thoxd.catalog.gguf import GGUFRejected, check_gguf
from thoxd.settings import Settings, load_settings, settings_error
from thoxd.units import format_bytes

_TIMEOUT = 2.0
_MAX_REPLY = 4 << 20
_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")

_LINK_HELP = (
    "hard-link the file into the models dir instead of copying it (same filesystem only; both "
    "names then share one file, so editing either changes both). A symbolic link would not do: "
    "thoxd refuses model files that resolve outside the models dir."
)


def add_models_parser(commands: Any) -> None:
    """Add `models` and its subcommands to `commands` (the subparsers of `thoxd`)."""
    models = commands.add_parser(
        "models",
        help="list, add and check the models of the catalog",
        description="Manage the model catalog (models.toml) and the models directory.",
    )
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=text, description=text)
        parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
        parser.add_argument(
            "--catalog", type=Path, metavar="FILE", help="models.toml (default: the setting)"
        )
        return parser

    show = action("list", "list the catalog and, when the daemon runs, each model's state")
    show.add_argument(
        "--host", metavar="HOST", help="where the daemon listens (default: the host setting)"
    )
    show.add_argument(
        "--port", type=int, metavar="PORT", help="the daemon's port (default: the port setting)"
    )
    show.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="default: the models_dir setting"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")

    add = action("add", "check a GGUF file, put it in the models dir, append it to the catalog")
    add.add_argument("path", type=Path, metavar="PATH", help="the GGUF file")
    add.add_argument("--id", metavar="ID", help="catalog id (default: from the file name)")
    add.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME",
        help="another name for it (repeatable)",
    )
    add.add_argument("--link", action="store_true", help=_LINK_HELP)
    add.add_argument(
        "--capability",
        action="append",
        default=[],
        choices=("chat", "completion", "embeddings"),
        help="what it serves (repeatable; default: chat and completion)",
    )
    add.add_argument(
        "--n-ctx",
        type=int,
        metavar="N",
        help="context window of one request (default: the model's, at most 8192)",
    )
    add.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="default: the models_dir setting"
    )

    check = action("check", "check every catalog entry's file: GGUF header and sha256")
    check.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="default: the models_dir setting"
    )
    check.add_argument(
        "--rehash", action="store_true", help="hash every file, even ones stamped as verified"
    )


def run_models(args: argparse.Namespace) -> int:
    names = ("catalog", "models_dir", "host", "port")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        settings = load_settings(overrides, args.config)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"thoxd: {settings_error(exc)}\n")
        return 2
    # A catalog that does not load is a broken setup, as bad settings are (`add` may create one).
    if args.models_command != "add" or os.path.lexists(settings.catalog):
        try:
            catalog = Catalog.load(settings.catalog)
        except CatalogError as exc:
            sys.stderr.write(f"thoxd: {exc}\n")
            return 2
    if args.models_command == "add":
        return _add(args, settings)
    if args.models_command == "list":
        return _list(catalog, settings, as_json=args.json)
    return _check(catalog, settings.resolved_models_dir, rehash=args.rehash)


# ---------------------------------------------------------------- list


def daemon_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in _ANY_ADDRESS else settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def fetch_states(url: str) -> tuple[dict[str, str] | None, str]:
    """id -> state from the daemon at `url`, or None and why not."""
    # No proxies: a local daemon, and an http_proxy variable must not send this elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url + "/v1/models", headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=_TIMEOUT) as reply:
            body = json.loads(reply.read(_MAX_REPLY))
    except urllib.error.HTTPError as exc:
        return None, f"the daemon at {url} answered HTTP {exc.code}"
    except (urllib.error.URLError, HTTPException, OSError):
        return None, f"daemon not running at {url}"
    except ValueError:
        return None, f"{url} answered something that is not JSON"
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None, f"{url}/v1/models answered without a model list"
    states = {
        str(m["id"]): str(m.get("state", "-"))
        for m in data
        if isinstance(m, dict) and isinstance(m.get("id"), str)
    }
    return states, f"daemon running at {url}"


def _file_state(spec: ModelSpec, models_dir: Path) -> tuple[bool, str]:
    try:
        present = model_path(spec, models_dir).is_file()
    except ModelFileError:
        return False, "outside"
    if present:
        return True, "yes"
    return False, "to assemble" if spec.package else "missing"


def _list(catalog: Catalog, settings: Settings, *, as_json: bool) -> int:
    url = daemon_url(settings)
    states, note = fetch_states(url)
    models_dir = settings.resolved_models_dir
    rows: list[dict[str, Any]] = []
    for spec in catalog:
        present, file_note = _file_state(spec, models_dir)
        rows.append(
            {
                "id": spec.id,
                "aliases": list(spec.aliases),
                "capabilities": sorted(spec.capabilities),
                "n_ctx": spec.n_ctx,
                "path": spec.path,
                "file": file_note,
                "file_present": present,
                "state": None if states is None else states.get(spec.id),
            }
        )
    extra = sorted(set(states or ()) - {spec.id for spec in catalog})
    if as_json:
        daemon = {"url": url, "running": states is not None, "note": note, "other_models": extra}
        out = {
            "catalog": str(settings.catalog),
            "models_dir": str(models_dir),
            "daemon": daemon,
            "models": rows,
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    header = ("ID", "ALIASES", "CAPABILITIES", "N_CTX", "FILE", "STATE")
    table = [header] + [
        (
            r["id"],
            ",".join(r["aliases"]) or "-",
            ",".join(r["capabilities"]),
            str(r["n_ctx"]),
            r["file"],
            r["state"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = (c.ljust(w) for c, w in zip(line, widths, strict=True))
        sys.stdout.write("  ".join(cells).rstrip() + "\n")
    sys.stdout.write(f"\n{note}\ncatalog {settings.catalog}, models dir {models_dir}\n")
    if extra:
        sys.stdout.write(f"the daemon also serves models not in this catalog: {', '.join(extra)}\n")
    return 0


# ---------------------------------------------------------------- add


def _add(args: argparse.Namespace, settings: Settings) -> int:
    source: Path = args.path
    try:
        added = add_model(
            source,
            settings.catalog,
            settings.resolved_models_dir,
            model_id=args.id,
            aliases=args.alias,
            capabilities=args.capability,
            n_ctx=args.n_ctx,
            link=args.link,
        )
    except AddError as exc:
        sys.stderr.write(f"thoxd: {exc}\n")
        return 1
    for path, size in added.removed:
        sys.stdout.write(
            f"removed {path.name} ({format_bytes(size)}), left by an interrupted copy\n"
        )
    spec = added.spec
    aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
    sys.stdout.write(
        f"added '{added.id}'{aliases} to {settings.catalog}\n"
        f"  file          {added.path} ({added.how}, {format_size(added.size)})\n"
        f"  sha256        {added.sha256[:16]}...\n"
        f"  n_ctx         {spec.n_ctx}\n"
        f"  capabilities  {', '.join(sorted(spec.capabilities))}\n"
        "A running daemon serves it once it reads the catalog again: systemctl reload thoxd\n"
        "(or send it SIGHUP).\n"
    )
    return 0


# ---------------------------------------------------------------- check


def check_entry(spec: ModelSpec, models_dir: Path, *, rehash: bool = False) -> tuple[bool, str]:
    """(ok, what was found) for one catalog entry."""
    try:
        path = model_path(spec, models_dir)
    except ModelFileError as exc:
        return False, str(exc)
    if not path.exists():
        if spec.package is None:
            return False, f"{spec.path} is missing from the models dir"
        if spec.package_file is not None:
            try:
                packaged_file(spec)
            except ModelFileError as exc:
                return False, f"{spec.path} is missing: {exc}"
            return True, f"not assembled yet (package {spec.package}); assembled at first load"
        module = spec.package.replace("-", "_")
        if importlib.util.find_spec(module) is None:
            return False, f"{spec.path} is missing and package {spec.package} is not installed"
        return True, f"not assembled yet (package {spec.package}); assembled at first load"
    try:
        info = check_gguf(path, root=models_dir)
    except GGUFRejected as exc:
        return False, str(exc)
    detail = f"{spec.path} ({format_size(path.stat().st_size)}, {info.architecture})"
    if spec.sha256 is None:
        return True, detail + ", no sha256 in the catalog"
    try:
        matches = verify_sha256(path, spec.sha256, trust_stamp=not rehash)
    except OSError as exc:
        return False, f"cannot read {spec.path}: {exc.strerror}"
    if not matches:
        return False, f"{spec.path} does not match its sha256"
    return True, detail + ", sha256 verified"


def _check(catalog: Catalog, models_dir: Path, *, rehash: bool) -> int:
    width = max(len(spec.id) for spec in catalog)
    failed = 0
    for spec in catalog:
        start = time.perf_counter()
        ok, detail = check_entry(spec, models_dir, rehash=rehash)
        took = time.perf_counter() - start
        failed += not ok
        mark = "OK  " if ok else "FAIL"
        sys.stdout.write(f"{mark}  {spec.id.ljust(width)}  {took:6.2f} s  {detail}\n")
    sys.stdout.write(f"{len(catalog) - failed} of {len(catalog)} OK (models dir {models_dir})\n")
    return 1 if failed else 0
