"""Crafted GGUF files, written byte by byte (``struct.pack``), for the attack tests and the
header fuzzer.

``build()`` writes a file from metadata entries and tensors, filling in what a valid file needs
(counts, offsets, alignment padding, tensor data) unless a test overrides it; ``ATTACKS`` holds
one file per attack class, each with words that the refusal must contain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
                  BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_Q4_0 = 0, 2
BIG = 1 << 62  # an absurd count or length


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; ``length`` overrides the length field (a lie about the bytes)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def value(kind: int, val) -> bytes:
    """The bytes of one metadata value of type ``kind`` (arrays: ``(elem_type, items)``)."""
    if kind == STRING:
        return gstr(val)
    if kind == ARRAY:
        elem, items = val
        return struct.pack("<IQ", elem, len(items)) + b"".join(value(elem, i) for i in items)
    return struct.pack(SCALAR_FORMATS[kind], val)


def kv(key: str, kind: int, val) -> bytes:
    """One metadata entry."""
    return gstr(key) + struct.pack("<I", kind) + value(kind, val)


@dataclass
class Tensor:
    """One tensor's header entry; ``offset`` None: the next aligned offset (as writers do)."""

    name: str
    dims: tuple[int, ...] = (8, 4)
    ggml_type: int = GGML_F32
    offset: int | None = None

    def nbytes(self) -> int:
        count = 1
        for d in self.dims:
            count *= d
        return count * (4 if self.ggml_type == GGML_F32 else 1)


def base_kvs(arch: str = "llama", **over) -> list[bytes]:
    """The metadata of a small valid llama model (``over`` replaces values by key suffix)."""
    values = {"general.architecture": (STRING, arch),
              f"{arch}.context_length": (U32, 2048), f"{arch}.embedding_length": (U32, 8),
              f"{arch}.block_count": (U32, 1), f"{arch}.attention.head_count": (U32, 2),
              "general.file_type": (U32, 0)}
    for key, item in over.items():
        values[key.replace("ARCH", arch)] = item
    return [kv(k, kind, v) for k, (kind, v) in values.items()]


@dataclass
class Layout:
    """Everything ``build`` writes, with the defaults of a valid file."""

    kvs: list[bytes] = field(default_factory=base_kvs)
    tensors: list[Tensor] = field(default_factory=lambda: [Tensor("token_embd.weight")])
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32
    data: bool = True  # write the tensor data (False: the header only)


