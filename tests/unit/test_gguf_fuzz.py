"""Property-based fuzzing of the GGUF header reader (issue 25).

Hypothesis writes files two ways: valid headers with a few mutations each (a bit flipped, a
length, count, type or offset field overwritten with a boundary value, the file cut, bytes
inserted, deleted or copied from elsewhere), and structures generated from scratch (metadata of
every type, right and wrong, nested arrays, lying counts, tensors of any shape, type and
offset). For every file:

- ``read_header`` returns a header or raises GGUFError, never any other exception;
- a refusal is a 400 with a message that does not name the file's path;
- a header it returns is one the service can use: the fields the model list reads convert, and
  the ``gguf`` package's own reader takes the file too (a differential check);
- each file takes well under a second and a bounded amount of memory (tracemalloc peak).

Seeded and bounded: ``GGUF_FUZZ_SEED`` (default 25) and ``GGUF_FUZZ_EXAMPLES`` files (default
300 in ``make test``; ``make fuzz`` runs 10,000).
"""

from __future__ import annotations

import itertools
import os
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ollama_server.models import gguf_meta
from ollama_server.models.gguf_meta import GGUFError, GGUFHeader, read_header
from tests.security.gguf_craft import (
    ARRAY,
    BOOL,
    SCALAR_FORMATS,
    STRING,
    U32,
    U64,
    Layout,
    Tensor,
    base_kvs,
    build,
    gstr,
    kv,
)

GGUF_FUZZ_SEED = int(os.environ.get("GGUF_FUZZ_SEED", "25"))
GGUF_FUZZ_EXAMPLES = int(os.environ.get("GGUF_FUZZ_EXAMPLES", "300"))
SECONDS_PER_FILE = 1.0
PEAK_BYTES = 4 << 20  # files are at most a few hundred KiB

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 63, 64, 65, 255, 256, 4095, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
ARCHES = ["llama", "qwen2", "gemma3", "mamba", "clip", "bert", ""]
KEY_SUFFIXES = ["context_length", "embedding_length", "block_count", "pooling_type",
                "attention.head_count", "attention.head_count_kv"]
GENERAL_KEYS = ["general.architecture", "general.alignment", "general.file_type",
                "general.parameter_count", "general.name", "tokenizer.chat_template",
                "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.merges"]
# The GGUF type each known key has in a valid file (the generator mostly keeps to it).
EXPECTED_KINDS = {"general.architecture": STRING, "general.alignment": U32,
                  "general.file_type": U32, "general.parameter_count": U64,
                  "general.name": STRING, "tokenizer.chat_template": STRING,
                  "tokenizer.ggml.tokens": ARRAY, "context_length": U32,
                  "embedding_length": U32, "block_count": U32, "pooling_type": U32,
                  "attention.head_count": U32, "attention.head_count_kv": U32}
GGML_TYPES = sorted(gguf_meta._GGML_TYPES) + [4, 5, 31, 36, 42, 200, 2**32 - 1]


def seeds() -> list[bytes]:
    """Valid files to mutate: small, with a vocabulary, a template, several tensor types."""
    vocab = kv("tokenizer.ggml.tokens", ARRAY, (STRING, [f"t{i}" for i in range(80)]))
    scores = kv("tokenizer.ggml.scores", ARRAY, (6, [0.5] * 80))
    small = kv("general.tags", ARRAY, (STRING, ["a", "b"]))
    template = kv("tokenizer.chat_template", STRING, "{{ messages }}")
    return [
        build(),
        build(kvs=base_kvs() + [vocab, scores, small, template]),
        build(kvs=base_kvs("qwen2") + [kv("general.alignment", U32, 64)], alignment=64,
              tensors=[Tensor("a", (32, 2)), Tensor("b", (64,), 2), Tensor("c", (256,), 12)]),
        build(kvs=base_kvs("mamba", **{"ARCH.attention.head_count": (U32, 0)}),
              tensors=[Tensor("x", (4,)), Tensor("y", (2, 2, 2, 2))]),
        build(kvs=[kv("general.architecture", STRING, "clip")], tensors=[]),
    ]


SEEDS = seeds()


def field_offsets(data: bytes, values: bool = False) -> list[tuple[int, int]]:
    """(offset, width) of every length, count, type, dimension and offset field of a valid
    file (where a mutation is most likely to find a bug), or with ``values`` of every scalar
    value and string's bytes (where a mutation mostly keeps the file valid)."""
    fields: list[tuple[int, int]] = []
    found = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        found.append((pos, 8))
        n = struct.unpack_from("<Q", data, pos)[0]
        if n:
            fields.append((pos + 8, n))
        pos += 8 + n

    def value(kind: int) -> None:
        nonlocal pos
        if kind == STRING:
            string()
        elif kind == ARRAY:
            elem, count = struct.unpack_from("<IQ", data, pos)
            found.extend([(pos, 4), (pos + 4, 8)])
            pos += 12
            for _ in range(count):
                value(elem)
        else:
            fields.append((pos, struct.calcsize(SCALAR_FORMATS[kind])))
            pos += struct.calcsize(SCALAR_FORMATS[kind])

    for _ in range(n_kv):
        string()
        found.append((pos, 4))
        kind = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        value(kind)
    for _ in range(n_tensors):
        string()
        n_dims = struct.unpack_from("<I", data, pos)[0]
        found.append((pos, 4))
        found.extend((pos + 4 + 8 * i, 8) for i in range(n_dims))
        pos += 4 + 8 * n_dims
        found.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return fields if values else found


