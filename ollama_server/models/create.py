"""Ollama's /api/create as a plan (pure until ``run``): a validated request that names where
the weights come from (an uploaded GGUF blob, another model) and what to override (template,
system, parameters, license, messages), then writes the layers and the manifest.

Every file's header is read and refused before the first byte of the answer: a crafted file is
a 400 naming the problem, never an error line in a 200 stream, and no engine is started on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core.errors import InvalidRequest
from .gguf_meta import GGUFError, quantization_name, read_header
from .modelfile import coerce_parameter, parse_modelfile
from .schemas import ModelInfo
from .store import MEDIA_PREFIX, ModelName, OllamaStore, digest_to_hex


def _gguf_kind(digest: str, path: Path) -> tuple[str, Any]:
    """("model" | "projector", header) of a GGUF blob; a 400 naming the problem when it is not
    a GGUF file the engine can load (nothing is written, no engine started)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        magic = b""
    if magic != b"GGUF":  # Ollama's words for a file that is not GGUF at all
        raise InvalidRequest("supplied file was not in GGUF format", param="files")
    try:
        header = read_header(path)
    except GGUFError as exc:
        raise GGUFError(f"the GGUF file {digest} is invalid: {exc.message}") from None
    return ("projector" if header.architecture == "clip" else "model"), header


def _text_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequest(f"'{key}' must be a string or a list of strings", param=key)