def build(layout: Layout | None = None, **fields) -> bytes:
    """A GGUF file from ``layout`` (or a default Layout with ``fields`` replaced)."""
    lay = layout or Layout(**fields)
    out = bytearray(lay.magic + struct.pack("<I", lay.version))
    out += struct.pack("<QQ", len(lay.tensors) if lay.n_tensors is None else lay.n_tensors,
                       len(lay.kvs) if lay.n_kv is None else lay.n_kv)
    for entry in lay.kvs:
        out += entry
    offset = 0
    for t in lay.tensors:
        out += gstr(t.name) + struct.pack("<I", len(t.dims))
        out += b"".join(struct.pack("<Q", d) for d in t.dims)
        out += struct.pack("<IQ", t.ggml_type, (offset if t.offset is None else t.offset)
                           % 2**64)
        offset += -(-t.nbytes() // lay.alignment) * lay.alignment
    if lay.data:
        out += b"\0" * (-len(out) % lay.alignment)
        out += b"\0" * offset
    return bytes(out)


def nested_array(depth: int) -> bytes:
    """An array of arrays ``depth`` deep (each holding the next one)."""
    inner = struct.pack("<IQ", U8, 1) + b"\x01"
    for _ in range(depth):
        inner = struct.pack("<IQ", ARRAY, 1) + inner
    return inner


def _raw_kv(key: str, kind: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", kind) + payload


VALID = build()

# Attack class → (file bytes, words the refusal must name). One of each shape of
# CVE-2024-39720 (Ollama: out-of-bounds read on a crafted GGUF), CVE-2025-53630 / CVE-2026-27940
# / CVE-2026-33298 (llama.cpp gguf: counts, lengths and offsets trusted from the file) and the
# divisor and type confusions the engine or the service would trip on.
ATTACKS: dict[str, tuple[bytes, str]] = {
    "truncated header": (VALID[:20], "not a GGUF file"),
    "truncated metadata": (VALID[:60], "truncated"),
    "truncated key": (build(kvs=base_kvs()[:1])[:40], "truncated"),
    "truncated tensor data": (VALID[:-16], "runs past the end of the file"),
    "wrong magic": (b"GGUX" + VALID[4:], "not a GGUF file"),
    "version 1": (build(version=1), "version 1"),
    "version 4": (build(version=4), "version 4"),
    "big-endian": (build(version=0x03000000), "big-endian"),
    "absurd kv count": (build(n_kv=BIG), "metadata entries"),
    "absurd tensor count": (build(n_tensors=BIG), "tensors"),
    "kv count past the file": (build(n_kv=1 << 20), "metadata entries"),
    "key length past the file": (build(kvs=[gstr("k", length=(1 << 64) - 1)]),
                                 "bytes are allowed"),
    "string length past the file": (
        build(kvs=[_raw_kv("general.name", STRING, gstr("x", length=(1 << 64) - 1))]),
        "truncated"),
    "array length past the file": (
        build(kvs=[_raw_kv("a", ARRAY, struct.pack("<IQ", U32, BIG))]), "this service reads"),
    "array just past the file": (
        build(kvs=[_raw_kv("a", ARRAY, struct.pack("<IQ", U64, 1 << 20))]), "truncated"),
    "string array past the file": (
        build(kvs=[_raw_kv("a", ARRAY, struct.pack("<IQ", STRING, 100)) + gstr("t") * 99],
              tensors=[], data=False), "runs past the end"),
    "array of arrays": (build(kvs=[_raw_kv("a", ARRAY, nested_array(1))]), "array of arrays"),
    "deeply nested arrays": (build(kvs=[_raw_kv("a", ARRAY, nested_array(5000))]),
                             "array of arrays"),
    "unknown value type": (build(kvs=[_raw_kv("a", 99, b"\0" * 8)]), "unknown value type"),
    "duplicate key": (build(kvs=base_kvs() + base_kvs()[:1]), "appears twice"),
    "tensor offset past the file": (build(tensors=[Tensor("t", offset=1 << 40)]), "offset"),
    "tensor data past the file": (
        build(tensors=[Tensor("t", dims=(1 << 20, 1 << 10))], data=False),
        "runs past the end of the file"),
    "dims whose product overflows": (
        build(tensors=[Tensor("t", dims=(1 << 32, 1 << 32, 1 << 10))], data=False),
        "overflows"),
    "negative dimension": (build(tensors=[Tensor("t", dims=((1 << 64) - 1,))], data=False),
                           "overflows"),
    "too many dimensions": (build(tensors=[Tensor("t", dims=(1,) * 5)]), "dimensions"),
    "absurd dimension count": (
        build(tensors=[Tensor("t")], data=False)[:-32] + struct.pack("<I", 0xFFFFFFFF)
        + b"\0" * 24, "dimension"),
    "unknown tensor type": (build(tensors=[Tensor("t", ggml_type=200)]), "ggml type"),
    "block size mismatch": (build(tensors=[Tensor("t", dims=(7, 1), ggml_type=GGML_Q4_0)]),
                            "block size"),
    "duplicate tensor": (build(tensors=[Tensor("t"), Tensor("t")]), "appears twice"),
    "long tensor name": (build(tensors=[Tensor("t" * 200)]), "bytes are allowed"),
    "head_count 0": (build(kvs=base_kvs(**{"ARCH.attention.head_count": (U32, 0)})),
                     "attention.head_count' is 0"),
    "alignment 0": (build(kvs=base_kvs() + [kv("general.alignment", U32, 0)]),
                    "general.alignment' is 0"),
    "alignment not a power of two": (
        build(kvs=base_kvs() + [kv("general.alignment", U32, 48)], alignment=48),
        "power of two"),
    "alignment of the wrong type": (
        build(kvs=base_kvs() + [kv("general.alignment", U64, 32)]), "must be a uint32"),
    "no architecture": (build(kvs=base_kvs()[1:]), "'general.architecture' is missing"),
    "architecture of the wrong type": (
        build(kvs=[kv("general.architecture", U32, 7)]), "must be a string"),
    "context length of the wrong type": (
        build(kvs=base_kvs(**{"ARCH.context_length": (STRING, "lots")})), "must be an integer"),
    "negative context length": (
        build(kvs=base_kvs(**{"ARCH.context_length": (I32, -5)})), "must not be negative"),
    "file type of the wrong type": (
        build(kvs=base_kvs(**{"general.file_type": (F32, 1.5)})), "must be an integer"),
    "chat template of the wrong type": (
        build(kvs=base_kvs() + [kv("tokenizer.chat_template", ARRAY, (U8, [1, 2]))]),
        "must be a string"),
    "vocabulary of the wrong type": (
        build(kvs=base_kvs() + [kv("tokenizer.ggml.tokens", ARRAY, (U32, [1, 2]))]),
        "array of strings"),
}
