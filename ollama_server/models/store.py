"""The Ollama model store on disk: names, manifests, blobs, and atomic writes.

Layout (``$OLLAMA_MODELS``)::

    manifests/<host>/<namespace>/<model>/<tag>   JSON manifest (schemaVersion 2)
    blobs/sha256-<64 hex>                          content-addressed layers

Names are ``[host/][namespace/]model[:tag]`` with defaults ``registry.ollama.ai``, ``library``
and ``latest``. A name that could leave the store (``..``, absolute paths, odd characters) is
rejected before any path is built from it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..core.errors import InvalidRequest, ServiceError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MEDIA_PREFIX = "application/vnd.ollama.image."
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,349}(:[0-9]{1,5})?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
# Store files are readable by every user, as Ollama writes them: a service (or a container)
# running as another user reads the store (mkstemp alone would leave them 0600).
FILE_MODE = 0o644
# A manifest lists a few layers (Ollama's registry takes 4 MiB at most); a small layer (params,
# system, template, license, messages) is text. Anything bigger is not read into memory.
MAX_MANIFEST_BYTES = 4 << 20
MAX_SMALL_LAYER_BYTES = 16 << 20
SMALL_LAYERS = ("params", "system", "template", "prompt", "license", "messages")


@dataclass(frozen=True)
class ModelName:
    """A parsed, validated model name."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, name: str) -> "ModelName":
        """Parse ``[host/][namespace/]model[:tag]``; raise InvalidRequest when it is unsafe."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("model is required", param="model")
        text = name.strip()
        if text.startswith("/") or "\\" in text or "\x00" in text:
            raise InvalidRequest(f"invalid model name {name!r}", param="model")
        tag = DEFAULT_TAG
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            text, tag = text[:colon], text[colon + 1:]
        parts = text.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            host, namespace, model = DEFAULT_HOST, parts[0], parts[1]
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise InvalidRequest(f"invalid model name {name!r}", param="model")
        ok = (_HOST.match(host) and _PART.match(namespace) and _PART.match(model)
              and _TAG.match(tag) and ".." not in f"{host}/{namespace}/{model}/{tag}")
        if not ok:
            raise InvalidRequest(f"invalid model name {name!r}", param="model")
        return cls(host, namespace, model, tag)

    @property
    def short(self) -> str:
        """The name as Ollama shows it: defaults left out, tag always shown."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        if self.host == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def manifest_path(self, manifests_dir: Path) -> Path:
        """Where this name's manifest lives in a store."""
        return manifests_dir / self.host / self.namespace / self.model / self.tag


