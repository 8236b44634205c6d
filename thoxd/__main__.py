"""The `thoxd` command: argparse -> Settings -> the daemon. Returns an exit code.

Every Settings field is a flag of `thoxd serve` (its description is the help text), so the CLI,
the environment and the TOML file can never drift apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from thoxd import __version__
from thoxd.access.cli import add_access_parsers, run_keys, run_usage
from thoxd.api import mcp_stdio
from thoxd.catalog.cli import add_models_parser, run_models
from thoxd.catalog.entries import Catalog, CatalogError
from thoxd.catalog.files import remove_stale_partials
from thoxd.errors import ModelNotFound
from thoxd.settings import Settings, load_settings, settings_error

COMMANDS = ("serve", "models", "keys", "usage", "mcp-stdio")
# Settings that are no flag: a secret on the command line is readable by every local user
# (/proc/PID/cmdline) and lands in shell history. The environment or the TOML file set it.
NOT_FLAGS = frozenset({"owner_key", "fleet_secret"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    epilog = (
        "Every serve flag can also be set as THOXD_<NAME> in the environment or in the "
        "TOML config file (flag > environment > file > default)."
    )
    parser = argparse.ArgumentParser(
        prog="thoxd",
        description="The daemon of a local LLM appliance: an OpenAI-compatible API on llama.cpp.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"thoxd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon (the default command)",
        epilog=epilog,
        description="Run the daemon. `serve` is the default command.",
    )
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: /etc/thoxd/thoxd.toml when present)",
    )
    for name, field in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        annotation = field.annotation
        kwargs: dict[str, Any] = {"help": field.description, "default": argparse.SUPPRESS}
        if get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        serve.add_argument(_flag(name), dest=name, metavar=name.upper(), **kwargs)
    add_models_parser(commands)
    add_access_parsers(commands)
    mcp_stdio.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    # `serve` is the default command: `thoxd --port 9000` and `thoxd --help` mean serve's.
    if not args_in or args_in[0] not in (*COMMANDS, "--version"):
        args_in.insert(0, "serve")
    args = build_parser().parse_args(args_in)
    if args.command == "models":
        return run_models(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "usage":
        return run_usage(args)
    if args.command == "mcp-stdio":
        return mcp_stdio.run(args)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = load_settings(overrides, args.config)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"thoxd: {settings_error(exc)}\n")
        return 2
    try:
        catalog = load_catalog(settings)
    except CatalogError as exc:
        sys.stderr.write(f"thoxd: {exc}\n")
        return 2

    from thoxd.server import configure_logging, serve

    configure_logging(settings.log_level)
    remove_stale_partials(settings.resolved_models_dir, catalog)
    try:
        return serve(settings)
    except (CatalogError, ModelNotFound) as exc:  # models.toml changed since it was read
        sys.stderr.write(f"thoxd: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


def load_catalog(settings: Settings) -> Catalog:
    """The catalog the daemon will serve, checked before anything starts or binds: a broken
    models.toml is a one-line message and exit 2, like a bad setting."""
    catalog = Catalog.load(settings.catalog)
    try:
        catalog.get(settings.default_model)
    except ModelNotFound:
        raise CatalogError(
            f"{settings.catalog.name}: the default model '{settings.default_model}' is not in it"
            " (set default_model to one of its ids or aliases)"
        ) from None
    return catalog


if __name__ == "__main__":
    sys.exit(main())
