"""thoxd/engine/loading.py: how many layers a load puts on the GPU, from the settings, the
model's entry and the GPUs' memory.

The GPUs are the config's `gpu_devices` seam (this machine has none); the estimates are of the
real Gemma file (18 blocks and the output layer: n_gpu_layers up to 19).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GEMMA
from thoxd.app import engine_config
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.devices import Device
from thoxd.engine.loading import Loader
from thoxd.engine.model import EngineConfig
from thoxd.settings import Settings

GIB = 1 << 30
ALL = 19  # Gemma 3 270M: 18 blocks and the output layer


def _spec(**kw: Any) -> ModelSpec:
    return ModelSpec.model_validate({"id": "g", "path": GEMMA, "n_ctx": 512, **kw})


def _loader(shelf: Path, gpus: list[int], **config: Any) -> Loader:
    def devices() -> list[Device]:
        return [Device(f"GPU{i}", "test", 1, total, total) for i, total in enumerate(gpus)]

    return Loader(
        EngineConfig(
            models_dir=shelf,
            threads=2,
            slots=2,
            queue_size=4,
            batch_size=64,
            gpu_devices=devices,
            **config,
        )
    )


def _layers(loader: Loader, **spec: Any) -> int:
    estimate = loader.estimate(_spec(**spec))
    assert estimate is not None
    return estimate.gpu_layers


def test_without_a_gpu_nothing_is_offloaded_whatever_is_asked(shelf: Path) -> None:
    loader = _loader(shelf, [])
    assert _layers(loader) == 0
    assert _layers(loader, n_gpu_layers=10) == 0
    assert _layers(_loader(shelf, [], n_gpu_layers=-1)) == 0
    assert loader.gpu_budget == 0


def test_auto_offloads_every_layer_that_fits(shelf: Path) -> None:
    loader = _loader(shelf, [8 * GIB])
    assert loader.gpu_budget == 0  # not looked up before the first estimate
    whole = loader.estimate(_spec())
    assert whole is not None and whole.gpu_layers == ALL
    assert loader.gpu_budget == int(8 * GIB * 0.9)  # the default: 90 percent
    assert whole.host < whole.gpu  # the input embeddings and parked tokens stay


def test_auto_offloads_part_of_a_model_bigger_than_the_budget(shelf: Path) -> None:
    def gpu_at(layers: int) -> int:
        estimate = _loader(shelf, [8 * GIB], n_gpu_layers=layers).estimate(_spec())
        assert estimate is not None
        return estimate.gpu

    # Gemma ties its output to its input embeddings (a third of its weights): the output layer
    # alone is most of what the model needs there. A budget halfway from 2 layers to all of them.
    room = (gpu_at(2) + gpu_at(ALL)) // 2
    loader = _loader(shelf, [8 * GIB], gpu_memory_budget=str(room))
    part = loader.estimate(_spec())
    assert part is not None and 2 < part.gpu_layers < ALL
    assert part.gpu <= room < gpu_at(part.gpu_layers + 1)  # one more would not fit


def test_a_budget_smaller_than_the_output_layer_offloads_nothing(shelf: Path) -> None:
    assert _layers(_loader(shelf, [8 * GIB], gpu_memory_budget="1MiB")) == 0


def test_the_models_own_setting_wins_over_the_daemons(shelf: Path) -> None:
    loader = _loader(shelf, [8 * GIB], n_gpu_layers=0)
    assert _layers(loader) == 0
    assert _layers(loader, n_gpu_layers=5) == 5
    assert _layers(loader, n_gpu_layers="auto") == ALL
    assert _layers(_loader(shelf, [8 * GIB], n_gpu_layers=7)) == 7
    assert _layers(_loader(shelf, [8 * GIB]), n_gpu_layers=0) == 0


def test_an_explicit_count_is_taken_as_asked_even_past_the_budget(shelf: Path) -> None:
    # The runtime refuses the load (tests/engine/test_runtime.py); the estimate says why.
    loader = _loader(shelf, [8 * GIB], n_gpu_layers=-1, gpu_memory_budget="1MiB")
    estimate = loader.estimate(_spec())
    assert estimate is not None and estimate.gpu_layers == ALL
    assert estimate.gpu > loader.gpu_budget


def test_gpus_add_up(shelf: Path) -> None:
    loader = _loader(shelf, [GIB, 3 * GIB], gpu_memory_budget="50%")
    loader.estimate(_spec())
    assert loader.gpu_budget == 2 * GIB


@pytest.mark.parametrize("gpus", [[], [8 * GIB]])
def test_a_split_models_layers_are_counted_on_its_servers_not_here(
    shelf: Path, gpus: list[int]
) -> None:
    # With a GPU here or without: the layers on the servers are `remote`, the rest is here.
    loader = _loader(shelf, gpus)
    servers = ["127.0.0.1:50052"]
    split = loader.estimate(_spec(rpc=servers))
    half = loader.estimate(_spec(rpc=servers, n_gpu_layers=9))
    one_box = _loader(shelf, []).estimate(_spec())
    assert split is not None and half is not None and one_box is not None
    assert split.gpu == half.gpu == 0
    assert (split.gpu_layers, half.gpu_layers) == (ALL, 9)
    assert 0 < half.remote < split.remote
    assert split.host < half.host < one_box.host
    assert split.host + split.remote == split.total
    assert split.as_dict()["remote_bytes"] == split.remote
    assert "on its RPC servers" in split.describe()


@pytest.mark.usefixtures("clean_settings_env")
@pytest.mark.parametrize("value", ["auto", -1, 0, 12])
def test_the_setting_reaches_the_config(value: int | str) -> None:
    config = engine_config(Settings(n_gpu_layers=value, gpu_memory_budget="3GiB"))
    assert config.n_gpu_layers == value and config.gpu_memory_budget == "3GiB"
