"""Service configuration: defaults, then ``config/service_config.yaml``, then environment
variables (``OLLAMA_SERVER_<KEY>``, and those of the file ``OLLAMA_SERVER_ENV_FILE`` names), then
command-line flags. A bad value raises ConfigError naming the key.

``ConfigSource`` remembers where a configuration came from so that it can be loaded again, with
the same precedence, when the service is told to reload (SIGHUP).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "config" / "service_config.yaml"
ENV_PREFIX = "OLLAMA_SERVER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


DEFAULT_CORS_ORIGINS = tuple(
    f"{scheme}://{host}{port}" for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


@dataclass
class Config:
    """Every setting of the service, with its default."""

    models_dir: str = "./models"  # an Ollama store (manifests/ and blobs/)
    manifests_dir: str | None = None  # default: <models_dir>/manifests
    gguf_dirs: list[str] = field(default_factory=list)  # folders of plain *.gguf files
    llama_cpp_path: str | None = None  # a llama.cpp build folder or the llama-server binary
    default_context_size: int = 8192  # cap on the context a model is loaded with
    default_model: str | None = "smollm2:135m"  # None: the first model available
    tensor_split: list[float] | None = None
    gpu_layers: int | None = None  # -ngl; None lets llama-server decide
    threads: int = 0  # 0: llama-server's choice
    batch_size: int = 512
    parallel: int = 32  # parallel slots per model (continuous batching; see README, Performance)
    max_loaded_models: int = 3
    # Models loaded at start and after a reload, before /health says ready (in this order).
    preload: list[str] = field(default_factory=list)
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request
    request_timeout: float = 600.0
    startup_timeout: float = 300.0
    max_body_mb: float = 100.0
    log_level: str = "INFO"
    log_dir: str = "./logs"
    enable_model_inspection: bool = True
    preserve_think_tags: bool = True
    embeddings: bool = True
    host: str = "127.0.0.1"
    port: int = 11435
    threads_http: int = 64  # gunicorn threads per worker: concurrent requests and streams
    # Worker processes in front of one engine pool (shared_pool.py): "auto" is one per core;
    # 1 serves everything from one process, with the engines as its children.
    workers: str = "auto"
    # One thread relays every stream's tokens after the first (core/relay.py); false: each
    # stream's own request thread does (more CPU per token at high concurrency).
    relay_thread: bool = True
    api_key: str | None = None  # when set, every route but the public ones needs it
    # Browser origins allowed to call the API (glob patterns); Ollama's defaults: local pages
    # and desktop-app schemes. "*" allows every site.
    cors_origins: list[str] = field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS))
    # Host names (glob patterns, no port) requests may carry besides this machine's own
    # (localhost, its addresses, *.localhost): the names a reverse proxy passes on. Checked on a
    # loopback bind (DNS rebinding), and on any bind when set; "*" turns the check off.
    allowed_hosts: list[str] = field(default_factory=list)
    debug: bool = False

    # --- splitting models across GPUs and hosts (issue 10) ------------------------------
    # llama.cpp RPC workers (ggml-rpc-server) on other hosts, "host:port"; their devices are
    # used like local GPUs (-ngl and tensor_split spread layers over them).
    rpc_servers: list[str] = field(default_factory=list)
    allow_public_rpc: bool = False  # workers have no authentication: private addresses only
    main_gpu: int | None = None  # --main-gpu
    fit_target_mib: int | None = None  # --fit-target: MiB --fit leaves free on each device
    # The KV cache's number type: f16 (llama.cpp's default), bf16, q8_0 (about half the
    # memory), q4_0 (about a quarter)... A quantised V cache needs flash attention. Ollama's
    # OLLAMA_KV_CACHE_TYPE is read too.
    kv_cache_type: str = "f16"
    # Flash attention: auto (llama.cpp decides per device), on, off (OLLAMA_FLASH_ATTENTION).
    flash_attention: str = "auto"
    # --- prompt caching for long multi-turn conversations (issue 24 item 6) ---------------
    # Tokens of KV cache all of a model's slots share (llama-server -c, each slot capped at
    # the model's context by --kv-unified-per-slot). 0 (auto): four contexts (two, one) as
    # free host memory allows, one where the cache may go to a GPU or RPC workers
    # (models/kv_budget.py); N concurrent conversations of T tokens need N*T.
    kv_pool_size: int = 0
    # MiB of host memory per engine for the prompts of idle slots (--cache-ram): a slot
    # another conversation takes is saved there, and the conversation's next turn restored
    # from it instead of computed again. -1: no limit, 0: off.
    cache_ram: int = 8192
    # How much of a request's prompt an idle slot's cached prompt must match for the request
    # to go to that slot (--slot-prompt-similarity, 0..1); 0: least recently used slot.
    slot_prompt_similarity: float = 0.1
    # Per-model overrides of rpc_servers, tensor_split, gpu_layers, main_gpu, fit_target_mib,
    # parallel, kv_cache_type, flash_attention, kv_pool_size, cache_ram, slot_prompt_similarity:
    # {"big-model:70b": {"rpc_servers": [...], "tensor_split": "1,1,2"}}.
    model_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    # --- Issue 15: pulling and pushing models (OCI distribution registries) ----------------
    # Where names without a registry host ("llama3.2", "ns/model") are pulled from and pushed
    # to; they keep their short name in the store. A private registry: "registry.corp:5000".
    registry: str = "registry.ollama.ai"
    # Registries reached over plain HTTP even when a request does not say "insecure": true.
    registry_insecure: list[str] = field(default_factory=list)
    # Credentials per registry ("host[:port]" -> "user:password"), for its token service or
    # its basic authentication.
    registry_auth: dict[str, str] = field(default_factory=dict)
    registry_concurrency: int = 4  # blobs one pull (or push) transfers at once
    registry_timeout: float = 60.0  # seconds a registry may stay silent before a retry
    # Model names, redirects and token services may lead to hosts on loopback, private or
    # link-local addresses (169.254.169.254, 10.x, ::1, ...). Off: only the hosts named in
    # registry, registry_insecure and registry_auth may be there (issue 25, server-side
    # request forgery through /api/pull).
    registry_allow_private: bool = False

    # --- issue 12: access control and limits ---------------------------------------------
    # Read from this object on every request (never copied at start-up), so that a reload of
    # the configuration applies them to the next request.
    api_keys: dict[str, str] | str | None = None  # name → key, or a file of "name: key" lines
    metrics_require_key: bool = False  # /metrics needs a key too (it is public by default)
    max_queue: int = 512  # requests that may wait per model beyond its busy slots
    max_requests_per_key: int = 0  # requests one key may have in flight at once; 0: no limit
    # Generated tokens per model: {"<model>" or "*": {"default": n, "cap": n}}. "default" is
    # used when a request sets no limit, "cap" lowers any larger request to it.
    token_limits: dict[str, dict[str, int]] = field(default_factory=dict)
    max_json_depth: int = 64  # deepest nesting of arrays and objects a JSON body may have
    # --- deployment: reload and graceful stop (issue 11) ---------------------------------
    # Seconds a stop (SIGTERM) waits for requests in flight before the engines are stopped.
    shutdown_timeout: float = 30.0

    # --- scaling out: several instances behind HAProxy (issue 21; cluster.py) ---------------
    # This instance's name in the ``X-Served-By`` header of every answer (none when unset;
    # "auto": <host name>:<port>, for replicas that share one configuration).
    instance_name: str | None = None
    # A port on which the master answers HAProxy's agent-check (agent.py): a weight from the
    # free slots and the queue, ``drain`` while draining or stopping. None: no agent.
    agent_port: int | None = None
    # While this file exists the instance drains: /health/ready answers 503 and the agent
    # ``drain`` (no new requests from the balancer; those in flight finish). Default:
    # <log_dir>/drain-<port>.
    drain_file: str | None = None
    # The balancer of `make cluster` / `python -m ollama_server.cluster` (cluster.py): how
    # far a model's instance may run above the cluster's average load before its requests
    # spill over to the next instance (HAProxy's hash-balance-factor, percent), and how long
    # a request may wait at the balancer for a free instance before a 503 with Retry-After.
    cluster_hash_balance_factor: int = 150
    cluster_queue_timeout: float = 30.0

    # --- derived paths -------------------------------------------------------------------

    @property
    def models_path(self) -> Path:
        """The Ollama store (or GGUF folder) ``models_dir`` names, as an absolute path.

        A store's ``blobs`` folder (as the original design's example config gives it) stands
        for the store that holds it.
        """
        path = _abs(self.models_dir)
        if path.name == "blobs" and not (path / "manifests").is_dir() and (
                (path.parent / "manifests").is_dir() or any(path.glob("sha256-*"))):
            return path.parent
        return path

    @property
    def manifests_path(self) -> Path:
        """The manifests folder of the Ollama store: ``manifests_dir`` may name it or any folder
        inside it (``manifests/registry.ollama.ai/library``); names resolve from its root."""
        if not self.manifests_dir:
            return self.models_path / "manifests"
        return manifests_root(_abs(self.manifests_dir))

    @property
    def drain_path(self) -> Path:
        """The file whose presence drains this instance (``drain_file``)."""
        if self.drain_file:
            return _abs(self.drain_file)
        return _abs(self.log_dir) / f"drain-{self.port}"

    def draining(self) -> bool:
        """True while the drain file exists (one stat; read per health check)."""
        return self.drain_path.exists()

    def update_from(self, new: "Config") -> None:
        """Take every value of ``new`` (already validated) in one step.

        Everything that holds this object (the app, the model manager, the handlers) sees the
        new values from its next read; one dict update runs without a thread switch in between,
        so no reader sees half of one configuration and half of the other.
        """
        self.__dict__.update(dict(new.__dict__))

    def validate(self) -> "Config":
        """Check every value; raise ConfigError naming the first bad key."""
        for key in ("default_context_size", "batch_size", "parallel", "max_loaded_models",
                    "port", "threads_http", "registry_concurrency"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        workers = str(self.workers).strip().lower()
        if workers != "auto" and not (workers.isdigit() and int(workers) >= 1):
            raise ConfigError(f"workers must be 'auto' (one per core) or a positive number, "
                              f"got {self.workers!r}")
        self.workers = workers
        if len(self.preload) > self.max_loaded_models:
            raise ConfigError(f"preload names {len(self.preload)} models but max_loaded_models "
                              f"is {self.max_loaded_models}: the last ones would evict the "
                              f"first; raise max_loaded_models or preload fewer")
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, got {self.port}")
        if (self.instance_name or "").strip().lower() == "auto":
            import socket

            self.instance_name = f"{socket.gethostname()}:{self.port}"
        if self.agent_port is not None and not 0 < self.agent_port <= 65535:
            raise ConfigError(f"agent_port must be a port number (1-65535), got "
                              f"{self.agent_port}")
        if self.agent_port is not None and self.agent_port == self.port:
            raise ConfigError(f"agent_port must differ from port ({self.port})")
        if not 100 < self.cluster_hash_balance_factor:
            raise ConfigError(f"cluster_hash_balance_factor must be above 100 (percent of "
                              f"the average load), got {self.cluster_hash_balance_factor}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (auto) or positive, got {self.threads}")
        for key in ("request_timeout", "startup_timeout", "max_body_mb", "registry_timeout",
                    "shutdown_timeout", "cluster_queue_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                              f"got {self.log_level!r}")
        self.log_level = "DEBUG" if self.debug else self.log_level.upper()
        if not self.registry or "/" in self.registry:
            raise ConfigError(f"registry must be a host[:port] such as 'registry.corp:5000' "
                              f"(no scheme: list plain-HTTP registries in registry_insecure), "
                              f"got {self.registry!r}")
        _check_split_settings(self.__dict__, self.allow_public_rpc, "")
        _check_prompt_cache(self.__dict__, "")
        checked: dict[str, dict[str, Any]] = {}
        for model, settings in self.model_settings.items():
            prefix = f"model_settings.{model}."
            if not isinstance(settings, dict):
                raise ConfigError(f"model_settings.{model} must be a mapping of "
                                  f"{', '.join(MODEL_SETTING_KEYS)}")
            values = {}
            for key, value in settings.items():
                if key not in MODEL_SETTING_KEYS:
                    raise ConfigError(f"unknown key {prefix}{key}; a model may override "
                                      f"{', '.join(MODEL_SETTING_KEYS)}")
                values[key] = _coerce(key, value, prefix)
            if values.get("parallel", 1) < 1:
                raise ConfigError(f"{prefix}parallel must be at least 1, got {values['parallel']}")
            _check_split_settings(values, self.allow_public_rpc, prefix)
            _check_prompt_cache(values, prefix)
            _check_kv_cache({"kv_cache_type": values.get("kv_cache_type", self.kv_cache_type),
                             "flash_attention": values.get("flash_attention",
                                                           self.flash_attention)}, prefix)
            checked[model] = values
        self.model_settings = checked
        for key in ("max_queue", "max_requests_per_key"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be 0 or positive, got {getattr(self, key)}")
        if self.max_json_depth < 8:
            raise ConfigError(f"max_json_depth must be at least 8, got {self.max_json_depth}")
        _check_token_limits(self.token_limits)
        self.api_key_entries()  # a missing or malformed key file is a configuration error
        return self

    @property
    def auth_enabled(self) -> bool:
        """True when keys are configured: every non-public route then needs one (an empty
        key file lets nobody in rather than everybody)."""
        return bool(self.api_key) or self.api_keys is not None

    def api_key_entries(self) -> dict[str, str]:
        """Every accepted API key by the name logs and metrics give its caller.

        ``api_key`` is named ``default``; ``api_keys`` adds named keys, from the mapping or
        from its file (read again whenever the file changes). ConfigError when malformed.
        """
        return {name: key for name, (key, _) in self._key_table().items()}

    def key_priority(self, name: str | None) -> int:
        """The priority class of the caller whose key is named ``name`` (0: none given, or
        no key): the admission queue serves higher classes first (models/admission.py)."""
        if not name:
            return 0
        entry = self._key_table().get(name)
        return entry[1] if entry else 0

    def _key_table(self) -> dict[str, tuple[str, int]]:
        entries: dict[str, tuple[str, int]] = {}
        if self.api_key:
            entries["default"] = (self.api_key, 0)
        keys = self.api_keys
        if isinstance(keys, str):
            keys = _read_key_file(_abs(keys))
        for name, spec in (keys or {}).items():
            key, priority = spec, 0
            if isinstance(spec, dict):  # {key: ..., priority: high}
                unknown = set(spec) - {"key", "priority"}
                if unknown:
                    raise ConfigError(f"api_keys.{name}: unknown field(s) "
                                      f"{', '.join(sorted(unknown))}; give key and priority")
                key = spec.get("key")
                priority = parse_priority(spec.get("priority", 0), f"api_keys.{name}")
            if not name or not key:
                raise ConfigError(f"api_keys: every entry needs a name and a key, got "
                                  f"{name!r}")
            entries[name] = (str(key), priority)
        if len({key for key, _ in entries.values()}) < len(entries):
            raise ConfigError("api_keys: two names share one key; give each caller its own")
        return entries

    def token_limit(self, model: str) -> tuple[int | None, int | None]:
        """(default, cap) on generated tokens for ``model`` from ``token_limits`` (a name
        without a tag means ``:latest``; ``*`` is every other model)."""
        def plain(name: str) -> str:
            name = name.strip().lower()
            return name.removesuffix(":latest")

        wanted = plain(model)
        limits = next((v for k, v in self.token_limits.items() if plain(k) == wanted),
                      self.token_limits.get("*") or {})
        return limits.get("default"), limits.get("cap")

    def engine_overrides(self, model: str) -> dict[str, Any]:
        """The model_settings entry for ``model`` (matched like model names: case and a
        missing ``:latest`` do not matter), or {}."""
        def norm(name: str) -> str:
            name = name.strip().lower()
            return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
        wanted = norm(model)
        return next((v for k, v in self.model_settings.items() if norm(k) == wanted), {})


PRIORITY_NAMES = {"low": -1, "normal": 0, "high": 1}


def parse_priority(value: Any, where: str) -> int:
    """A priority class: low, normal, high, or an integer (higher is served first)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: priority must be low, normal, high or an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text in PRIORITY_NAMES:
        return PRIORITY_NAMES[text]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{where}: priority must be low, normal, high or an integer, got "
                          f"{value!r}") from None