FIELDS = [field_offsets(data) for data in SEEDS]
VALUES = [field_offsets(data, values=True) for data in SEEDS]


@st.composite
def mutated(draw) -> bytes:
    """A valid seed with one to four mutations."""
    which = draw(st.integers(0, len(SEEDS) - 1))
    data = bytearray(SEEDS[which])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["field", "field", "value", "value", "flip", "cut",
                                   "insert", "delete", "copy"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "value" and len(data) == len(SEEDS[which]):
            pos, width = draw(st.sampled_from(VALUES[which]))
            data[pos:pos + width] = draw(st.binary(min_size=width, max_size=width))
        elif op == "field":
            pos, width = draw(st.sampled_from(FIELDS[which]))
            number = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1))
            if draw(st.booleans()):  # near the file's own size: the off-by-one lengths
                number = len(data) + draw(st.integers(-40, 40))
            data[pos:pos + width] = (number % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=24))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 24))]
        else:
            start = draw(st.integers(0, len(data) - 1))
            data[pos:pos] = data[start:start + draw(st.integers(1, 64))]
    return bytes(data)


def values_of(kind: int, depth: int = 0) -> st.SearchStrategy:
    """Values for a metadata entry of GGUF type ``kind`` (arrays nest up to 3 deep)."""
    if kind == STRING:
        return st.text(max_size=40)
    if kind == BOOL:
        return st.booleans()
    if kind in (6, 12):
        return st.floats(width=32 if kind == 6 else 64, allow_nan=True)
    if kind == ARRAY:
        elems = [k for k in range(13) if k != ARRAY or depth < 3]
        return st.sampled_from(elems).flatmap(lambda elem: st.tuples(
            st.just(elem), st.lists(values_of(elem, depth + 1), max_size=70)))
    fmt = SCALAR_FORMATS[kind][1]
    bits = struct.calcsize(fmt) * 8
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if fmt.islower() else (0, 2**bits - 1)
    return st.integers(low, high)


@st.composite
def metadata_entry(draw, arch: str, wild: bool) -> bytes:
    """One metadata entry: of its expected type unless ``wild`` (then of any type, an unknown
    one, or with a lying length or count)."""
    key = draw(st.sampled_from(GENERAL_KEYS + [f"{arch}.{s}" for s in KEY_SUFFIXES])
               | st.text(max_size=20))
    expected = EXPECTED_KINDS.get(key.removeprefix(arch).lstrip("."))
    if not wild:
        kind = expected if expected is not None else draw(st.sampled_from(
            [k for k in range(13) if k != ARRAY]))
        if kind == ARRAY:  # a vocabulary
            return kv(key, ARRAY, (STRING, draw(st.lists(st.text(max_size=8), max_size=70))))
        if kind == STRING and key == "general.architecture":
            return kv(key, kind, arch or "llama")
        return kv(key, kind, draw(values_of(kind)))
    kind = draw(st.integers(0, 12))
    if draw(st.integers(0, 20)) == 0:  # an unknown type, and whatever bytes follow
        return gstr(key) + struct.pack("<I", draw(st.integers(13, 2**32 - 1))) + draw(
            st.binary(max_size=16))
    entry = kv(key, kind, draw(values_of(kind)))
    if kind in (STRING, ARRAY) and draw(st.booleans()):  # a lying length or count
        at = len(gstr(key)) + 4 + (4 if kind == ARRAY else 0)
        lie = draw(st.sampled_from(INTERESTING))
        entry = entry[:at] + struct.pack("<Q", lie) + entry[at + 8:]
    return entry


