"""Read a GGUF header (metadata and tensor shapes) without loading the weights.

Results are cached by (path, size, mtime): the header of a multi-GB file is read once.
"""

from __future__ import annotations

import os
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


def _value(reader_field: Any) -> tuple[Any, int | None]:
    """(value, array length or None); long arrays come back as None with their length."""
    from gguf import GGUFValueType

    types = reader_field.types
    if types and types[0] == GGUFValueType.ARRAY:
        n = len(reader_field.data)
        if n > _ARRAY_PREVIEW:
            return None, n
        return reader_field.contents(), n
    value = reader_field.contents()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value, None


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of ``path`` (cached); raises ValueError when it is not a GGUF file."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    header = GGUFHeader()
    for name, reader_field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value, length = _value(reader_field)
        if length is not None:
            header.array_lengths[name] = length
        if value is not None:
            header.metadata[name] = value
    header.parameter_count = int(header.metadata.get("general.parameter_count") or 0) or sum(
        int(t.n_elements) for t in reader.tensors)
    with _lock:
        _cache[key] = header
    return header


def quantization_name(file_type: int | None) -> str:
    """``general.file_type`` → Ollama's quantization level (``Q4_K_M``, ``F16``…)."""
    if file_type is None:
        return ""
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(file_type)).name
    except (ValueError, ImportError):
        return str(file_type)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
