from __future__ import annotations

from pathlib import Path

import pytest

from thoxd.access import AccessDb


@pytest.fixture
def database(tmp_path: Path) -> AccessDb:
    db = AccessDb.in_state_dir(tmp_path / "state")
    db.create()
    return db
