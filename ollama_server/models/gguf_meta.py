"""Read a GGUF header (metadata and tensor shapes) without loading the weights.

The header is walked directly (long arrays such as the vocabulary are skipped, not decoded),
which takes milliseconds where a full reader takes seconds; the ``gguf`` package gives the
file-type names.

Results are cached by (path, size, mtime): the header of a multi-GB file is read once.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ARRAY_PREVIEW = 64  # arrays longer than this (token lists, merges) are left out of metadata


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


_cache: dict[tuple[str, int, float], GGUFHeader] = {}
_lock = threading.Lock()


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads over a memory-mapped file."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, kind: int) -> tuple[Any, int | None]:
        """(value, array length or None); arrays over the preview size come back as None."""
        if kind == _STRING:
            return self.string(), None
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind]), None
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        elem, count = self.unpack("<I"), self.unpack("<Q")
        if count <= _ARRAY_PREVIEW:
            return [self.value(elem)[0] for _ in range(count)], count
        if elem == _STRING:
            for _ in range(count):
                self.skip_string()
        elif elem in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[elem])
        else:
            for _ in range(count):
                self.value(elem)
        return None, count


def _parse(buf: mmap.mmap) -> GGUFHeader:
    cur = _Cursor(buf)
    if buf[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version < 2 or version > 0xFFFF:
        raise ValueError(f"unsupported GGUF version {version} (or a big-endian file)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    header = GGUFHeader()
    for _ in range(n_kv):
        key = cur.string()
        value, length = cur.value(cur.unpack("<I"))
        if length is not None:
            header.array_lengths[key] = length
        if value is not None:
            header.metadata[key] = value
    total = 0
    for _ in range(n_tensors):
        cur.skip_string()
        n_dims = cur.unpack("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += 8 * n_dims + 4 + 8  # dims, type, offset
        count = 1
        for d in dims:
            count *= d
        total += count
    header.parameter_count = int(header.metadata.get("general.parameter_count") or 0) or total
    return header


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of ``path`` (cached); raises ValueError when it is not a GGUF file."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime)
    with _lock:  # one parse per file, even when many requests ask at once
        cached = _cache.get(key)
        if cached is not None:
            return cached
        with open(path, "rb") as fh:
            if st.st_size < 24:
                raise ValueError(f"{path} is not a GGUF file (too small)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    header = _parse(buf)
                except (struct.error, ValueError, IndexError) as exc:
                    raise ValueError(f"{path}: {exc}") from None
        _cache[key] = header
        return header


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
