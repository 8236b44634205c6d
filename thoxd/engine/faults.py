"""The engine's fault seam: where tests make llama.cpp, a step or a load fail.

The daemon runs with `Faults()`, whose hooks do nothing. A test passes a subclass in
`EngineConfig.faults` whose hook raises, returns an error code, or blocks, and then checks what
clients see (an `engine_error` on every surface), what the model does (recovers, or says why it
cannot), what /health says, and how shutdown copes. The hooks sit where real failures happen:

    load(model_id)              on the loading thread, before llama.cpp opens the file
    decode(model_id, n_tokens)  on the engine thread, before each generation step's llama_decode;
                                a return value replaces llama_decode's return code (the decode
                                is skipped), so a test can fake rc < 0 or hang the thread
    step(model_id)              on the engine thread, at the start of each generation step
    embed(model_id, n_tokens)   on the engine thread, before each embedding chunk's decode
"""

from __future__ import annotations


class Faults:
    """No faults: what the daemon runs with."""

    def load(self, model_id: str) -> None:
        return None

    def decode(self, model_id: str, n_tokens: int) -> int | None:
        return None

    def step(self, model_id: str) -> None:
        return None

    def embed(self, model_id: str, n_tokens: int) -> None:
        return None
