"""Bounded GGUF header check, run before llama.cpp ever opens a file.

Model files are untrusted and llama.cpp's C++ loader trusts counts, lengths and offsets, so
every file passes this pure-Python check first. It reads only the header through a small
buffer (capped by ``max_header_bytes``): time and memory follow the header's real size, never
what the file claims. `check_gguf` raises `GGUFRejected` (a short reason, no absolute path)
unless:

- the path, symlinks followed, lies inside ``root`` (when given) and is a regular file;
- magic ``GGUF``, version 2 or 3, little-endian; tensor and KV counts bounded (65536 each) and
  holdable by the bytes left;
- every string and array length fits the bytes left *before* it is read; strings bounded (keys
  64 KiB, values 1 MiB, tensor names 63 bytes, 2**21 array strings in all) and valid UTF-8;
  known value types, no nested arrays, unique keys;
- ``general.architecture`` is a string; ``general.alignment``, if set, a u32 power of two;
  tokenizer keys have their types, per-token arrays agree in length, bos/eos ids in range;
- every tensor: unique short UTF-8 name, known ggml type, 1-4 positive bounded dimensions, first
  one divisible by the block size, aligned offset, bytes inside the file and not overlapping.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from thoxd.catalog.ggml_types import GGML_TYPES

__all__ = ["GGML_TYPES", "GGUFInfo", "GGUFRejected", "check_gguf"]

# GGUF value types 0..12; the scalar ones with their little-endian layout.
_STRING: Final = 8
_ARRAY: Final = 9
_SCALARS: Final[dict[int, struct.Struct]] = {
    t: struct.Struct(f) for t, f in {
        0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
        10: "<Q", 11: "<q", 12: "<d",
    }.items()
}  # fmt: skip
_TYPE_NAMES: Final = (
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
)  # fmt: skip
_INTEGERS: Final = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

_MAX_TENSORS: Final = 1 << 16  # real models have a few thousand at most
_MAX_KV: Final = 1 << 16
_MAX_KEY: Final = 64 << 10
_MAX_STRING: Final = 1 << 20
_MAX_NAME: Final = 63  # ggml's GGML_MAX_NAME is 64 including the NUL
_MAX_DIM: Final = 1 << 40
_MAX_ARRAY_STRINGS: Final = 1 << 21  # in all arrays; vocabularies and merges are under 1M
_MIN_KV: Final = 8 + 4 + 1  # key length, value type, one-byte value
_MIN_TENSOR: Final = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_DEFAULT_ALIGNMENT: Final = 32
_CHUNK: Final = 1 << 20
_META_STRING: Final = 4 << 10  # longer strings are summarised in GGUFInfo.metadata
_META_BUDGET: Final = 256 << 10
_KEEP: Final = frozenset({"general.architecture", "general.name", "tokenizer.chat_template"})


class GGUFRejected(Exception):
    """The file is not a GGUF file we are willing to hand to llama.cpp; str() is the reason."""


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    n_tensors: int
    n_kv: int
    architecture: str
    name: str | None
    context_length: int | None
    file_type: int | None
    alignment: int
    data_offset: int
    chat_template: str | None
    metadata: dict[str, object]
    tensor_sizes: dict[str, int] = field(default_factory=dict)  # bytes of each tensor, by name

    @property
    def tensor_bytes(self) -> int:
        return sum(self.tensor_sizes.values())


@dataclass(frozen=True)
class _Array:
    elem: int
    count: int


class _Reader:
    """Reads forward through the header, refusing to go past the file end or the header cap."""

    def __init__(self, f: BinaryIO, size: int, cap: int) -> None:
        self._f = f
        self.size = size
        self.cap = cap
        self._buf = b""
        self._base = 0  # file offset of _buf[0]; the file position is _base + len(_buf)
        self._at = 0
        self.strings_left = _MAX_ARRAY_STRINGS

    @property
    def pos(self) -> int:
        return self._base + self._at

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFRejected(f"{what} runs past the end of the file")
        if self.pos + n > self.cap:
            raise GGUFRejected(f"header is larger than the limit of {self.cap} bytes")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        if self._at + n > len(self._buf):
            rest = self._buf[self._at :]
            self._base += self._at
            want = min(max(n, _CHUNK), min(self.size, self.cap) - self._base) - len(rest)
            self._buf, self._at = rest + self._f.read(want), 0
            if len(self._buf) < n:
                raise GGUFRejected("the file changed while it was being checked")
        out = self._buf[self._at : self._at + n]
        self._at += n
        return out

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        if self._at + n <= len(self._buf):
            self._at += n
        else:
            self._base, self._buf, self._at = self.pos + n, b"", 0
            self._f.seek(self._base)

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.read(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.read(8, what))[0])

    def string(self, limit: int, what: str) -> str:
        n = self.u64(what)
        if n > limit:
            raise GGUFRejected(f"{what} is {n} bytes long, over the limit of {limit}")
        try:
            return self.read(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFRejected(f"{what} is not valid UTF-8") from None

    def strings(self, count: int, limit: int, what: str) -> None:
        """Validate `count` strings; the common case runs straight off the buffer."""
        unpack = _U64.unpack_from
        while count:
            buf, at, size = self._buf, self._at, len(self._buf)
            done = count
            try:
                for i in range(count):
                    end = at + 8 + unpack(buf, at)[0] if at + 8 <= size else size + 1
                    if end > size or end - at - 8 > limit:
                        done = i
                        break
                    buf[at + 8 : end].decode("utf-8")
                    at = end
            except UnicodeDecodeError:
                raise GGUFRejected(f"{what} is not valid UTF-8") from None
            self._at = at
            count -= done
            if count:  # refill, or fail with the right reason
                self.string(limit, what)
                count -= 1


def check_gguf(
    path: Path, *, root: Path | None = None, max_header_bytes: int = 64 << 20
) -> GGUFInfo:
    """Raise GGUFRejected unless `path` is a sane GGUF file."""
    fd = _open(Path(path), root)
    with os.fdopen(fd, "rb") as f:
        try:
            return _parse(_Reader(f, os.fstat(fd).st_size, max_header_bytes))
        except OSError as e:
            raise GGUFRejected(f"cannot read the file: {e.strerror}") from None


def _open(path: Path, root: Path | None) -> int:
    label = repr(path.name or "file")
    try:
        base = None if root is None else Path(root).resolve(strict=True)
    except (OSError, RuntimeError):
        raise GGUFRejected("the model directory does not exist") from None
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop before Python 3.13
        why = e.strerror if isinstance(e, OSError) else "symlink loop"
        raise GGUFRejected(f"cannot open {label}: {why}") from None
    if base is not None and not resolved.is_relative_to(base):
        raise GGUFRejected(f"{label} lies outside the model directory")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)  # O_NONBLOCK: a FIFO must not hang us before fstat
    except OSError as e:
        raise GGUFRejected(f"cannot open {label}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GGUFRejected(f"{label} is not a regular file")
    return fd


def _value(r: _Reader, key: str, vtype: int) -> object:
    """Read one value; `key` is already quoted for messages."""
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        return scalar.unpack(r.read(scalar.size, f"value of {key}"))[0]
    if vtype == _STRING:
        return r.string(_MAX_STRING, f"value of {key}")
    if vtype != _ARRAY:
        raise GGUFRejected(f"key {key} has unknown value type {vtype}")
    elem = r.u32(f"array type of {key}")
    count = r.u64(f"array length of {key}")
    if elem == _ARRAY:
        raise GGUFRejected(f"key {key} is a nested array")
    if elem == _STRING:
        r.need(count * 8, f"array {key}")  # each string takes 8 bytes at least
        if count > r.strings_left:
            raise GGUFRejected(f"string arrays hold over {_MAX_ARRAY_STRINGS} elements in all")
        r.strings_left -= count
        r.strings(count, _MAX_STRING, f"an element of {key}")
    elif (scalar := _SCALARS.get(elem)) is not None:
        r.skip(count * scalar.size, f"array {key}")
    else:
        raise GGUFRejected(f"array {key} has unknown element type {elem}")
    return _Array(elem, count)


def _parse(r: _Reader) -> GGUFInfo:
    if r.size < 24:
        raise GGUFRejected("file is too small to be a GGUF file")
    if r.read(4, "magic") != b"GGUF":
        raise GGUFRejected("not a GGUF file (bad magic)")
    version = r.u32("version")
    if version not in (2, 3):
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            raise GGUFRejected("big-endian GGUF files are not supported")
        raise GGUFRejected(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.u64("tensor count"), r.u64("KV count")
    if n_tensors > _MAX_TENSORS:
        raise GGUFRejected(f"tensor count {n_tensors} is over the limit of {_MAX_TENSORS}")
    if n_kv > _MAX_KV:
        raise GGUFRejected(f"KV count {n_kv} is over the limit of {_MAX_KV}")
    if r.pos + n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > r.size:
        raise GGUFRejected(f"file is too small for {n_kv} KVs and {n_tensors} tensors")
    values, metadata = _read_kvs(r, n_kv)

    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFRejected("general.architecture is missing or not a string")
    if not 0 < len(arch) <= 64:
        raise GGUFRejected("general.architecture is empty or too long")
    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in values:
        alignment = _int(values, "general.alignment", u32=True) or 0
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFRejected(f"general.alignment {alignment} is not a power of two")
    _check_tokenizer(values)
    model_name, template = _str(values, "general.name"), _str(values, "tokenizer.chat_template")

    tensors = _read_tensors(r, n_tensors, alignment)
    data_offset = -(-r.pos // alignment) * alignment
    end = 0
    for offset, size, name in sorted(tensors):
        if data_offset + offset + size > r.size:
            raise GGUFRejected(f"tensor {name!r} data lies past the end of the file")
        if offset < end:
            raise GGUFRejected(f"tensor {name!r} data overlaps another tensor")
        end = offset + size

    return GGUFInfo(
        version=version,
        n_tensors=n_tensors,
        n_kv=n_kv,
        architecture=arch,
        name=model_name,
        context_length=_int(values, f"{arch}.context_length"),
        file_type=_int(values, "general.file_type"),
        alignment=alignment,
        data_offset=data_offset,
        tensor_sizes={name: size for _, size, name in tensors},
        chat_template=template,
        metadata=metadata,
    )


def _read_kvs(r: _Reader, n_kv: int) -> tuple[dict[str, object], dict[str, object]]:
    """Read the KVs: values to check (integers as (type, value)), and metadata to report."""
    values: dict[str, object] = {}
    metadata: dict[str, object] = {}
    budget = _META_BUDGET
    for i in range(n_kv):
        key = r.string(_MAX_KEY, f"key of KV {i}")
        if key in values:
            raise GGUFRejected(f"key {_quote(key)} appears twice")
        vtype = r.u32(f"value type of {_quote(key)}")
        value = values[key] = _value(r, _quote(key), vtype)
        if isinstance(value, _Array):
            metadata[key] = {"type": "array", "of": _TYPE_NAMES[value.elem], "len": value.count}
        elif isinstance(value, str) and (len(value) > _META_STRING or len(value) > budget):
            metadata[key] = {"type": "string", "len": len(value)}
        else:
            budget -= len(value) if isinstance(value, str) else 8
            metadata[key] = value
        if vtype in _INTEGERS:  # keep the width, so "u32" can be told from "i32" below
            values[key] = (vtype, value)
        elif isinstance(value, str) and key not in _KEEP:
            values[key] = ""  # only its type matters; memory stays small
    return values, metadata


def _read_tensors(r: _Reader, n_tensors: int, alignment: int) -> list[tuple[int, int, str]]:
    """Read the tensor infos; return (offset, size in bytes, name) for each."""
    tensors: list[tuple[int, int, str]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(_MAX_NAME, f"name of tensor {i}")
        if name in names:
            raise GGUFRejected(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFRejected(f"tensor {name!r} has {n_dims} dimensions (must be 1 to 4)")
        dims = struct.unpack(f"<{n_dims}Q", r.read(8 * n_dims, f"shape of tensor {name!r}"))
        if not all(0 < d < _MAX_DIM for d in dims):
            raise GGUFRejected(f"tensor {name!r} has an empty or oversized dimension")
        ttype = r.u32(f"type of tensor {name!r}")
        if ttype not in GGML_TYPES:
            raise GGUFRejected(f"tensor {name!r} has unknown ggml type {ttype}")
        tname, block, block_bytes = GGML_TYPES[ttype]
        if dims[0] % block:
            raise GGUFRejected(f"tensor {name!r} ({tname}) first dim is not a multiple of {block}")
        offset = r.u64(f"offset of tensor {name!r}")
        if offset % alignment:
            raise GGUFRejected(f"tensor {name!r} offset is not aligned to {alignment}")
        tensors.append((offset, math.prod(dims) // block * block_bytes, name))
    return tensors


def _quote(text: str) -> str:
    """A file-supplied name, quoted and cut short for a message."""
    return repr(text if len(text) <= 64 else text[:60] + "...")


def _str(values: dict[str, object], key: str) -> str | None:
    """A string KV, or None if absent."""
    if (value := values.get(key)) is not None and not isinstance(value, str):
        raise GGUFRejected(f"{key} is not a string")
    return value


def _int(values: dict[str, object], key: str, *, u32: bool = False) -> int | None:
    """An integer KV, or None if absent; u32=True demands exactly that width."""
    if (value := values.get(key)) is None:
        return None
    if not isinstance(value, tuple) or (u32 and value[0] != 4):
        raise GGUFRejected(f"{key} is not {'a u32' if u32 else 'an integer'}")
    return int(value[1])


def _check_tokenizer(values: dict[str, object]) -> None:
    """Check the tokenizer keys that llama.cpp indexes by token id."""
    _str(values, "tokenizer.ggml.model")
    counts: dict[str, int] = {}
    for key, elem in (("tokens", _STRING), ("scores", 6), ("token_type", 5)):
        arr = values.get(f"tokenizer.ggml.{key}")
        if arr is None:
            continue
        if not isinstance(arr, _Array) or arr.elem != elem:
            raise GGUFRejected(f"tokenizer.ggml.{key} is not an array of {_TYPE_NAMES[elem]}")
        counts[key] = arr.count
    n_tokens = counts.get("tokens")
    if n_tokens is not None and any(n != n_tokens for n in counts.values()):
        raise GGUFRejected("tokenizer.ggml.scores or token_type length differs from the tokens")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        token = _int(values, key, u32=True)
        if token is not None and n_tokens is not None and token >= n_tokens:
            raise GGUFRejected(f"{key} {token} is out of range for {n_tokens} tokens")