def digest_to_hex(digest: str) -> str:
    """``sha256:<hex>`` or ``sha256-<hex>`` → ``<hex>``; InvalidRequest when malformed."""
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if not match:
        raise InvalidRequest(f"invalid digest {digest!r}", param="digest")
    return match.group(1)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DamagedModel(InvalidRequest):
    """A model in the store whose files cannot be used (a manifest, layer or blob that is
    malformed, missing or not what its kind must be); the message names the problem and the
    way out. Listings leave such a model out; requests for it get this 400."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"model '{name}' is damaged: {problem}; delete it (ollama rm {name}, "
                         f"or DELETE /api/delete) and pull or create it again", param="model")
        self.name = name
        self.problem = problem


def check_manifest(manifest: Any) -> list[dict[str, Any]]:
    """The layers of a parsed manifest; ValueError naming the first field of the wrong shape
    (the manifest may have been written by anyone)."""
    if not isinstance(manifest, dict):
        raise ValueError("the manifest is not a JSON object")
    layers = manifest.get("layers", [])
    if not isinstance(layers, list):
        raise ValueError("the manifest's 'layers' is not a list")
    config = manifest.get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError("the manifest's 'config' is not an object")
    for where, entry in [("'config'", config or {}),
                         *((f"layer {i}", layer) for i, layer in enumerate(layers))]:
        if not isinstance(entry, dict):
            raise ValueError(f"the manifest's {where} is not an object")
        if where != "'config'" and not isinstance(entry.get("mediaType"), str):
            raise ValueError(f"the manifest's {where} has no mediaType")
        digest = entry.get("digest")
        if (where != "'config'" or digest is not None) and not (
                isinstance(digest, str) and _DIGEST.match(digest)):
            raise ValueError(f"the manifest's {where} has an invalid digest "
                             f"{json.dumps(digest)[:80]}")
        size = entry.get("size", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"the manifest's {where} has an invalid size "
                             f"{json.dumps(size)[:80]}")
    return layers


# The params a model's params layer may set that the service uses: kind, and the range the
# engine takes (None: unbounded). Other keys (runner options) are not read, so not checked.
_PARAM_RULES: dict[str, tuple[str, float | None, float | None]] = {
    "temperature": ("float", 0, None), "top_p": ("float", 0, 1), "min_p": ("float", 0, 1),
    "typical_p": ("float", 0, None), "repeat_penalty": ("float", 0, None),
    "presence_penalty": ("float", None, None), "frequency_penalty": ("float", None, None),
    "top_k": ("int", None, 2**31 - 1), "repeat_last_n": ("int", -1, 2**31 - 1),
    "seed": ("int", -(2**63), 2**64 - 1), "num_ctx": ("int", 1, 2**31 - 1),
    "num_predict": ("int", -2, 2**31 - 1), "stop": ("stop", None, None),
}


def params_problem(params: Any) -> str | None:
    """Why a params layer (parsed JSON) cannot be used, or None when it can."""
    if not isinstance(params, dict):
        return "its params layer is not a JSON object"
    for key, (kind, low, high) in _PARAM_RULES.items():
        if key not in params or params[key] is None:
            continue
        value = params[key]
        shown = json.dumps(value)[:80]
        if kind == "stop":
            if not (isinstance(value, str) or isinstance(value, list)
                    and all(isinstance(s, str) for s in value)):
                return f"its params layer's 'stop' must be a string or a list of strings, " \
                       f"not {shown}"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            return f"its params layer's '{key}' must be a number, not {shown}"
        if kind == "int" and isinstance(value, float) and not value.is_integer():
            return f"its params layer's '{key}' must be an integer, not {shown}"
        if low is not None and value < low or high is not None and value > high:
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            return f"its params layer's '{key}' is {shown}, outside {bounds}"
    return None


def parse_json(data: bytes | str) -> Any:
    """JSON from a store file; ValueError for anything that is not JSON (nesting too deep for
    the parser included: a crafted file must not escape as a RecursionError)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def manifest_entries(manifest: Any) -> list[dict[str, Any]]:
    """The config and layer entries of a manifest that name a valid digest, whatever else it
    holds (for pruning and permissions: a damaged manifest must never stop those)."""
    if not isinstance(manifest, dict):
        return []
    layers = manifest.get("layers")
    entries = [manifest.get("config"), *(layers if isinstance(layers, list) else [])]
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)
            and _DIGEST.match(e["digest"])]


class DigestMismatch(ServiceError):
    """Downloaded bytes do not hash to the digest the manifest names (Ollama's words)."""

    def __init__(self, expected_hex: str, got_hex: str) -> None:
        super().__init__(f"digest mismatch, file must be downloaded again: want "
                         f"sha256:{expected_hex}, got sha256:{got_hex}", param="digest")


class PartialBlob:
    """A blob being downloaded into ``blobs/sha256-<hex>-partial``.

    The partial file survives an interruption, so the next download resumes at its end:
    ``open()`` hashes what is already there and returns that offset. ``commit()`` checks size
    and sha256 and renames the file to its blob name; on a mismatch the partial file is
    removed (it can never become right) and DigestMismatch is raised.
    """

    def __init__(self, store: "OllamaStore", digest: str, size: int) -> None:
        self.hex = digest_to_hex(digest)
        self.size = int(size)
        self.target = store.blobs_dir / f"sha256-{self.hex}"
        self.path = self.path_of(self.target)
        self.offset = 0
        self._hash = hashlib.sha256()
        self._fh: IO[bytes] | None = None

    @staticmethod
    def path_of(blob: Path) -> Path:
        """The partial file of the blob file ``blob``."""
        return blob.with_name(blob.name + "-partial")

    def open(self) -> int:
        """Open for appending; the offset to resume from (0 for a fresh download)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._hash = hashlib.sha256()
        self.offset = 0
        if self.path.is_file() and self.path.stat().st_size <= self.size:
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    self._hash.update(chunk)
                    self.offset += len(chunk)
        else:
            self.path.unlink(missing_ok=True)
        self._fh = open(self.path, "ab")
        return self.offset

    def restart(self) -> None:
        """Throw away what was downloaded (the server cannot resume) and start at 0."""
        assert self._fh is not None, "open() first"
        self._fh.truncate(0)
        self._fh.seek(0)
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        """Append downloaded bytes."""
        assert self._fh is not None, "open() first"
        self._fh.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def close(self) -> None:
        """Flush and close, keeping the partial file for a later resume. Idempotent."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def commit(self) -> None:
        """Verify size and digest, then rename to the blob's own name."""
        self.close()
        got = self._hash.hexdigest()
        if got != self.hex or self.offset != self.size:
            self.path.unlink(missing_ok=True)
            raise DigestMismatch(self.hex, got)
        os.replace(self.path, self.target)


