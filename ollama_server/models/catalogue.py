"""ModelCatalogue: the models there are, and what a client's name refers to.

Discovery reads the Ollama store (manifests and blobs) and plain GGUF folders; the truth about a
model comes from its GGUF header. Nothing here runs an engine (``pool.EnginePool`` does): a
catalogue can be read by any process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from ..core.errors import (
    InvalidRequest,
    ModelNotFound,
)
from .gguf_meta import GGUFError, quantization_name, read_header
from .schemas import ModelInfo
from .store import (
    MAX_SMALL_LAYER_BYTES,
    MEDIA_PREFIX,
    SMALL_LAYERS,
    DamagedModel,
    ModelName,
    OllamaStore,
    check_manifest,
    params_problem,
    parse_json,
)

log = logging.getLogger(__name__)


def _stamp(info: ModelInfo) -> tuple:
    """(size, mtime) of a model's GGUF files (None for one that is gone): a blob replaced in
    place changes it."""
    out = []
    for path in (info.path, info.projector):
        if path is not None:
            try:
                st = path.stat()
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
    return tuple(out)


def _log_problem(_path: str, problem: str) -> None:
    log.warning("%s (left out of the model list)", problem)


class ModelCatalogue:
    """Finds models and resolves names; a damaged model is left out of every list (logged
    once) and is a DamagedModel (400) when asked for by name."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = OllamaStore(config.models_path, config.manifests_path)
        # (file, mtime) → (info, the stamp of its GGUF files when it was read)
        self._info_cache: dict[tuple[str, float], tuple[ModelInfo, tuple]] = {}
        self._reported: dict[str, str] = {}  # file → the problem last logged for it
        self.aliases: dict[str, str] = {}  # placeholder name → model ("" = default model)
        # Where a problem goes once this catalogue has seen it (a worker of several: to the
        # engine pool, which logs each once for the whole service).
        self.log_problem: Callable[[str, str], None] = _log_problem

    # --- discovery -----------------------------------------------------------------------

    def _cached(self, key: tuple[str, float]) -> ModelInfo | None:
        """A cached ModelInfo whose GGUF files have not changed since it was read (a blob
        replaced in place must be read again, never handed to an engine)."""
        entry = self._info_cache.get(key)
        if entry is None or entry[1] != _stamp(entry[0]):
            return None
        return entry[0]

    def _remember(self, key: tuple[str, float], info: ModelInfo) -> None:
        self._info_cache[key] = (info, _stamp(info))

    def report_problem(self, path: Path, problem: str) -> None:
        """Log why a model is left out of the lists, once per file and problem (listings run
        on every /api/tags)."""
        if self._reported.get(str(path)) != problem:
            self._reported[str(path)] = problem
            self.log_problem(str(path), problem)

    def _info_from_manifest(self, name: ModelName, path: Path) -> ModelInfo:
        """The model a manifest describes. DamagedModel names the problem when its files
        cannot be used, whatever they hold; ModelNotFound when the manifest has just gone."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            raise ModelNotFound(name.short) from None
        cached = self._cached((str(path), mtime))
        if cached is not None:
            return cached
        try:
            info = self._read_manifest_model(name, path, mtime)
        except DamagedModel:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the files hold: a 400, not a 500
            raise DamagedModel(name.short, f"its files cannot be read ({type(exc).__name__}: "
                                           f"{exc})") from None
        self._remember((str(path), mtime), info)
        return info

    def _read_manifest_model(self, name: ModelName, path: Path, mtime: float) -> ModelInfo:
        short = name.short
        try:
            manifest = self.store.read_manifest(path)
            layers = check_manifest(manifest)
        except OSError as exc:
            raise DamagedModel(short, f"its manifest cannot be read ({exc.strerror})") from None
        except ValueError as exc:
            raise DamagedModel(short, f"its manifest is malformed: {exc}") from None
        for layer in layers:
            kind = layer["mediaType"].removeprefix(MEDIA_PREFIX)
            try:
                size = self.store.blob_path(layer["digest"]).stat().st_size
            except OSError:
                raise DamagedModel(short, f"the blob {layer['digest']} of its {kind} layer is "
                                          f"missing from the store") from None
            if kind in SMALL_LAYERS and size > MAX_SMALL_LAYER_BYTES:
                raise DamagedModel(short, f"its {kind} layer is {size} bytes, more than the "
                                          f"{MAX_SMALL_LAYER_BYTES} a {kind} layer may be")
        model_layer = self.store.layer(manifest, "model")
        if model_layer is None:
            raise DamagedModel(short, "its manifest has no model layer")
        gguf_path = self.store.blob_path(model_layer["digest"])
        try:
            info = self._info_from_gguf(short, gguf_path, "ollama")
        except GGUFError as exc:
            raise DamagedModel(short, f"its model file is not a usable GGUF file: "
                                      f"{exc.message}") from None
        info.digest = hashlib.sha256(path.read_bytes()).hexdigest()
        info.modified_at = mtime
        info.layers = layers
        info.size = sum(int(layer.get("size", 0)) for layer in info.layers) + int(
            (manifest.get("config") or {}).get("size", 0))
        params = self._layer_json(manifest, "params", name)
        if params is not None:
            problem = params_problem(params)
            if problem is not None:
                raise DamagedModel(short, problem)
            info.params = params
        info.system = self.store.read_layer_text(manifest, "system")
        messages = self._layer_json(manifest, "messages", name)
        if messages is not None and not isinstance(messages, list):
            raise DamagedModel(short, "its messages layer is not a JSON list")
        info.messages = [{"role": str(m.get("role", "")), "content": str(m.get("content") or "")}
                         for m in messages or [] if isinstance(m, dict)]
        info.template = (self.store.read_layer_text(manifest, "template")
                         or self.store.read_layer_text(manifest, "prompt"))
        info.license = [text for layer in layers if layer["mediaType"].endswith(".license")
                        for text in [self._blob_text(layer)] if text]
        projector = self.store.layer(manifest, "projector")
        if projector is not None:
            proj_path = self.store.blob_path(projector["digest"])
            try:
                read_header(proj_path)  # llama-server is never started on a refused file
            except GGUFError as exc:
                raise DamagedModel(short, f"its projector file is not a usable GGUF file: "
                                          f"{exc.message}") from None
            info.projector = proj_path
        return info

    def _layer_json(self, manifest: dict[str, Any], kind: str, name: ModelName) -> Any:
        """The JSON of a manifest's ``kind`` layer; None when it has none, DamagedModel when
        it is not JSON (its size was checked against MAX_SMALL_LAYER_BYTES)."""
        layer = self.store.layer(manifest, kind)
        if layer is None:
            return None
        try:
            return parse_json(self.store.blob_path(layer["digest"]).read_bytes())
        except OSError as exc:
            raise DamagedModel(name.short, f"its {kind} layer cannot be read "
                                           f"({exc.strerror})") from None
        except ValueError:
            raise DamagedModel(name.short, f"its {kind} layer is not JSON") from None

    def _blob_text(self, layer: dict[str, Any]) -> str | None:
        try:
            return self.store.blob_path(layer["digest"]).read_text(encoding="utf-8")
        except (OSError, KeyError, InvalidRequest, UnicodeDecodeError):
            return None

    def _info_from_gguf(self, name: str, path: Path, source: str) -> ModelInfo:
        """A ModelInfo from a GGUF header; GGUFError when the file is not a usable GGUF (the
        reader checked the types of every key read here)."""
        header = read_header(path)
        try:
            st = path.stat()
        except OSError as exc:
            raise GGUFError(f"cannot read the GGUF file: {exc.strerror}") from None
        arch = header.architecture
        file_type = header.get("general.file_type")
        pooling = header.arch_value("pooling_type")
        pooling_names = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
        return ModelInfo(
            name=name, path=path, source=source, size=st.st_size, modified_at=st.st_mtime,
            architecture=arch,
            context_length=int(header.arch_value("context_length") or 0),
            embedding_length=int(header.arch_value("embedding_length") or 0),
            block_count=int(header.arch_value("block_count") or 0),
            parameter_count=header.parameter_count,
            file_type=None if file_type is None else int(file_type),
            quantization_level=quantization_name(file_type),
            family=arch, families=[arch] if arch else [],
            chat_template=header.get("tokenizer.chat_template"),
            metadata={k: v for k, v in header.metadata.items()
                      if k not in ("general.name", "tokenizer.chat_template")},
            pooling=pooling_names.get(pooling) if pooling is not None else None,
            vocab_size=int(header.array_lengths.get("tokenizer.ggml.tokens", 0)),
        )

    def _gguf_files(self) -> list[Path]:
        folders = [self.config.models_path] + [Path(d).expanduser() for d in
                                               self.config.gguf_dirs]
        files: list[Path] = []
        for folder in folders:
            if folder.is_dir():
                files += sorted(p for p in folder.glob("*.gguf") if p.is_file()
                                and "mmproj" not in p.name.lower())
        return files

    def list_models(self) -> list[ModelInfo]:
        """Every model in the Ollama store and the GGUF folders, sorted by name."""
        found: dict[str, ModelInfo] = {}
        for name, path in self.store.iter_manifests():
            # A damaged model is left out (as Ollama's list does), logged once; requests for
            # it get the DamagedModel 400, and /api/delete removes it.
            try:
                info = self._info_from_manifest(name, path)
            except DamagedModel as exc:
                self.report_problem(path, exc.message)
                continue
            except ModelNotFound:
                continue
            found.setdefault(info.name, info)
        for path in self._gguf_files():
            info = self._gguf_folder_info(path)
            if info is not None:
                found.setdefault(info.name, info)
        return sorted(found.values(), key=lambda i: i.name)

    def _gguf_folder_info(self, path: Path) -> ModelInfo | None:
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:
            return None
        cached = self._cached(key)
        if cached is not None:
            return cached
        try:
            short = ModelName.parse(path.stem).short
        except InvalidRequest:
            return None
        try:
            info = self._info_from_gguf(short, path, "gguf")
        except GGUFError as exc:
            self.report_problem(path, f"{path} is not a usable GGUF file: {exc.message}")
            return None
        info.digest = hashlib.sha256(str(path).encode()).hexdigest()
        mmproj = next(iter(sorted(path.parent.glob(f"{path.stem}*mmproj*.gguf"))), None)
        info.projector = mmproj
        self._remember(key, info)
        return info

    def resolve(self, name: str | None) -> ModelInfo:
        """The model a client's name refers to; ModelNotFound or InvalidRequest otherwise.

        Names resolve the way Ollama does: a missing tag means ``latest``, the default host
        and namespace may be left out, and case does not matter.
        """
        parsed = ModelName.parse(name or "")
        path = parsed.manifest_path(self.store.manifests_dir)
        if path.is_file():
            try:
                return self._info_from_manifest(parsed, path)  # DamagedModel: its 400
            except ModelNotFound:
                pass  # deleted meanwhile
        wanted = parsed.short.lower()
        for info in self.list_models():
            if info.name.lower() == wanted:
                return info
        alias = self.aliases.get((name or "").strip().lower())
        if alias is not None:  # only when no real model has that name
            return self.resolve(alias or self.default_model_name())
        raise ModelNotFound(name or "")

    def default_model_name(self) -> str | None:
        """The configured default model; with ``default_model`` unset (null), the first model
        available (by name), or None when there is none."""
        if self.config.default_model:
            return self.config.default_model
        models = self.list_models()
        return models[0].name if models else None

    def add_alias(self, name: str, target: str = "") -> None:
        """Make ``name`` resolve to ``target`` (empty: the default model) when no model of
        that name exists (placeholder names that some clients send, such as TGI's)."""
        self.aliases[name.strip().lower()] = target

    def apply_config(self) -> None:
        """Follow the model folders of the configuration just swapped into ``self.config``."""
        c = self.config
        if (self.store.root, self.store.manifests_dir) != (c.models_path, c.manifests_path):
            log.info("model folders are now %s (manifests %s)", c.models_path, c.manifests_path)
            self.store = OllamaStore(c.models_path, c.manifests_path)
