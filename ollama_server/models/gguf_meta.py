"""Read a GGUF header (metadata and tensor shapes) without loading the weights.

The header is walked directly (long arrays such as the vocabulary are skipped, not decoded),
which takes milliseconds where a full reader takes seconds; the ``gguf`` package gives the
file-type names.

The file may come from anyone (``POST /api/blobs`` then ``/api/create``), so every length and
count in it is checked against the bytes the file has left before anything is read or
allocated from it, and the header is checked the way llama.cpp's loader checks it (version,
alignment, tensor shapes, types and offsets, data inside the file) plus the values the service
itself uses: a file the engine would refuse, or crash on, is refused here first. Every problem
is one exception type, GGUFError (a 400 naming the problem), whatever the bytes.

Results (and refusals) are cached by (path, size, mtime): the header of a multi-GB file is read
once.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InvalidRequest

_ARRAY_PREVIEW = 64  # arrays longer than this (token lists, merges) are left out of metadata
_MAX_ARRAY = 1 << 24  # elements in one array: 64 times the largest vocabulary known
_MAX_KEY = (1 << 16) - 1  # the GGUF spec's limit on a key's length
_MAX_TENSOR_NAME = 63  # GGML_MAX_NAME - 1
_MAX_DIMS = 4  # GGML_MAX_DIMS
_INT64_MAX = (1 << 63) - 1
_DEFAULT_ALIGNMENT = 32
_VERSIONS = (2, 3)  # what llama.cpp reads (version 1 had 32-bit counts)


class GGUFError(InvalidRequest, ValueError):
    """A file that is not a GGUF model the engine can load; the message says what is wrong.

    The one error the reader raises, whatever the file holds (a ValueError too, for callers
    that only care that the file is unusable).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, param="files")


@dataclass
class GGUFHeader:
    """What the service needs from a GGUF header."""

    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    parameter_count: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by its GGUF key."""
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        """``general.architecture``."""
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """``<arch>.<suffix>``, e.g. ``context_length``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


_cache: dict[tuple[str, int, float], GGUFHeader | GGUFError] = {}
_lock = threading.Lock()

# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}

# ggml tensor types → (elements per block, bytes per block): gguf's GGML_QUANT_SIZES, copied
# so that the service does not import gguf (and numpy). Types llama.cpp removed are absent:
# the engine refuses them too.
_GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1),
    25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}

# Architectures without attention: their converters write head_count 0 ("unused").
_ATTENTION_FREE = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}

# Keys the service reads (or the engine divides by): the GGUF types they must have.
_UNSIGNED_KEYS = ("context_length", "embedding_length", "block_count", "pooling_type")


def _q(text: str) -> str:
    """A key or name from the file as an error shows it: quoted, and short (it may be 64 KiB)."""
    return repr(text[:80]) + ("..." if len(text) > 80 else "")


def _type_name(kind: int) -> str:
    return _TYPE_NAMES.get(kind, f"type {kind}")