class OllamaStore:
    """Read and write one Ollama-layout model store.

    ``lock`` serialises manifest writes and the pruning of blobs (create, copy, delete, pull).
    Blobs that a pull in progress will reference are pinned (``pinned``) so that a delete of
    another model sharing them cannot prune them before the new manifest is written.
    """

    def __init__(self, models_dir: Path, manifests_dir: Path | None = None) -> None:
        self.root = Path(models_dir)
        self.manifests_dir = Path(manifests_dir) if manifests_dir else self.root / "manifests"
        self.blobs_dir = self.root / "blobs"
        self.lock = threading.RLock()
        self._pins: collections.Counter[str] = collections.Counter()

    def blob_path(self, digest: str) -> Path:
        """Path of a blob from its ``sha256:<hex>`` digest."""
        return self.blobs_dir / f"sha256-{digest_to_hex(digest)}"

    def has_blob(self, digest: str) -> bool:
        """True when the blob is in the store (complete, not a partial download)."""
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these blobs from being pruned while the block runs (a pull in progress)."""
        hexes = [digest_to_hex(d) for d in digests]
        with self.lock:
            self._pins.update(hexes)
        try:
            yield
        finally:
            with self.lock:
                self._pins.subtract(hexes)
                self._pins += collections.Counter()  # drop zero counts

    def iter_manifests(self) -> Iterator[tuple[ModelName, Path]]:
        """Every manifest in the store as (name, path); malformed entries are skipped."""
        if not self.manifests_dir.is_dir():
            return
        for path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model = path.parts[-4], path.parts[-3], path.parts[-2]
            try:
                name = ModelName.parse(f"{host}/{namespace}/{model}:{path.name}")
            except InvalidRequest:
                continue
            yield name, path

    @staticmethod
    def read_manifest(path: Path) -> dict[str, Any]:
        """Parse one manifest file; ValueError when it is not JSON or over
        MAX_MANIFEST_BYTES (its shape is checked by check_manifest)."""
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"the manifest is over {MAX_MANIFEST_BYTES} bytes")
        return parse_json(data)

    def layer(self, manifest: dict[str, Any], kind: str) -> dict[str, Any] | None:
        """The first layer of ``kind`` (``model``, ``params``, ``system``…) in a manifest
        (entries that are not objects are passed over)."""
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        for layer in layers if isinstance(layers, list) else []:
            if isinstance(layer, dict) and layer.get("mediaType") == MEDIA_PREFIX + kind:
                return layer
        return None

    def read_layer_text(self, manifest: dict[str, Any], kind: str) -> str | None:
        """The text of a small layer (params, system, template, license); None when it is
        absent, unreadable, not UTF-8 or over MAX_SMALL_LAYER_BYTES."""
        layer = self.layer(manifest, kind)
        if layer is None:
            return None
        try:
            with open(self.blob_path(layer["digest"]), "rb") as fh:
                data = fh.read(MAX_SMALL_LAYER_BYTES + 1)
            if len(data) > MAX_SMALL_LAYER_BYTES:
                return None
            return data.decode("utf-8")
        except (OSError, KeyError, InvalidRequest, UnicodeDecodeError):
            return None

    # --- writes: temp file in the same folder, verified, then renamed ------------------------

    def write_blob(self, stream: IO[bytes], expected_hex: str | None = None,
                   chunk: int = 1 << 20) -> tuple[str, int]:
        """Copy ``stream`` into a blob atomically; return (hex digest, size).

        The data goes to a temp file first; the digest is checked against ``expected_hex``
        when given (InvalidRequest on a mismatch, nothing left behind), then renamed.
        """
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=self.blobs_dir)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as out:
                for data in iter(lambda: stream.read(chunk), b""):
                    h.update(data)
                    out.write(data)
                    size += len(data)
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if expected_hex is not None and got != expected_hex:
                raise InvalidRequest(f"digest mismatch, expected sha256:{expected_hex}, "
                                     f"got sha256:{got}", param="digest")
            target = self.blobs_dir / f"sha256-{got}"
            if target.exists():
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
            return got, size
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def write_bytes_blob(self, data: bytes) -> tuple[str, int]:
        """Store a small in-memory layer (params, system); return (hex digest, size)."""
        return self.write_blob(io.BytesIO(data))

    def write_manifest(self, name: ModelName, manifest: dict[str, Any] | bytes) -> Path:
        """Write a manifest atomically (temp file, then rename); bytes are written as they are
        (a pulled manifest keeps the registry's digest)."""
        path = name.manifest_path(self.manifests_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = manifest if isinstance(manifest, bytes) else json.dumps(
            manifest, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def build_manifest(self, layers: list[dict[str, Any]], config: dict[str, Any]
                       ) -> dict[str, Any]:
        """A schemaVersion 2 manifest over ``layers`` with ``config`` stored as a blob."""
        cfg_hex, cfg_size = self.write_bytes_blob(json.dumps(config).encode())
        return {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA,
            "config": {"mediaType": CONFIG_MEDIA, "digest": f"sha256:{cfg_hex}",
                       "size": cfg_size},
            "layers": layers,
        }

    def make_readable(self, manifest_path: Path) -> None:
        """Give a manifest and its blobs FILE_MODE (stores written before files had it)."""
        manifest = self.read_manifest(manifest_path)
        for path in [manifest_path] + [self.blob_path(entry["digest"])
                                       for entry in manifest_entries(manifest)]:
            if path.is_file() and path.stat().st_mode & 0o777 != FILE_MODE:
                path.chmod(FILE_MODE)

    def referenced_blobs(self) -> set[str]:
        """Hex digests used by any manifest in the store (config and layers)."""
        used: set[str] = set()
        for _, path in self.iter_manifests():
            try:
                manifest = self.read_manifest(path)
            except (OSError, ValueError):
                continue
            # A damaged manifest still keeps the blobs it names (its model may be fixed).
            used.update(digest_to_hex(entry["digest"]) for entry in manifest_entries(manifest))
        return used

    def prune(self, manifest: dict[str, Any]) -> int:
        """Remove the blobs of ``manifest`` (config and layers) that no stored manifest uses
        and no pull in progress needs; the number removed."""
        with self.lock:
            still_used = self.referenced_blobs() | set(self._pins)
            removed = 0
            for entry in manifest_entries(manifest):
                hex_digest = digest_to_hex(entry["digest"])
                path = self.blobs_dir / f"sha256-{hex_digest}"
                if hex_digest not in still_used and path.is_file():
                    path.unlink(missing_ok=True)
                    still_used.add(hex_digest)  # a digest listed twice is removed once
                    removed += 1
            return removed

    def delete(self, name: ModelName) -> bool:
        """Remove a manifest and the blobs no other manifest uses; False when absent."""
        path = name.manifest_path(self.manifests_dir)
        if not path.is_file():
            return False
        try:
            manifest = self.read_manifest(path)
        except (OSError, ValueError):
            manifest = {}
        path.unlink()
        self.prune(manifest)
        # Tidy empty folders left behind (never the manifests root itself).
        parent = path.parent
        while parent != self.manifests_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        return True

    def copy(self, source: ModelName, destination: ModelName) -> bool:
        """Point ``destination`` at ``source``'s manifest; False when the source is absent."""
        path = source.manifest_path(self.manifests_dir)
        if not path.is_file():
            return False
        self.write_manifest(destination, self.read_manifest(path))
        return True
