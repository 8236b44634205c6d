"""What a model load needs before llama.cpp reads its weights, and what a failed one says.

Off the event loop: the file (assembled, sha256 checked), our own bounded GGUF gate, the memory
estimate from its header (with the layers offloaded to the GPUs: as asked, or as many as fit
their budget), and for a model split over RPC servers (thoxd/engine/rpc.py) their
devices, each server reached first. `load_failure` turns whatever a load raised into the reason
the model's state keeps and the error its client gets: no paths, no library text.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from thoxd.catalog.entries import ModelSpec
from thoxd.catalog.files import ModelFileError, ensure_model_file, model_path
from thoxd.catalog.gguf import GGUFRejected, check_gguf
from thoxd.engine.devices import device_memory
from thoxd.engine.embed import EMBED_BATCH
from thoxd.engine.llama import LlamaLoadError
from thoxd.engine.memory import MemoryEstimate, Shape, budget_bytes, estimate_memory, fit_layers
from thoxd.engine.model import EngineConfig, rpc_layers
from thoxd.engine.rpc import LIBRARY as RPC_LIBRARY
from thoxd.engine.rpc import RpcBackend, RpcUnavailable, reachable
from thoxd.errors import EngineFailure, InsufficientMemory, ModelFileRejected, ThoxdError
from thoxd.units import format_bytes

logger = logging.getLogger("thoxd.engine")


@dataclass(frozen=True)
class Prepared:
    """A model file that passed the gate, with its estimated cost."""

    path: Path
    memory: MemoryEstimate


class Loader:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._rpc: RpcBackend | None = None  # loaded with the first split model
        self._gpu_budget: int | None = None

    @property
    def gpu_budget(self) -> int:
        """Bytes of GPU memory loaded models may use together; 0 without a GPU (or before the
        first estimate has looked)."""
        return self._gpu_budget or 0

    def _measure_gpus(self) -> int:
        """gpu_budget, looked up the first time. Blocking (a GPU backend starts)."""
        if self._gpu_budget is None:
            total = sum(d.total for d in self.config.gpu_devices())
            self._gpu_budget = budget_bytes(self.config.gpu_memory_budget, total) if total else 0
        return self._gpu_budget

    def prepare(self, spec: ModelSpec) -> Prepared:
        """The file (assembled, sha256 checked), the gate, the estimate. Blocking."""
        self.config.faults.load(spec.id)
        path = ensure_model_file(spec, self.config.models_dir)
        return Prepared(path, self._estimate(spec, path))

    def estimate(self, spec: ModelSpec) -> MemoryEstimate | None:
        """The cost of `spec` if its file is present and passes the gate. Blocking."""
        try:
            return self._estimate(spec, model_path(spec, self.config.models_dir))
        except (ModelFileError, GGUFRejected):
            return None

    def _estimate(self, spec: ModelSpec, path: Path) -> MemoryEstimate:
        # Our own bounded header check, before llama.cpp's C++ parser ever sees the file.
        info = check_gguf(path, root=self.config.models_dir)

        def at(layers: int) -> MemoryEstimate:
            return estimate_memory(
                info,
                n_ctx=spec.n_ctx,
                slots=self.config.slots,
                outputs=self.config.max_outputs,
                batch_size=self.config.batches(offloaded=layers != 0 and not spec.rpc)[1],
                embeddings="embeddings" in spec.capabilities,
                embed_batch=EMBED_BATCH,
                gpu_layers=layers,
            )

        if spec.rpc:  # a split model's layers are placed on its servers as on a GPU
            split = at(rpc_layers(spec))
            return replace(split, gpu=0, remote=split.gpu)
        wanted = self.config.n_gpu_layers if spec.n_gpu_layers is None else spec.n_gpu_layers
        room = self._measure_gpus()
        if not room or wanted == 0:
            return at(0)
        if wanted == "auto":
            return at(fit_layers(at, Shape.of(info).n_layer, room))
        return at(wanted)  # as asked: more than the budget is refused when loading

    def rpc_devices(self, spec: ModelSpec, need: MemoryEstimate) -> list[int]:
        """The RPC servers' devices a split model's layers go to, with room for `need`'s share
        there; [] for any other. Blocking."""
        if not spec.rpc:
            return []
        if self._rpc is None:
            for endpoint in spec.rpc:  # unreachable is the likelier failure: say that first
                reachable(endpoint)
            if self.config.rpc_build is None:
                raise RpcUnavailable("this daemon has no RPC backend (scripts/build-rpc)")
            self._rpc = RpcBackend(self.config.rpc_build / "lib" / RPC_LIBRARY)
        devices = self._rpc.devices(spec.rpc)
        # llama.cpp spreads the layers over the devices by their free memory; what does not fit
        # fails inside a server, which tells llama.cpp no more than that.
        free = sum(device_memory(device)[0] for device in devices)
        if need.remote > free:
            raise InsufficientMemory(
                f"The model '{spec.id}' needs about {format_bytes(need.remote)} on its RPC "
                f"servers, which have {format_bytes(free)} free. Lower its n_ctx or n_gpu_layers "
                "(the rest stays on this box), or add a server."
            )
        return devices


def load_failure(model_id: str, exc: Exception) -> tuple[str, ThoxdError]:
    """The reason a failed load leaves in the model's state, and the error for its client."""
    if isinstance(exc, ModelFileError | GGUFRejected):
        logger.error("model %s was refused: %s", model_id, exc)
        return str(exc), ModelFileRejected(model_id, str(exc))
    if isinstance(exc, RpcUnavailable):
        logger.error("model %s cannot be split: %s", model_id, exc)
        return str(exc), EngineFailure(f"The model '{model_id}' cannot load: {exc}.")
    if isinstance(exc, LlamaLoadError):
        logger.error("model %s failed to load: %s", model_id, exc)
        return "llama.cpp could not load the file", EngineFailure(
            f"The model '{model_id}' failed to load."
        )
    # Anything else (a full disk, a bug): say so, stay usable.
    logger.error("model %s failed to load", model_id, exc_info=exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        reason = f"a file operation failed ({errno.errorcode.get(exc.errno, exc.errno)})"
    else:
        reason = f"an unexpected {type(exc).__name__}"
    return reason, EngineFailure(f"The model '{model_id}' failed to load: {reason}.")
