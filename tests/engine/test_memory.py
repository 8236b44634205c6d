"""thoxd/engine/memory.py: a model's memory cost from its GGUF header, and the budget setting.

Most inputs are GGUFInfo built directly, so each case is exactly the metadata it names; one is a
file written by the `gguf` package, and one is the real default model's header (the header is
read by thoxd's own parser: llama.cpp is never loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from thoxd.catalog.gguf import GGUFInfo, check_gguf
from thoxd.engine.memory import (
    MemoryEstimate,
    Shape,
    budget_bytes,
    estimate_memory,
    fit_layers,
)
from thoxd.units import format_bytes

MIB = 1024**2
GIB = 1024**3

# A small llama-like model: 4 layers, 8 heads of 64 (n_embd 512), 2 KV heads, a 1000-token vocab.
LAYERS, N_EMBD, HEADS, HEADS_KV, K_LEN, V_LEN = 4, 512, 8, 2, 64, 32
TOKENS = {"type": "array", "of": "string", "len": 1000}


def meta(arch: str = "llama", **fields: object) -> dict[str, object]:
    """Metadata of the small model; fields["attention__key_length"] = None drops that key."""
    values: dict[str, object] = {
        "embedding_length": N_EMBD,
        "block_count": LAYERS,
        "feed_forward_length": 4 * N_EMBD,
        "attention.head_count": HEADS,
        "attention.head_count_kv": HEADS_KV,
        "attention.key_length": K_LEN,
        "attention.value_length": V_LEN,
    }
    for key, value in fields.items():
        values[key.replace("__", ".")] = value
    out: dict[str, object] = {f"{arch}.{k}": v for k, v in values.items() if v is not None}
    return {"general.architecture": arch, **out, "tokenizer.ggml.tokens": TOKENS}


def info(
    metadata: dict[str, object] | None = None,
    *,
    tensor_bytes: int = 123_456,
    tensor_sizes: dict[str, int] | None = None,
) -> GGUFInfo:
    metadata = meta() if metadata is None else metadata
    arch = metadata.get("general.architecture", "llama")
    assert isinstance(arch, str)
    return GGUFInfo(
        version=3,
        n_tensors=1,
        n_kv=len(metadata),
        architecture=arch,
        name="tiny",
        context_length=2048,
        file_type=None,
        alignment=32,
        data_offset=4096,
        chat_template=None,
        metadata=metadata,
        tensor_sizes=tensor_sizes or {"blk.0.ffn_up.weight": tensor_bytes},
    )


def estimate(gguf: GGUFInfo, **options: Any) -> MemoryEstimate:
    args: dict[str, Any] = {
        "n_ctx": 1024,
        "slots": 2,
        "outputs": 2,
        "batch_size": 64,
        "embeddings": False,
        "embed_batch": 32,
    }
    return estimate_memory(gguf, **{**args, **options})


def kv_bytes(n_cells: int, n_head_kv: int = HEADS_KV, k: int = K_LEN, v: int = V_LEN) -> int:
    """f16 K and V for every layer over n_cells cells, written out independently of the code."""
    return n_cells * LAYERS * n_head_kv * (k + v) * 2


# ---------------------------------------------------------------- KV cache


def test_kv_cache_is_f16_k_and_v_for_every_layer_and_cell() -> None:
    result = estimate(info(), n_ctx=1024, slots=2)
    # The cache's n_ctx x slots cells, and one context's worth of parked idle slots.
    assert result.kv_cache == 1024 * (2 + 1) * LAYERS * HEADS_KV * (K_LEN + V_LEN) * 2
    assert Shape.of(info()).kv_per_token == LAYERS * HEADS_KV * (K_LEN + V_LEN) * 2


def test_embeddings_add_one_context_of_kv_cells() -> None:
    without = estimate(info(), n_ctx=1024, slots=2, embeddings=False)
    with_embeddings = estimate(info(), n_ctx=1024, slots=2, embeddings=True)
    assert with_embeddings.kv_cache == kv_bytes(1024 * (2 + 1)) + kv_bytes(1024)
    assert with_embeddings.kv_cache - without.kv_cache == 1024 * Shape.of(info()).kv_per_token
    assert with_embeddings.compute > without.compute  # the embeddings context's own batch


@pytest.mark.parametrize(("n_ctx", "slots"), [(256, 1), (512, 1), (4096, 1), (512, 3), (512, 8)])
def test_kv_cache_scales_linearly_with_context_and_slots(n_ctx: int, slots: int) -> None:
    one = estimate(info(), n_ctx=256, slots=1).kv_cache
    expected = one * (n_ctx // 256) * (slots + 1) // 2  # slots + one parked context
    assert estimate(info(), n_ctx=n_ctx, slots=slots).kv_cache == expected


def test_head_count_kv_falls_back_to_head_count_when_missing() -> None:
    result = estimate(info(meta(attention__head_count_kv=None)), n_ctx=512, slots=1)
    assert result.kv_cache == kv_bytes(1024, n_head_kv=HEADS)


def test_head_count_kv_as_a_per_layer_array_falls_back_to_head_count() -> None:
    array = {"type": "array", "of": "u32", "len": LAYERS}
    result = estimate(info(meta(attention__head_count_kv=array)), n_ctx=512, slots=1)
    assert result.kv_cache == kv_bytes(1024, n_head_kv=HEADS)


def test_key_and_value_length_fall_back_to_embedding_over_heads() -> None:
    gguf = info(meta(attention__key_length=None, attention__value_length=None))
    head_dim = N_EMBD // HEADS
    assert estimate(gguf, n_ctx=512, slots=1).kv_cache == kv_bytes(1024, k=head_dim, v=head_dim)


def test_missing_key_length_alone_falls_back_for_k_only() -> None:
    gguf = info(meta(attention__key_length=None))
    assert estimate(gguf, n_ctx=512, slots=1).kv_cache == kv_bytes(1024, k=N_EMBD // HEADS)


def test_shape_reads_the_architecture_prefixed_keys() -> None:
    shape = Shape.of(info(meta(arch="qwen2", block_count=7)))
    assert shape.n_layer == 7
    assert (shape.n_embd, shape.n_ff, shape.n_vocab) == (N_EMBD, 4 * N_EMBD, 1000)
    assert shape.sliding_window is False


def test_keys_of_another_architecture_are_not_used() -> None:
    # A "llama" file whose dimensions are under "qwen2." keys: the defaults apply instead.
    metadata = {**meta(arch="qwen2"), "general.architecture": "llama"}
    shape = Shape.of(info(metadata))
    assert shape.n_layer != LAYERS
    assert shape.n_embd != N_EMBD


# ---------------------------------------------------------------- weights and compute


@pytest.mark.parametrize("tensor_bytes", [0, 1, 246_587_904, 7 * GIB])
def test_weights_are_the_tensor_bytes_of_the_file(tensor_bytes: int) -> None:
    assert estimate(info(tensor_bytes=tensor_bytes)).weights == tensor_bytes


def test_sliding_window_key_doubles_the_mask_term() -> None:
    plain, windowed = Shape.of(info()), Shape.of(info(meta(attention__sliding_window=512)))
    assert windowed.sliding_window
    n_cells, n_ubatch = 2048, 64
    mask = n_cells * n_ubatch * 2  # one f16 mask over every cell for every batch token
    assert windowed.compute(n_cells, n_ubatch, 4) - plain.compute(n_cells, n_ubatch, 4) == mask
    # Through estimate_memory too: the generation context's mask, over n_ctx x slots cells.
    gap = estimate(info(meta(attention__sliding_window=512)), n_ctx=1024, slots=2, batch_size=64)
    assert gap.compute - estimate(info(), n_ctx=1024, slots=2, batch_size=64).compute == (
        1024 * 2 * 64 * 2
    )


def test_compute_grows_with_batch_cells_and_vocabulary() -> None:
    base = estimate(info()).compute
    assert estimate(info(), batch_size=128).compute > base
    assert estimate(info(), n_ctx=2048).compute > base
    # Drafts checked in a step are output rows too: their logits, computed and copied out.
    rows = estimate(info(), outputs=16).compute - base
    assert rows == 14 * 2 * TOKENS["len"] * 4  # type: ignore[operator]
    big_vocab = {**meta(), "tokenizer.ggml.tokens": {"type": "array", "of": "string", "len": 9000}}
    assert estimate(info(big_vocab)).compute > base
    # Compute does not depend on the weights.
    assert estimate(info(tensor_bytes=1)).compute == base


# ---------------------------------------------------------------- the result


def test_total_is_the_sum_and_as_dict_adds_up() -> None:
    result = estimate(info(), embeddings=True)
    assert result.total == result.weights + result.kv_cache + result.compute
    data = result.as_dict()
    assert data == {
        "total_bytes": result.total,
        "weights_bytes": result.weights,
        "kv_cache_bytes": result.kv_cache,
        "compute_bytes": result.compute,
        "gpu_bytes": 0,
        "gpu_layers": 0,
        "remote_bytes": 0,
        "estimated": True,
    }
    assert data["total_bytes"] == (
        data["weights_bytes"] + data["kv_cache_bytes"] + data["compute_bytes"]
    )


def test_describe_names_every_part_in_binary_units() -> None:
    result = MemoryEstimate(weights=2 * GIB, kv_cache=576 * MIB, compute=51 * MIB)
    text = result.describe()
    assert "2.6 GiB" in text  # the total
    assert "weights 2.0 GiB" in text
    assert "KV cache 576.0 MiB" in text
    assert "compute 51.0 MiB" in text
    assert text.startswith(f"about {format_bytes(result.total)}")


def test_estimate_is_frozen() -> None:
    result = estimate(info())
    with pytest.raises(AttributeError):
        result.weights = 0  # type: ignore[misc]


# ---------------------------------------------------------------- layers offloaded to a GPU

# The small model's tensors: input embeddings, 4 blocks of 300 bytes, the output layer.
EMBD, BLOCK, OUTPUT, NORM = 4000, 300, 2000, 10


def sized(*, tied: bool = False) -> GGUFInfo:
    sizes = {"token_embd.weight": EMBD, "output_norm.weight": NORM}
    if not tied:
        sizes["output.weight"] = OUTPUT
    for i in range(LAYERS):
        sizes |= {f"blk.{i}.attn_q.weight": BLOCK // 3, f"blk.{i}.ffn_up.weight": BLOCK * 2 // 3}
    return info(tensor_sizes=sizes)


def test_nothing_offloaded_puts_nothing_on_the_gpu() -> None:
    result = estimate(sized(), gpu_layers=0)
    assert (result.gpu, result.gpu_layers) == (0, 0)
    assert result.host == result.total == estimate(sized()).total


def test_one_layer_is_the_output_layer_and_the_graph() -> None:
    cpu, one = estimate(sized()), estimate(sized(), gpu_layers=1)
    graph = Shape.of(sized()).compute(1024 * 2, 64, 2)
    assert one.gpu == OUTPUT + NORM + graph  # no block: no K and V there
    # The layers that stayed compute in host memory too, so the graph is counted twice.
    assert one.compute == cpu.compute + graph
    assert one.host == cpu.total - OUTPUT - NORM


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_each_further_layer_moves_one_block_and_its_kv(blocks: int) -> None:
    fewer, more = estimate(sized(), gpu_layers=blocks), estimate(sized(), gpu_layers=blocks + 1)
    assert more.gpu - fewer.gpu == BLOCK + kv_bytes(1024 * 2) // LAYERS
    assert more.host == fewer.host - BLOCK - kv_bytes(1024 * 2) // LAYERS


@pytest.mark.parametrize("layers", [LAYERS + 1, -1, 999])
def test_every_layer_leaves_the_input_embeddings_parked_tokens_and_logits(layers: int) -> None:
    result = estimate(sized(), gpu_layers=layers)
    assert result.gpu_layers == LAYERS + 1
    logits = 2 * 1000 * 4  # two output rows of the 1000-token vocabulary, f32
    # One parked context; the logits' buffer and the host graph that copies them back.
    assert result.host == EMBD + kv_bytes(1024) + 2 * logits
    assert result.gpu == result.total - result.host
    graph = result.compute - 2 * logits
    assert result.gpu == LAYERS * BLOCK + OUTPUT + NORM + kv_bytes(2048) + graph


def test_tied_embeddings_are_copied_to_the_gpu_as_the_output() -> None:
    result = estimate(sized(tied=True), gpu_layers=1)
    assert result.weights == sized(tied=True).tensor_bytes + EMBD
    graph = Shape.of(sized()).compute(1024 * 2, 64, 2)
    assert result.gpu == EMBD + NORM + graph  # the copy, beside the graph
    assert result.host == estimate(sized(tied=True)).host - NORM


def test_fit_layers_takes_the_most_that_fit() -> None:
    def at(layers: int) -> MemoryEstimate:
        return estimate(sized(), gpu_layers=layers)

    for n in range(LAYERS + 2):
        room = at(n).gpu
        assert fit_layers(at, LAYERS, room) == n
        assert fit_layers(at, LAYERS, room - 1) == max(n - 1, 0)
    assert fit_layers(at, LAYERS, 0) == 0
    assert fit_layers(at, LAYERS, 1 << 60) == LAYERS + 1


def test_as_dict_and_describe_say_what_is_on_the_gpu() -> None:
    result = estimate(sized(), gpu_layers=3)
    assert result.as_dict()["gpu_bytes"] == result.gpu
    assert result.as_dict()["gpu_layers"] == 3
    assert f"{format_bytes(result.gpu)} of it on the GPU" in result.describe()
    assert "GPU" not in estimate(sized()).describe()


# ---------------------------------------------------------------- the budget setting


@pytest.mark.parametrize(
    ("setting", "available", "expected"),
    [
        ("2GiB", 123, 2 * GIB),
        ("2GiB", 64 * GIB, 2 * GIB),  # absolute: what is available does not matter
        ("6GB", 0, 6 * 10**9),
        ("50%", 1000, 500),
        ("80%", 10 * GIB, 8 * GIB),
        ("100%", 4321, 4321),
    ],
)
def test_budget_bytes(setting: str, available: int, expected: int) -> None:
    assert budget_bytes(setting, available) == expected


@pytest.mark.parametrize("setting", ["lots", "0%", "150%", "0B", ""])
def test_budget_bytes_rejects_what_parse_size_rejects(setting: str) -> None:
    with pytest.raises(ValueError):
        budget_bytes(setting, 1000)


# ---------------------------------------------------------------- headers read from files


def test_file_written_by_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(4 * N_EMBD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv([HEADS_KV] * LAYERS)  # per-layer, as some models write it
    writer.add_key_length(K_LEN)
    writer.add_value_length(V_LEN)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_tensor("token_embd.weight", np.ones((1000, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    gguf_info = check_gguf(path, root=tmp_path)
    shape = Shape.of(gguf_info)
    assert (shape.n_layer, shape.n_embd, shape.n_vocab) == (LAYERS, N_EMBD, 1000)
    result = estimate(gguf_info, n_ctx=512, slots=2)
    # The array is not read element by element: head_count stands in for it.
    assert result.kv_cache == kv_bytes(512 * 3, n_head_kv=HEADS)
    assert result.weights == gguf_info.tensor_bytes == 1000 * 8 * 4


def test_gemma_matches_what_llama_cpp_allocated(gemma_file: Path) -> None:
    # llama.cpp logged, for this configuration: KV 96 MiB (non-SWA layers) + 480 MiB (SWA layers),
    # model buffer 235.16 MiB, compute 40.9 MiB plus 4 MiB of output at load; the output buffer
    # grows to 16 rows (16 MiB) when drafts are checked, which the estimate counts up front.
    gguf_info = check_gguf(gemma_file, root=gemma_file.parent)
    result = estimate_memory(
        gguf_info,
        n_ctx=8192,
        slots=4,
        outputs=16,
        batch_size=256,
        embeddings=False,
        embed_batch=64,
    )
    # 576 MiB in llama.cpp's cache, and up to one 8192-token context parked in host memory.
    assert result.kv_cache == (576 + 144) * MIB
    assert result.weights == pytest.approx(235.16 * MIB, rel=0.01)
    assert 30 * MIB <= result.compute <= 80 * MIB
    assert "KV cache 720.0 MiB" in result.describe()


def test_gemma_offloaded_keeps_only_its_input_embeddings_weights_here(gemma_file: Path) -> None:
    gguf_info = check_gguf(gemma_file, root=gemma_file.parent)
    sizes = gguf_info.tensor_sizes
    assert len(sizes) == gguf_info.n_tensors and sum(sizes.values()) == gguf_info.tensor_bytes
    options: dict[str, Any] = {"n_ctx": 8192, "slots": 4, "outputs": 16, "batch_size": 512}
    result = estimate(gguf_info, gpu_layers=-1, **options)
    assert result.gpu_layers == 19  # 18 blocks and the output layer
    # Gemma ties its output to the input embeddings: llama.cpp copies them to the GPU.
    assert "output.weight" not in sizes
    assert result.weights == gguf_info.tensor_bytes + sizes["token_embd.weight"]
    assert result.host == sizes["token_embd.weight"] + 144 * MIB + 2 * 16 * 262144 * 4