_KEY_FILES: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def _read_key_file(path: Path) -> dict[str, Any]:
    """``name: key`` lines, optionally ``name: key priority=high`` (``#`` comments and blank
    lines skipped), cached until the file's modification time or size changes."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"api_keys: cannot read the key file {path}: {exc}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _KEY_FILES.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise ConfigError(f"api_keys: line {number} of {path} is not 'name: key'")
        if name.strip() in entries:
            raise ConfigError(f"api_keys: the name {name.strip()!r} appears twice in {path}")
        key, _, rest = key.strip().partition(" ")
        rest = rest.strip()
        if rest and not rest.startswith("priority="):
            raise ConfigError(f"api_keys: line {number} of {path} is not 'name: key' or "
                              f"'name: key priority=high'")
        entries[name.strip()] = {"key": key, "priority": parse_priority(
            rest.removeprefix("priority=") or 0, f"api_keys: line {number} of {path}")}
    _KEY_FILES[path] = (stamp, entries)
    return entries


def _check_token_limits(limits: dict[str, dict[str, int]]) -> None:
    for model, spec in limits.items():
        if not isinstance(spec, dict) or not spec or set(spec) - {"default", "cap"}:
            raise ConfigError(f"token_limits: {model!r} needs 'default' and/or 'cap', got "
                              f"{spec!r}")
        for kind, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"token_limits: {model}.{kind} must be a positive integer, "
                                  f"got {value!r}")
        if spec.get("default") and spec.get("cap") and spec["default"] > spec["cap"]:
            raise ConfigError(f"token_limits: {model}.default is above its cap")


MODEL_SETTING_KEYS = ("rpc_servers", "tensor_split", "gpu_layers", "main_gpu", "fit_target_mib",
                      "parallel", "kv_cache_type", "flash_attention", "kv_pool_size", "cache_ram",
                      "slot_prompt_similarity")
# What llama-server's --cache-type-k/-v take; the quantised ones need flash attention for V.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
FLASH_ATTENTION = ("auto", "on", "off")
MAX_DEVICES = 16  # llama.cpp's LLAMA_MAX_DEVICES


def _check_split_settings(values: dict[str, Any], allow_public: bool, prefix: str) -> None:
    """Validate the splitting keys present in ``values``; ConfigError naming the key."""
    from .core.engine.rpc import EndpointError, check_endpoint, local_gpu_count

    split = values.get("tensor_split")
    if split is not None:
        if not split or any(x < 0 for x in split) or sum(split) <= 0:
            raise ConfigError(f"{prefix}tensor_split must be non-negative proportions such as "
                              f"'3,1', got {split}")
        if len(split) > MAX_DEVICES:
            raise ConfigError(f"{prefix}tensor_split has {len(split)} parts; llama.cpp "
                              f"handles at most {MAX_DEVICES} devices")
    for endpoint in values.get("rpc_servers") or []:
        try:
            check_endpoint(endpoint, allow_public)
        except EndpointError as exc:
            raise ConfigError(f"{prefix}rpc_servers: {exc}") from None
    gpus = local_gpu_count()
    if split and not values.get("rpc_servers") and gpus and len(split) > gpus:
        raise ConfigError(f"{prefix}tensor_split has {len(split)} parts, but this machine has "
                          f"{gpus} GPU(s) and no rpc_servers: give one proportion per device")
    for key in ("gpu_layers", "main_gpu", "fit_target_mib"):
        value = values.get(key)
        if value is not None and value < 0:
            raise ConfigError(f"{prefix}{key} must be 0 or more, got {value}")
    _check_kv_cache(values, prefix)


def _check_kv_cache(values: dict[str, Any], prefix: str) -> None:
    """kv_cache_type and flash_attention, normalised in ``values``; a quantised cache with
    flash attention off is refused (llama.cpp cannot quantise the V cache without it)."""
    kv = values.get("kv_cache_type")
    if kv is not None:
        kv = values["kv_cache_type"] = str(kv).strip().lower()
        if kv not in KV_CACHE_TYPES:
            raise ConfigError(f"{prefix}kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}"
                              f", got {kv!r}")
    fa = values.get("flash_attention")
    if fa is not None:
        fa = str(fa).strip().lower()
        fa = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off",
              "no": "off"}.get(fa, fa)
        if fa not in FLASH_ATTENTION:
            raise ConfigError(f"{prefix}flash_attention must be auto, on or off, got "
                              f"{values['flash_attention']!r}")
        values["flash_attention"] = fa
    if kv and kv not in ("f32", "f16", "bf16") and fa == "off":
        raise ConfigError(f"{prefix}kv_cache_type {kv} needs flash attention, which "
                          f"{prefix}flash_attention turns off: set it to auto or on, or use "
                          f"kv_cache_type f16")


def _check_prompt_cache(values: dict[str, Any], prefix: str) -> None:
    """kv_pool_size, cache_ram and slot_prompt_similarity present in ``values``: ranges."""
    pool = values.get("kv_pool_size")
    if pool is not None and pool < 0:
        raise ConfigError(f"{prefix}kv_pool_size must be 0 (auto) or a number "
                          f"of tokens, got {pool}")
    ram = values.get("cache_ram")
    if ram is not None and ram < -1:
        raise ConfigError(f"{prefix}cache_ram must be MiB, 0 (off) or -1 (no limit), got {ram}")
    sim = values.get("slot_prompt_similarity")
    if sim is not None and not 0.0 <= sim <= 1.0:
        raise ConfigError(f"{prefix}slot_prompt_similarity must be between 0 and 1, got {sim}")


def _abs(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p).resolve()


def manifests_root(path: Path) -> Path:
    """The root of the manifests tree (``<root>/<host>/<namespace>/<model>/<tag>``) that
    ``path`` is, or lies in: the nearest folder named ``manifests``, else found from how deep
    below ``path`` the first manifest file lies."""
    for folder in (path, *path.parents):
        if folder.name == "manifests":
            return folder
    if path.is_dir():
        for depth in range(1, 5):  # tag files lie 4 levels below the root
            if any(p.is_file() for p in path.glob("/".join(["*"] * depth))):
                up = 4 - depth
                return path.parents[up - 1] if up else path
    return path


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, prefix: str = "") -> Any:
    """Turn a YAML, env or CLI value into the type of ``key``; ConfigError when impossible."""
    kind = str(_FIELDS[key].type)
    try:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none",
                                                                                "null")):
            if "None" in kind:
                return None
            if kind.startswith("list"):  # an empty YAML key: none
                return []
            if kind.startswith("dict"):
                return {}
            raise ValueError("a value is required")
        if key == "tensor_split":
            if isinstance(value, str):
                value = [v for v in value.replace(";", ",").split(",") if v.strip()]
            if isinstance(value, (int, float)):
                value = [value]
            return [float(v) for v in value]
        if key == "gguf_dirs":
            if isinstance(value, str):
                return [v for v in value.split(os.pathsep) if v]
            return [str(v) for v in value]
        if key in ("api_keys", "token_limits", "model_settings"):
            return _coerce_mapping(key, value)
        if key in ("cors_origins", "rpc_servers", "registry_insecure", "allowed_hosts",
                   "preload"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if key == "registry_auth":  # a mapping, or "host=user:password,host2=user:password"
            if isinstance(value, str):
                value = dict(item.strip().split("=", 1) for item in value.split(",")
                             if item.strip())
            if not isinstance(value, dict) or not all(
                    isinstance(v, str) and ":" in v for v in value.values()):
                raise ValueError("expected a mapping of registry host to 'user:password'")
            return {str(k).strip(): v for k, v in value.items()}
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        return str(value)
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"invalid value for {prefix}{key}: {value!r} ({exc})") from None


def _coerce_mapping(key: str, value: Any) -> Any:
    """``api_keys`` / ``token_limits`` / ``model_settings`` from YAML, or from an env/CLI
    string holding YAML or JSON (a plain string for ``api_keys`` is the path of its key file)."""
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if key == "api_keys" and not isinstance(parsed, (dict, list)):
            return value.strip()
        value = parsed
    if key == "api_keys" and isinstance(value, list):  # ["name: key", ...]
        pairs = [str(item).partition(":") for item in value]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("expected 'name: key' entries")
        value = {name.strip(): key_.strip() for name, _, key_ in pairs}
    if not isinstance(value, dict):
        raise ValueError("expected a mapping")
    if key == "api_keys":  # name: key, or name: {key: ..., priority: ...}
        return {str(k): (v if isinstance(v, dict) else str(v)) for k, v in value.items()}
    return {str(k): v for k, v in value.items()}


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an environment file (systemd's EnvironmentFile format: ``#``
    comments, optional quotes, an optional ``export``); ConfigError when it cannot be read."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"environment file {path} ({ENV_PREFIX}ENV_FILE) cannot be read: "
                          f"{exc.strerror or exc}") from None
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"environment file {path}, line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def config_file(path: str | Path | None, environ: dict[str, str]) -> Path:
    """The YAML file a load reads: ``path``, else ``OLLAMA_SERVER_CONFIG``, else the default."""
    if path:
        return Path(path)
    if environ.get(ENV_PREFIX + "CONFIG"):
        return Path(environ[ENV_PREFIX + "CONFIG"])
    return DEFAULT_CONFIG_FILE


def effective_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a load reads: the process's (or ``environ``), with the variables of the
    file ``OLLAMA_SERVER_ENV_FILE`` names laid over it (read afresh on every load)."""
    env = dict(os.environ if environ is None else environ)
    env_file = env.get(ENV_PREFIX + "ENV_FILE")
    if env_file and Path(env_file).expanduser().exists():
        env.update(read_env_file(env_file))
    return env


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Build the configuration from the YAML file, the environment, and ``overrides``."""
    environ = effective_environ(environ)
    values: dict[str, Any] = {}
    file_path = config_file(path, environ)
    if path and not file_path.is_file():
        raise ConfigError(f"config file {file_path} does not exist")
    if file_path.is_file():
        try:
            loaded = yaml.safe_load(file_path.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"config file {file_path} is not valid YAML{at}: "
                              f"{getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file_path} must hold a mapping of keys")
        for key, value in loaded.items():
            if key not in _FIELDS:
                raise ConfigError(f"unknown key {key!r} in {file_path}")
            values[key] = _coerce(key, value)
    if environ.get("OLLAMA_MODELS") and ENV_PREFIX + "MODELS_DIR" not in environ:
        values["models_dir"] = environ["OLLAMA_MODELS"]
    if environ.get("OLLAMA_MAX_QUEUE") and ENV_PREFIX + "MAX_QUEUE" not in environ:
        values["max_queue"] = _coerce("max_queue", environ["OLLAMA_MAX_QUEUE"])
    for ours, theirs in (("kv_cache_type", "OLLAMA_KV_CACHE_TYPE"),
                         ("flash_attention", "OLLAMA_FLASH_ATTENTION")):
        if environ.get(theirs) and ENV_PREFIX + ours.upper() not in environ:
            values[ours] = environ[theirs]
    if environ.get("OLLAMA_ORIGINS"):  # Ollama's variable adds to the allowed origins
        values["cors_origins"] = [*values.get("cors_origins", DEFAULT_CORS_ORIGINS),
                                  *_coerce("cors_origins", environ["OLLAMA_ORIGINS"])]
    for key in _FIELDS:
        env_value = environ.get(ENV_PREFIX + key.upper())
        if env_value is not None:
            values[key] = _coerce(key, env_value)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value)
    return Config(**values).validate()


@dataclass
class ConfigSource:
    """How a configuration was built (file, flags), so that it can be built again on reload:
    the file and the environment are read afresh, the command-line flags still win."""

    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def load(self, environ: dict[str, str] | None = None) -> Config:
        """A new, validated Config from the same sources (ConfigError naming the key)."""
        return load_config(self.path, self.overrides, environ)

    def describe(self, environ: dict[str, str] | None = None) -> dict[str, Any]:
        """Where the values come from: the YAML file (None when absent) and the env file."""
        env = dict(os.environ if environ is None else environ)
        file_path = config_file(self.path, env)
        return {"file": str(file_path.resolve()) if file_path.is_file() else None,
                "env_file": env.get(ENV_PREFIX + "ENV_FILE") or None,
                "flags": sorted(self.overrides)}
