"""The engine as the rest of thoxd sees it: catalog models loaded on demand within a memory
budget, and unloaded when idle too long or when a load needs their room.

Residency rules (README, "Models"):
- a request for a model that is not loaded loads it and waits; concurrent requests share the load;
- before loading, the file passes the GGUF gate and its memory is estimated from the header; a
  model larger than the whole budget is refused (507) with the estimate; otherwise idle models
  are evicted least recently used first; if the rest are busy or pinned the load is refused for
  now (503 with Retry-After) and nothing is evicted;
- a model with a running, queued or starting request is never evicted; a pinned one only goes
  when unloaded explicitly; keep_alive unloads an idle model after its time;
- a failed load leaves every resident model serving: the file is checked (gate, sha256, and
  llama.cpp's own reading of its header when the load would evict) before anything is evicted;
  whatever made it fail, the model's state is `error` with the reason until a load succeeds;
- a model whose engine thread gave up (thoxd.engine.scheduler) is `error` with the reason, is
  unloaded once idle, and loads afresh on the next request;
- a model is freed only once its engine thread has stopped: one still inside llama.cpp at
  shutdown is left to the process's exit (`Engine.stuck`).
All of this runs on the event loop; only the loads and unloads themselves go to threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.engine.llama import backend_init, probe_model, route_llama_logs
from thoxd.engine.loading import Loader, load_failure
from thoxd.engine.memory import MemoryEstimate
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Finished, Generation
from thoxd.errors import (
    EngineFailure,
    InsufficientMemory,
    MemoryBusy,
    ModelBusy,
    ThoxdError,
    UnsupportedCapability,
)
from thoxd.units import format_bytes

__all__ = ["Engine", "EngineConfig", "LoadedModel"]

logger = logging.getLogger("thoxd.engine")

# The keep_alive clock is checked at least this often (seconds).
_REAP_INTERVAL = 1.0


class Engine:
    def __init__(self, catalog: Catalog, config: EngineConfig) -> None:
        self.catalog = catalog
        self.config = config
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._reserved: dict[str, MemoryEstimate] = {}  # held for loads in progress
        self._unloading: set[asyncio.Task[bool]] = set()
        self.stuck = False  # an engine thread did not stop, so its model was never freed
        self._errors: dict[str, str] = {}
        self._load_counts: Counter[str] = Counter()
        self._loader = Loader(config)  # files, gate, estimates, RPC devices (loading.py)
        self._started = False
        self._reaper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        # Called on a model's engine thread with (model id, Finished) for every finished
        # generation: the one place tokens and latencies are counted (thoxd/api/metrics.py).
        # Quick only.
        self.on_finished: Callable[[str, Generation, Finished], None] | None = None

    # -- what is where (never touches a model's idle clock) ---------------------------------

    @property
    def budget(self) -> int:
        return self.config.memory_budget

    @property
    def gpu_budget(self) -> int:
        """GPU memory loaded models may use together; 0 without a GPU, or before a load."""
        return self._loader.gpu_budget

    def used(self) -> int:
        """Bytes of host memory held by loaded models and reserved by loads in progress."""
        return sum(m.host for m in self._held())

    def gpu_used(self) -> int:
        return sum(m.gpu for m in self._held())

    def _held(self) -> list[MemoryEstimate]:
        return [m.memory for m in self._loaded.values()] + list(self._reserved.values())

    def state(self, model_id: str) -> str:
        if model_id in self._loading:
            return "loading"
        model = self._loaded.get(model_id)
        if model is not None:
            return "error" if model.failed else "loaded"
        return "error" if model_id in self._errors else "unloaded"

    def error(self, model_id: str) -> str | None:
        model = self._loaded.get(model_id)
        if model is not None and model.failed:
            return model.failed
        return self._errors.get(model_id)

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def resident(self, model_id: str) -> LoadedModel | None:
        return self._loaded.get(model_id)

    def times_loaded(self, model_id: str) -> int:
        return self._load_counts[model_id]

    def keep_alive_of(self, spec: ModelSpec) -> float:
        """A model's own keep_alive when a request sets none."""
        return self.config.keep_alive if spec.keep_alive is None else spec.keep_alive

    # -- using a model ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str, keep_alive: float | None = None) -> AsyncIterator[LoadedModel]:
        """The model behind `name`, loaded if need be and held (never evicted) until exit.
        `keep_alive` (a request's own) replaces the model's until the next request."""
        while True:
            model = await self.load(name)
            # Between a load finishing and this task resuming, keep_alive 0 may have taken it.
            if self._loaded.get(model.spec.id) is model:
                break
        model.keep_alive = self.keep_alive_of(model.spec) if keep_alive is None else keep_alive
        try:
            with model.lease():
                yield model
        finally:
            self._idle.set()  # the keep_alive clock may start

    async def load(self, name: str) -> LoadedModel:
        """Load (or join the load of) a catalog model; 404 for a name the catalog lacks."""
        spec = self.catalog.get(name)
        if spec.rpc and not self.config.rpc_in_process:  # thoxd/fleet/split.py serves it
            raise UnsupportedCapability(
                f"The model '{spec.id}' is split over other boxes and served by a process of its "
                "own: ask for it on /v1/chat/completions, /v1/completions, /v1/embeddings or "
                "/v1/stream.",
                param="model",
            )
        model = self._loaded.get(spec.id)
        if model is not None and model.failed:
            self._errors[spec.id] = model.failed
            if model.busy:  # requests still hold it; the reaper unloads it once they let go
                raise EngineFailure(f"The model '{spec.id}' failed ({model.failed}); retry.")
            self._unload_now(model)  # its thread has ended: freeing it is safe
            model = None
        if model is not None and (model.spec == spec or model.busy):
            # A changed entry takes over once the old model is idle: nothing is cut short.
            return model
        if model is not None:
            self._unload_now(model)
        task = self._loading.get(spec.id)
        if task is None:
            task = asyncio.create_task(self._load(spec))
            self._loading[spec.id] = task
        return await asyncio.shield(task)

    async def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.monotonic()
        try:
            self._start_backend()
            prepared = await asyncio.to_thread(self._loader.prepare, spec)
            # A split model's servers answer and have room, or nothing is evicted for it.
            devices = await asyncio.to_thread(self._loader.rpc_devices, spec, prepared.memory)
            victims = self._plan_room(spec, prepared.memory)
            if victims:  # what is evicted for a load must not be lost to a file llama.cpp refuses
                await asyncio.to_thread(probe_model, prepared.path)
                # Meanwhile a victim may have got a request, or another load taken the room.
                victims = self._plan_room(spec, prepared.memory)
            self._reserved[spec.id] = prepared.memory
            for victim in victims:
                logger.info("evicting idle model %s to make room for %s", victim.spec.id, spec.id)
                self._unload_now(victim)
            await self._settled()
            model = await asyncio.to_thread(
                LoadedModel,
                spec,
                prepared.path,
                self.config,
                self._finished,
                prepared.memory,
                devices,
            )
        except InsufficientMemory as exc:  # the model's state says why
            self._errors[spec.id] = exc.message
            raise
        except ThoxdError:
            raise
        except Exception as exc:  # the file, llama.cpp, an RPC server, a full disk, a bug
            self._errors[spec.id], error = load_failure(spec.id, exc)
            raise error from None
        finally:
            self._loading.pop(spec.id, None)
            self._reserved.pop(spec.id, None)
        self._errors.pop(spec.id, None)
        model.keep_alive = self.keep_alive_of(spec)
        self._loaded[spec.id] = model
        self._load_counts[spec.id] += 1
        self._idle.set()  # its keep_alive clock starts now
        logger.info(
            "model %s loaded in %.1f s (n_ctx %d, %d slots, %s; %s of %s budget in use)",
            spec.id,
            time.monotonic() - started,
            spec.n_ctx,
            self.config.slots,
            prepared.memory.describe(),
            format_bytes(self.used()),
            format_bytes(self.budget),
        )
        return model

    def estimate(self, spec: ModelSpec) -> MemoryEstimate | None:
        """The cost of `spec` if its file is present and passes the gate (a blocking read)."""
        return self._loader.estimate(spec)

    def _plan_room(self, spec: ModelSpec, need: MemoryEstimate) -> list[LoadedModel]:
        """The idle models to evict (least recently used first) so `need` fits both budgets,
        host and GPU, or an error."""
        budgets = {"memory": (self.budget, need.host), "GPU memory": (self.gpu_budget, need.gpu)}
        for what, (budget, wanted) in budgets.items():
            if wanted > budget:
                setting = "memory_budget" if what == "memory" else "gpu_memory_budget"
                raise InsufficientMemory(
                    f"The model '{spec.id}' needs {need.describe()}, more than the whole {what} "
                    f"budget of {format_bytes(budget)}. Lower its n_ctx, n_gpu_layers or the "
                    f"slots, or raise {setting}."
                )
        free, free_gpu = self.budget - self.used(), self.gpu_budget - self.gpu_used()
        victims: list[LoadedModel] = []
        candidates = [m for m in self._loaded.values() if not m.busy and not m.spec.pinned]
        for model in sorted(candidates, key=lambda m: m.last_used):
            if free >= need.host and free_gpu >= need.gpu:
                break
            victims.append(model)
            free += model.memory.host
            free_gpu += model.memory.gpu
        if free < need.host or free_gpu < need.gpu:
            held = ", ".join(
                f"{m.spec.id} ({'pinned' if m.spec.pinned else 'busy'})"
                for m in self._loaded.values()
                if m.busy or m.spec.pinned
            )
            what, budget, left = (
                ("memory", self.budget, free)
                if free < need.host
                else ("GPU memory", self.gpu_budget, free_gpu)
            )
            raise MemoryBusy(
                f"The model '{spec.id}' needs {need.describe()}; {format_bytes(max(left, 0))} "
                f"of the {format_bytes(budget)} {what} budget can be freed now, the rest is held "
                f"by {held or 'loads in progress'}. Retry when they are idle."
            )
        return victims

    # -- unloading ----------------------------------------------------------------------------

    async def unload(self, name: str) -> bool:
        """Unload a model now; False if it was not loaded. 409 while it is busy or loading."""
        spec = self.catalog.get(name)
        if spec.id in self._loading:
            raise ModelBusy(f"The model '{spec.id}' is loading; unload it when it is loaded.")
        model = self._loaded.get(spec.id)
        if model is None:
            return False
        if model.busy:
            stats = model.stats()
            raise ModelBusy(
                f"The model '{spec.id}' is serving {stats.running} running and {stats.waiting} "
                "queued requests; unload it when they are done.",
                running=stats.running,
                waiting=stats.waiting,
            )
        self._unload_now(model)
        await self._settled()
        return True

    def _unload_now(self, model: LoadedModel) -> None:
        """Out of the table at once (new requests load afresh); freed in a thread."""
        del self._loaded[model.spec.id]
        task = asyncio.create_task(asyncio.to_thread(model.close))
        self._unloading.add(task)
        task.add_done_callback(self._unloaded)

    def _unloaded(self, task: asyncio.Task[bool]) -> None:
        self._unloading.discard(task)
        if task.cancelled() or task.exception() is not None or not task.result():
            self.stuck = True

    async def _settled(self) -> None:
        """Until every unload in progress has freed its memory."""
        if self._unloading:
            await asyncio.gather(*self._unloading, return_exceptions=True)

    async def _reap(self) -> None:
        """Unload models idle past their keep_alive (pinned ones stay), and idle models whose
        catalog entry changed or went away."""
        while True:
            now = time.monotonic()
            wait = _REAP_INTERVAL
            for model in list(self._loaded.values()):
                if model.busy:
                    continue
                if model.failed:
                    logger.info("model %s failed (%s): unloading", model.spec.id, model.failed)
                    self._errors[model.spec.id] = model.failed
                    self._unload_now(model)
                    continue
                if self._stale(model):
                    logger.info("model %s: its catalog entry changed; unloading", model.spec.id)
                    self._unload_now(model)
                    continue
                if model.spec.pinned or math.isinf(model.keep_alive):
                    continue
                left = model.keep_alive - model.idle_for(now)
                if left <= 0:
                    logger.info("model %s idle past its keep_alive: unloading", model.spec.id)
                    self._unload_now(model)
                else:
                    wait = min(wait, left)
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=wait)

    # -- the catalog, replaced while serving -------------------------------------------------

    def replace_catalog(self, catalog: Catalog) -> list[str]:
        """Serve `catalog` from now on (models.toml re-read on SIGHUP). A loaded model whose
        entry is gone or changed keeps serving what it runs and is unloaded once idle (its next
        request loads the new entry). Returns the ids of those models."""
        self.catalog = catalog
        stale = [m.spec.id for m in self._loaded.values() if catalog.find(m.spec.id) != m.spec]
        for model_id in list(self._errors):
            if catalog.find(model_id) is None:
                del self._errors[model_id]
        self._idle.set()
        return stale

    def _stale(self, model: LoadedModel) -> bool:
        return self.catalog.find(model.spec.id) != model.spec

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the keep_alive clock (in the lifespan: it needs a running loop)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())

    def _start_backend(self) -> None:
        if not self._started:
            route_llama_logs()
            backend_init()
            self._started = True

    def _finished(self, model_id: str, gen: Generation, finished: Finished) -> None:
        if self.on_finished is not None:
            self.on_finished(model_id, gen, finished)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in list(self._loading.values()):
            task.cancel()
        models, self._loaded = list(self._loaded.values()), {}
        await self._settled()
        for model in models:
            if not await asyncio.to_thread(model.close):
                self.stuck = True