class CreatePlan:
    """A validated /api/create request: where the weights come from and what to override."""

    def __init__(self, body: dict[str, Any], name: str, store: OllamaStore,
                 resolve: Callable[[str], ModelInfo]) -> None:
        self.store = store
        self.name = ModelName.parse(name)
        for key in ("quantize", "quantization"):
            if body.get(key):
                raise InvalidRequest("quantization is not supported by this service; upload "
                                     "a GGUF file that is already quantized", param=key)
        if body.get("adapters"):
            raise InvalidRequest("LoRA adapters are not supported by this service",
                                 param="adapters")
        modelfile: dict[str, Any] = {}
        if body.get("modelfile") is not None:
            if not isinstance(body["modelfile"], str):
                raise InvalidRequest("'modelfile' must be a string", param="modelfile")
            modelfile = parse_modelfile(body["modelfile"])
        self.base_from = body.get("from") or modelfile.get("from")
        files = body.get("files")
        if files is not None and (not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise InvalidRequest("'files' must map file names to sha256 digests",
                                 param="files")
        self.files: dict[str, str] = dict(files or {})
        if self.base_from is not None and not isinstance(self.base_from, str):
            raise InvalidRequest("'from' must be a model name", param="from")
        if self.base_from and self.base_from.lstrip("@").startswith("sha256"):
            self.files["model.gguf"] = self.base_from.lstrip("@")
            self.base_from = None
        if not self.base_from and not self.files:
            raise InvalidRequest("neither 'from' or 'files' was specified", param="from")
        self.base: ModelInfo | None = None
        if self.base_from:
            if "/" in self.base_from and Path(self.base_from).suffix == ".gguf" or \
                    self.base_from.startswith((".", "/", "~")):
                raise InvalidRequest("FROM a file path is not supported: upload the file "
                                     "with POST /api/blobs/sha256:<digest> and name it in "
                                     "'files'", param="from")
            self.base = resolve(self.base_from)
        # Every file's header is read (and refused) here, before the first byte of the answer:
        # a crafted file is a 400, never an error line in a 200 stream.
        self.blob_paths: list[tuple[str, Path, str, Any]] = []
        for fname, digest in self.files.items():
            path = self.store.blob_path(digest)
            if not path.is_file():
                raise InvalidRequest(f"blob {digest} for {fname} not found: upload it with "
                                     f"POST /api/blobs/{digest} first", param="files")
            name = f"sha256:{digest_to_hex(digest)}"
            self.blob_paths.append((name, path, *_gguf_kind(name, path)))
        self.base_header = read_header(self.base.path) if self.base is not None else None
        if self.base is None and not any(kind == "model" for *_, kind, _ in self.blob_paths):
            raise InvalidRequest("no GGUF model file among 'files'", param="files")
        params = dict(modelfile.get("parameters") or {})
        raw_params = body.get("parameters")
        if raw_params is not None:
            if not isinstance(raw_params, dict):
                raise InvalidRequest("'parameters' must be an object", param="parameters")
            for key, value in raw_params.items():
                if value is not None:
                    params[key] = coerce_parameter(key, value)
        self.params = params
        self.template = body.get("template") or modelfile.get("template")
        self.system = body.get("system") if body.get("system") is not None \
            else modelfile.get("system")
        for key, value in (("template", self.template), ("system", self.system)):
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"'{key}' must be a string", param=key)
        self.licenses = _text_list(body.get("license"), "license") or modelfile.get(
            "license") or []
        messages = body.get("messages") or modelfile.get("messages") or []
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InvalidRequest("'messages' must be a list of {role, content}",
                                 param="messages")
        self.messages = [{"role": m["role"], "content": m.get("content") or ""}
                         for m in messages]

    def _layer(self, kind: str, data: bytes) -> tuple[dict[str, Any], bool]:
        """Store a small layer; (its manifest entry, whether the blob was there before)."""
        hex_digest = hashlib.sha256(data).hexdigest()
        existed = (self.store.blobs_dir / f"sha256-{hex_digest}").is_file()
        got, size = self.store.write_bytes_blob(data)
        return ({"mediaType": MEDIA_PREFIX + kind, "digest": f"sha256:{got}", "size": size},
                existed)

    def run(self) -> Iterator[dict[str, Any]]:
        """Write the layers and the manifest, yielding Ollama's status objects."""
        layers: list[dict[str, Any]] = []
        base_params: dict[str, Any] = {}
        header = None
        if self.base is not None:
            yield {"status": "using existing model"}
            if self.base.source == "ollama":
                for layer in self.base.layers:
                    kind = layer.get("mediaType", "").removeprefix(MEDIA_PREFIX)
                    if kind == "params":
                        base_params = dict(self.base.params)
                        continue
                    if kind in ("template", "prompt") and self.template is not None or \
                            kind == "system" and self.system is not None or \
                            kind == "license" and self.licenses or \
                            kind == "messages" and self.messages:
                        continue
                    layers.append(dict(layer))
                    yield {"status": f"using existing layer {layer['digest']}"}
            else:
                with open(self.base.path, "rb") as fh:
                    got, size = self.store.write_blob(fh)
                layers.append({"mediaType": MEDIA_PREFIX + "model",
                               "digest": f"sha256:{got}", "size": size})
                yield {"status": f"creating new layer sha256:{got}"}
            header = self.base_header
        for digest, path, kind, gguf_header in self.blob_paths:
            yield {"status": "parsing GGUF"}
            if kind == "model":
                header = gguf_header
            layers.append({"mediaType": MEDIA_PREFIX + kind, "digest": digest,
                           "size": path.stat().st_size})
            yield {"status": f"using existing layer {digest}"}
        if header is None:
            raise InvalidRequest("no GGUF model file among 'files'", param="files")
        extra: list[tuple[str, bytes]] = []
        if self.template is not None:
            extra.append(("template", self.template.encode()))
        if self.system is not None:
            extra.append(("system", self.system.encode()))
        extra += [("license", text.encode()) for text in self.licenses]
        if self.messages:
            extra.append(("messages", json.dumps(self.messages).encode()))
        params = {**base_params, **self.params}
        if params:
            extra.append(("params", json.dumps(params).encode()))
        for kind, data in extra:
            layer, existed = self._layer(kind, data)
            layers.append(layer)
            verb = "using existing" if existed else "creating new"
            yield {"status": f"{verb} layer {layer['digest']}"}
        arch = header.architecture
        sized = ModelInfo(name="", path=Path(), source="", parameter_count=header.parameter_count)
        config = {"model_format": "gguf", "model_family": arch,
                  "model_families": [arch] if arch else [],
                  "model_type": sized.parameter_size,
                  "file_type": quantization_name(header.get("general.file_type")),
                  "architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers",
                             "diff_ids": [layer["digest"] for layer in layers]}}
        yield {"status": "writing manifest"}
        with self.store.lock:
            old_path = self.name.manifest_path(self.store.manifests_dir)
            old = self.store.read_manifest(old_path) if old_path.is_file() else None
            manifest = self.store.build_manifest(layers, config)
            self.store.write_manifest(self.name, manifest)
            if old is not None:
                # Blobs only the replaced manifest used go, as Ollama prunes on create.
                self.store.prune(old)
        yield {"status": "success"}
