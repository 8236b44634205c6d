"""The install id: a random name for this installation, made once and kept in the state dir.

It tells boxes apart on the LAN (the `id=` key of the mDNS TXT record, `/system/info`) without
revealing anything about the machine: no serial, no MAC, no host or user name. A new state dir
(a reinstall) gets a new id. The file is `STATE_DIR/install-id`, mode 0600, one line of hex.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from pathlib import Path

logger = logging.getLogger("thoxd.install_id")

FILENAME = "install-id"
_ID = re.compile(r"^[0-9a-f]{16,64}$")


def new_install_id() -> str:
    """64 random bits as 16 hex digits: unique enough for a LAN, short enough for TXT."""
    return secrets.token_hex(8)


def load_install_id(state_dir: Path) -> str:
    """The id kept in `state_dir`, created there (0600) on first use.

    Two daemons starting at once on one state dir agree: the file appears atomically, complete,
    and whoever comes second reads the first one's id. An unreadable or damaged file is replaced;
    a state dir that cannot be written gives an id for this run only, with a warning.
    """
    path = state_dir / FILENAME
    for _ in range(3):
        existing = _read(path)
        if existing is not None:
            return existing
        candidate = new_install_id()
        try:
            if _create(path, candidate):
                return candidate
        except OSError as exc:
            logger.warning(
                "cannot keep the install id in the state dir (%s); using one for this run only",
                exc.strerror or type(exc).__name__,
            )
            return candidate
    return new_install_id()  # the file keeps being damaged under us: give up on keeping it


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text = ""
    if _ID.match(text):
        return text
    logger.warning("the install id file is damaged; making a new install id")
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _create(path: Path, install_id: str) -> bool:
    """Write `install_id` to `path` unless the file exists; False when it already did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILENAME}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(install_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and refuses to replace an existing id
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: atomic still, not exclusive
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
