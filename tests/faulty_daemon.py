"""`python -m tests.faulty_daemon serve ...`: the real daemon with a fault injected through the
engine's seam (thoxd/engine/faults.py), named by THOXD_TEST_FAULT. For tests of what the process
does when llama.cpp misbehaves; the daemon itself has no such switch."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable

import thoxd.app
from thoxd.__main__ import main
from thoxd.engine import EngineConfig, Faults
from thoxd.settings import Settings


class HangingDecode(Faults):
    """Every generation decode blocks for ever, as a wedged driver would."""

    def decode(self, model_id: str, n_tokens: int) -> int | None:
        logging.getLogger("thoxd.engine").warning("injected fault: this decode never returns")
        threading.Event().wait()
        return None


FAULTS: dict[str, Callable[[], Faults]] = {"hang-decode": HangingDecode}


def with_fault(config: Callable[[Settings], EngineConfig]) -> Callable[[Settings], EngineConfig]:
    def engine_config(settings: Settings) -> EngineConfig:
        return dataclasses.replace(
            config(settings),
            faults=FAULTS[os.environ["THOXD_TEST_FAULT"]](),
            stop_timeout=float(os.environ.get("THOXD_TEST_STOP_TIMEOUT", "10")),
        )

    return engine_config


if __name__ == "__main__":
    thoxd.app.engine_config = with_fault(thoxd.app.engine_config)  # type: ignore[assignment]
    sys.exit(main())