VALID_TENSOR = st.builds(
    Tensor, name=st.text("abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=20),
    dims=st.tuples(st.sampled_from([256, 512])).flatmap(
        lambda first: st.lists(st.integers(1, 3), max_size=3).map(lambda rest: (*first, *rest))),
    ggml_type=st.sampled_from(sorted(gguf_meta._GGML_TYPES)))
WILD_TENSOR = st.builds(
    Tensor, name=st.text(max_size=70),
    dims=st.lists(st.sampled_from([256, 1, 3]) | st.sampled_from(INTERESTING),
                  max_size=5).map(tuple),
    ggml_type=st.sampled_from(GGML_TYPES), offset=st.none() | st.sampled_from(INTERESTING))
DEFECTS = ["none", "magic", "version", "counts", "alignment", "metadata", "tensors"]


@st.composite
def structure(draw) -> bytes:
    """A file generated from scratch: well-formed, or with one kind of defect."""
    defect = draw(st.sampled_from(DEFECTS))
    arch = draw(st.sampled_from(ARCHES))
    kvs = base_kvs(arch or "llama") if draw(st.integers(0, 5)) else []
    known = {"general.architecture", "general.file_type", "general.alignment"} | {
        f"{arch or 'llama'}.{s}" for s in KEY_SUFFIXES}
    extra = draw(st.lists(metadata_entry(arch, defect == "metadata"), max_size=6))
    # Without the defect, no key twice (the base keys are already there).
    if defect != "metadata":
        seen = {gstr(k) for k in known}
        unique = []
        for entry in extra:
            key = entry[:8 + int.from_bytes(entry[:8], "little")]
            if key not in seen:
                seen.add(key)
                unique.append(entry)
        extra = unique
    kvs += extra
    alignment = 32
    if defect == "alignment" or draw(st.integers(0, 4)) == 0:
        alignment = draw(st.sampled_from([1, 8, 64, 0, 48] if defect == "alignment"
                                         else [1, 8, 64]))
        kind = draw(st.sampled_from([U32, U64])) if defect == "alignment" else U32
        kvs.append(kv("general.alignment", kind, alignment))
    tensors = draw(st.lists(WILD_TENSOR if defect == "tensors" else VALID_TENSOR,
                            max_size=4, unique_by=lambda t: t.name))
    small = sum(t.nbytes() for t in tensors) <= 1 << 16
    layout = Layout(kvs=kvs, tensors=tensors, alignment=max(alignment, 1),
                    data=small and (defect != "tensors" or draw(st.booleans())))
    if defect == "magic":
        layout.magic = draw(st.sampled_from([b"GGUX", b"FUGG", b"\0\0\0\0", b"GGML"]))
    elif defect == "version":
        layout.version = draw(st.sampled_from([2, 1, 4, 0x03000000, 2**32 - 1]))
    elif defect == "counts":
        layout.n_tensors = draw(st.none() | st.sampled_from(INTERESTING))
        layout.n_kv = draw(st.sampled_from(INTERESTING))
    return build(layout)


def usable(header: GGUFHeader) -> None:
    """What the model list reads from an accepted header converts (catalogue._info_from_gguf)."""
    assert isinstance(header.architecture, str)
    for suffix in ("context_length", "embedding_length", "block_count"):
        assert int(header.arch_value(suffix) or 0) >= 0
    assert isinstance(header.parameter_count, int) and header.parameter_count >= 0
    file_type = header.get("general.file_type")
    assert file_type is None or int(file_type) >= 0
    gguf_meta.quantization_name(file_type)
    template = header.get("tokenizer.chat_template")
    assert template is None or isinstance(template, str)


def gguf_package_reads(path: Path) -> None:
    """The gguf package's reader (what llama.cpp's Python tools use) takes the file too."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    for tensor in reader.tensors:
        assert tensor.data.nbytes == tensor.n_bytes


class Run:
    """Counts of one run, and the slowest and most memory-hungry files."""

    def __init__(self) -> None:
        self.accepted = self.refused = 0
        self.slowest = 0.0
        self.peak = 0


@pytest.mark.parametrize("source", ["mutated", "generated"])
def test_the_reader_only_refuses_with_its_one_error(source, tmp_path):
    run = Run()
    names = itertools.count()
    strategy = mutated() if source == "mutated" else structure()

    @seed(GGUF_FUZZ_SEED)
    @settings(max_examples=max(1, GGUF_FUZZ_EXAMPLES // 2), deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(data=strategy)
    def check(data: bytes) -> None:
        path = tmp_path / f"{next(names)}.gguf"
        path.write_bytes(data)
        tracemalloc.start()  # only while the reader runs: the rest stays fast
        started = time.perf_counter()
        try:
            header = read_header(path)
        except GGUFError as exc:
            header = None
            assert exc.status == 400 and exc.message and str(tmp_path) not in exc.message
        finally:
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        run.slowest, run.peak = max(run.slowest, elapsed), max(run.peak, peak)
        assert elapsed < SECONDS_PER_FILE, f"{elapsed:.2f}s for a {len(data)}-byte file"
        assert peak < PEAK_BYTES, f"{peak} bytes allocated for a {len(data)}-byte file"
        if header is None:
            run.refused += 1
        else:
            run.accepted += 1
            usable(header)
            gguf_package_reads(path)
        gguf_meta._cache.clear()  # one entry per file otherwise: memory stays flat
        path.unlink()

    check()
    print(f"\nGGUF fuzz ({source}, seed {GGUF_FUZZ_SEED}): {run.accepted + run.refused} files, "
          f"{run.accepted} accepted, {run.refused} refused; slowest {run.slowest * 1e3:.1f} ms, "
          f"peak {run.peak / 1024:.0f} KiB")
    assert run.refused > 0 and run.accepted > 0  # both paths were exercised
