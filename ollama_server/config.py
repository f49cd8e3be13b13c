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
    parallel: int = 4  # parallel slots per model (continuous batching)
    max_loaded_models: int = 3
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
    threads_http: int = 64  # gunicorn threads: concurrent requests and streams
    api_key: str | None = None  # when set, /v1 and /api routes need it
    # Browser origins allowed to call the API (glob patterns); Ollama's defaults: local pages
    # and desktop-app schemes. "*" allows every site.
    cors_origins: list[str] = field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS))
    debug: bool = False

    # --- deployment: reload and graceful stop (issue 11) ---------------------------------
    # Seconds a stop (SIGTERM) waits for requests in flight before the engines are stopped.
    shutdown_timeout: float = 30.0

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
                    "port", "threads_http"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, got {self.port}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (auto) or positive, got {self.threads}")
        for key in ("request_timeout", "startup_timeout", "max_body_mb", "shutdown_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                              f"got {self.log_level!r}")
        self.log_level = "DEBUG" if self.debug else self.log_level.upper()
        if self.tensor_split is not None:
            if not self.tensor_split or any(x < 0 for x in self.tensor_split) or \
                    sum(self.tensor_split) <= 0:
                raise ConfigError(f"tensor_split must be non-negative proportions such as "
                                  f"'3,1', got {self.tensor_split}")
        return self


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


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML, env or CLI value into the type of ``key``; ConfigError when impossible."""
    kind = str(_FIELDS[key].type)
    try:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none",
                                                                                "null")):
            if "None" in kind:
                return None
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
        if key == "cors_origins":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
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
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {key}: {value!r} ({exc})") from None


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