class _Reader:
    """Little-endian reads over a memory-mapped file; each read checks that the bytes are
    there, so that a length or count in the file is never trusted."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    @property
    def left(self) -> int:
        """Bytes after the current position."""
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """GGUFError unless ``n`` more bytes are in the file."""
        if n > self.left:
            raise GGUFError(f"{what} needs {n} bytes at offset {self.pos}, but the file has "
                            f"{self.left} left: it is truncated or a length in it is corrupt")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        """A string value (bytes that are not UTF-8 replaced: vocabularies hold such tokens)."""
        return self._raw(what, limit).decode("utf-8", errors="replace")

    def name(self, what: str, limit: int) -> str:
        """A key or tensor name: UTF-8, as the spec wants (ASCII, in fact) and gguf-py reads."""
        try:
            return self._raw(what, limit).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not valid UTF-8") from None

    def _raw(self, what: str, limit: int | None) -> bytes:
        n = self.unpack("<Q", what)
        if limit is not None and n > limit:
            raise GGUFError(f"{what} is {n} bytes long; at most {limit} bytes are allowed")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw

    def value(self, kind: int, key: str) -> tuple[Any, int, int | None]:
        """(value, element type, array length) of one metadata value; arrays over the preview
        size are skipped (value None); arrays of arrays are refused, as llama.cpp does."""
        what = f"the value of metadata key {_q(key)}"
        if kind == _STRING:
            return self.string(what), -1, None
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what), -1, None
        if kind != _ARRAY:
            raise GGUFError(f"metadata key {_q(key)} has an unknown value type {kind}")
        elem = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        if elem == _ARRAY:
            raise GGUFError(f"metadata key {_q(key)} is an array of arrays, which the engine "
                            f"does not read")
        if elem != _STRING and elem not in _SCALARS:
            raise GGUFError(f"metadata key {_q(key)} is an array of an unknown type {elem}")
        if count > _MAX_ARRAY:
            raise GGUFError(f"metadata key {_q(key)} is an array of {count} elements, more than "
                            f"the {_MAX_ARRAY} this service reads")
        item = 8 if elem == _STRING else struct.calcsize(_SCALARS[elem])
        self.need(count * item, f"the {count} elements of metadata key {_q(key)}")
        if elem == _STRING:
            if count <= _ARRAY_PREVIEW:
                items = [self.string(f"a string in metadata key {_q(key)}") for _ in range(count)]
                return items, elem, count
            self._skip_strings(count, key)
            return None, elem, count
        fmt = _SCALARS[elem]
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)) \
            if count <= _ARRAY_PREVIEW else None
        self.pos += count * item
        return values, elem, count

    def _skip_strings(self, count: int, key: str) -> None:
        """Step over ``count`` strings (a vocabulary: the hot loop of a header read)."""
        unpack, buf, pos, end = _U64.unpack_from, self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + unpack(buf, pos)[0]
            if pos > end:
                break
        else:
            self.pos = pos
            return
        raise GGUFError(f"a string in metadata key {_q(key)} runs past the end of the file: "
                        f"it is truncated or a length in it is corrupt")


@dataclass
class _Entry:
    """One metadata key as read: its GGUF type (and element type for arrays)."""

    kind: int
    elem: int
    value: Any


def _parse(buf: mmap.mmap, size: int) -> GGUFHeader:
    cur = _Reader(buf, size)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise GGUFError(f"not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    cur.pos = 4
    version = cur.unpack("<I", "the GGUF version")
    if version not in _VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
            raise GGUFError("big-endian GGUF files are not supported; convert the model "
                            "again as little-endian")
        raise GGUFError(f"unsupported GGUF version {version}; the engine reads versions 2 "
                        f"and 3 (convert the model again with a current llama.cpp)")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the metadata count")
    # The smallest entry: an 8-byte key length, a 4-byte type, a 1-byte value; a tensor: an
    # 8-byte name length, 4-byte dimension count and type, 8-byte offset.
    if n_kv * 13 > cur.left:
        raise GGUFError(f"the header says {n_kv} metadata entries, more than the "
                        f"{cur.left} bytes after it can hold: the file is truncated or the "
                        f"count is corrupt")
    if n_tensors * 24 > cur.left:
        raise GGUFError(f"the header says {n_tensors} tensors, more than the {cur.left} "
                        f"bytes after it can hold: the file is truncated or the count is "
                        f"corrupt")
    entries: dict[str, _Entry] = {}
    header = GGUFHeader()
    for i in range(n_kv):
        key = cur.name(f"the name of metadata entry {i}", _MAX_KEY)
        if key in entries:
            raise GGUFError(f"metadata key {_q(key)} appears twice")
        kind = cur.unpack("<I", f"the type of metadata key {_q(key)}")
        value, elem, length = cur.value(kind, key)
        entries[key] = _Entry(kind, elem, value)
        if length is not None:
            header.array_lengths[key] = length
        if value is not None:
            header.metadata[key] = value
    _check_metadata(entries)
    alignment = entries["general.alignment"].value if "general.alignment" in entries \
        else _DEFAULT_ALIGNMENT
    header.parameter_count = _read_tensors(cur, n_tensors, alignment)
    declared = entries.get("general.parameter_count")
    header.parameter_count = int(declared.value) if declared and declared.value else \
        header.parameter_count
    return header


def _read_tensors(cur: _Reader, n_tensors: int, alignment: int) -> int:
    """Check every tensor's name, shape, type and data range; the number of parameters."""
    names: set[str] = set()
    ranges: list[tuple[str, int, int]] = []  # (name, offset, bytes)
    expected = 0  # llama.cpp wants the tensors in order, each aligned
    total = 0
    for i in range(n_tensors):
        name = cur.name(f"the name of tensor {i}", _MAX_TENSOR_NAME)
        if name in names:
            raise GGUFError(f"tensor {_q(name)} appears twice")
        names.add(name)
        n_dims = cur.unpack("<I", f"the dimension count of tensor {_q(name)}")
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"tensor {_q(name)} has {n_dims} dimensions; the engine allows at "
                            f"most {_MAX_DIMS}")
        cur.need(8 * n_dims, f"the shape of tensor {_q(name)}")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        count = 1
        for d in dims:
            count *= d
            if d > _INT64_MAX or count > _INT64_MAX:
                raise GGUFError(f"tensor {_q(name)} has the shape {list(dims)}, whose number "
                                f"of elements overflows")
        ggml_type = cur.unpack("<I", f"the type of tensor {_q(name)}")
        if ggml_type not in _GGML_TYPES:
            raise GGUFError(f"tensor {_q(name)} has an unknown or removed ggml type "
                            f"{ggml_type}")
        block, block_bytes = _GGML_TYPES[ggml_type]
        first = dims[0] if dims else 1
        if first % block:
            raise GGUFError(f"tensor {_q(name)}: its first dimension {first} is not a multiple "
                            f"of its type's block size {block}")
        nbytes = count // block * block_bytes
        offset = cur.unpack("<Q", f"the data offset of tensor {_q(name)}")
        if offset != expected:
            raise GGUFError(f"tensor {_q(name)} has its data at offset {offset}, expected "
                            f"{expected} (tensor data must follow in order, aligned to "
                            f"{alignment} bytes)")
        expected += -(-nbytes // alignment) * alignment
        ranges.append((name, offset, nbytes))
        total += count
    data_start = -(-cur.pos // alignment) * alignment
    for name, offset, nbytes in ranges:
        if data_start + offset + nbytes > cur.size:
            raise GGUFError(f"the data of tensor {_q(name)} ({nbytes} bytes at offset "
                            f"{data_start + offset}) runs past the end of the file "
                            f"({cur.size} bytes): the file is truncated or corrupt")
    return total


def _check_metadata(entries: dict[str, _Entry]) -> None:
    """The keys the service reads, or the engine divides by, have sane types and values."""

    def expect(key: str, kinds: set[int], words: str) -> _Entry | None:
        entry = entries.get(key)
        if entry is not None and entry.kind not in kinds:
            raise GGUFError(f"metadata key {_q(key)} must be {words}, not "
                            f"{_type_name(entry.kind)}")
        return entry

    def unsigned(key: str) -> None:
        entry = expect(key, _INTEGERS, "an integer")
        if entry is not None and entry.value < 0:
            raise GGUFError(f"metadata key {_q(key)} must not be negative ({entry.value})")

    arch_entry = expect("general.architecture", {_STRING}, "a string")
    expect("tokenizer.chat_template", {_STRING}, "a string")
    unsigned("general.file_type")
    unsigned("general.parameter_count")
    tokens = entries.get("tokenizer.ggml.tokens")
    if tokens is not None and (tokens.kind != _ARRAY or tokens.elem != _STRING):
        raise GGUFError("metadata key 'tokenizer.ggml.tokens' must be an array of strings")
    alignment = expect("general.alignment", {4}, "a uint32")
    if alignment is not None and (alignment.value == 0
                                  or alignment.value & (alignment.value - 1)):
        raise GGUFError(f"metadata key 'general.alignment' is {alignment.value}; it must be a "
                        f"power of two (32 when absent)")
    if arch_entry is None or not arch_entry.value:
        raise GGUFError("metadata key 'general.architecture' is missing or empty: the engine "
                        "needs it to load the model")
    arch = arch_entry.value
    for suffix in _UNSIGNED_KEYS:
        unsigned(f"{arch}.{suffix}")
    key = f"{arch}.attention.head_count"
    heads = entries.get(key)
    if heads is None:
        return
    if heads.kind == _ARRAY and heads.elem in _INTEGERS:
        values = heads.value  # None: a long per-layer array, not decoded
        zero = values is not None and not any(values)
    elif heads.kind in _INTEGERS:
        zero = heads.value == 0
    else:
        raise GGUFError(f"metadata key {_q(key)} must be an integer or an array of integers, "
                        f"not {_type_name(heads.kind)}")
    if zero and arch not in _ATTENTION_FREE:
        raise GGUFError(f"metadata key {_q(key)} is 0: a {_q(arch)} model needs at least one "
                        f"attention head (the engine divides by it)")


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of ``path`` (cached); GGUFError when it is not a usable GGUF file,
    and no other exception, whatever the file holds."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise GGUFError(f"cannot read the GGUF file: {exc.strerror}") from None
    key = (str(path), st.st_size, st.st_mtime)
    with _lock:  # one parse per file, even when many requests ask at once
        cached = _cache.get(key)
        if cached is None:
            cached = _cache[key] = _read(path, st.st_size)
    if isinstance(cached, GGUFError):
        raise GGUFError(cached.message)
    return cached


def _read(path: Path, size: int) -> GGUFHeader | GGUFError:
    """The header, or the error that refuses the file (both cached by the caller)."""
    if size < 24:
        return GGUFError(f"not a GGUF file: {size} bytes, less than a GGUF header")
    try:
        with open(path, "rb") as fh, \
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, min(size, len(buf)))
    except GGUFError as exc:
        return exc
    except OSError as exc:  # not cached: the next read may succeed
        raise GGUFError(f"cannot read the GGUF file: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - a reader bug must still be a 400, not a 500
        return GGUFError(f"cannot read the GGUF header ({type(exc).__name__}: {exc})")


# llama.cpp's ``llama_ftype`` values (gguf's LlamaFileType, without importing gguf: it pulls
# in numpy, about 15 MB of memory in the service for one table).
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}


def quantization_name(file_type: int | None) -> str:
    """``general.file_type`` → Ollama's quantization level (``Q4_K_M``, ``F16``…)."""
    if file_type is None:
        return ""
    try:
        return _FILE_TYPES.get(int(file_type), str(file_type))
    except (TypeError, ValueError):
        return str(file_type)
