"""Configuration reload without a restart (SIGHUP, ``systemctl --user reload llm-inference``).

A reload reads the configuration file and the environment again, with the same precedence as at
startup (the command-line flags still win), and validates the whole new configuration before
anything changes. A bad file is refused with one log line naming the key, and the running
configuration stays. A good one is swapped in at once: settings read per request (API keys,
CORS, keep_alive, the default model, log level, model folders, queue limits, and keys added
later) take effect for the next request; the model manager restarts the engines whose
llama-server command line changed, each once it is idle, and leaves the others running.

Settings bound when the process starts (the address it listens on, its thread count, the stop
timeout) keep their running values until a restart, and the reload says so.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from flask import Flask

from .config import Config, ConfigError, ConfigSource
from .logs import setup_logging

log = logging.getLogger(__name__)

# Keys the running process cannot change: they apply after a restart.
RESTART_KEYS = ("host", "port", "threads_http", "workers", "shutdown_timeout")


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def changed_keys(old: Config, new: Config) -> list[str]:
    """The settings whose values differ between two configurations."""
    return [key for key, value in vars(new).items() if vars(old).get(key) != value]


class ConfigReloader:
    """Loads the configuration of one app again and swaps it into its live services."""

    def __init__(self, app: Flask, source: ConfigSource | None = None) -> None:
        self.app = app
        self.source = source
        self.loaded_at = time.time()
        self.reloads = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._lock = threading.Lock()

    @property
    def config(self) -> Config:
        """The live configuration (the object every part of the app holds)."""
        return self.app.extensions["ollama_server"].config

    def status(self) -> dict[str, Any]:
        """When and from where the running configuration was loaded, for /health."""
        where = self.source.describe() if self.source is not None else {
            "file": None, "env_file": None, "flags": []}
        return {**where, "loaded_at": _iso(self.loaded_at), "reloads": self.reloads,
                "last_error": self.last_error,
                "last_error_at": None if self.last_error_at is None
                else _iso(self.last_error_at)}

    def check(self, new: Config) -> None:
        """What validation of values alone cannot see: the folders and the engine binary must
        exist. ConfigError naming the key otherwise."""
        if not new.models_path.is_dir():
            raise ConfigError(f"models_dir: the folder {new.models_path} does not exist")
        if new.llama_cpp_path != self.config.llama_cpp_path:
            from .core.engine.binary import EngineNotFound, resolve_binary

            try:
                resolve_binary(new.llama_cpp_path)
            except EngineNotFound as exc:
                raise ConfigError(f"llama_cpp_path: {exc}") from None

    def reload(self) -> bool:
        """Load, validate and apply the configuration again; False (with one log line) when
        the new one is refused, and the running one stays."""
        if self.source is None:
            log.warning("configuration reload asked for, but this app was given its "
                        "configuration directly; nothing to read again")
            return False
        with self._lock:
            old = self.config
            try:
                new = self.source.load()
                self.check(new)
            except ConfigError as exc:
                self.last_error, self.last_error_at = str(exc), time.time()
                log.error("configuration reload refused, keeping the configuration loaded at "
                          "%s: %s", _iso(self.loaded_at), " ".join(str(exc).split()))
                return False
            for key in RESTART_KEYS:
                if getattr(new, key) != getattr(old, key):
                    log.warning("%s changed from %r to %r: that takes effect after a restart "
                                "(systemctl --user restart llm-inference)", key,
                                getattr(old, key), getattr(new, key))
                    setattr(new, key, getattr(old, key))
            changed = changed_keys(old, new)
            old.update_from(new)
            manager = self.app.extensions["ollama_server"].manager
            if manager.config is not old:  # a manager built with its own copy (tests)
                manager.config.update_from(new)
            self.apply(changed)
            self.reloads += 1
            self.loaded_at = time.time()
            self.last_error = self.last_error_at = None
            log.info("configuration reloaded from %s: %s", self.status()["file"] or "defaults",
                     ", ".join(changed) + " changed" if changed else "nothing changed")
            return True

    def apply(self, changed: list[str]) -> None:
        """Bring what was derived from the configuration at startup up to date."""
        config = self.config
        self.app.config["MAX_CONTENT_LENGTH"] = int(config.max_body_mb * 1024 * 1024)
        if "log_dir" in changed:
            setup_logging(config.log_level, config.log_dir)  # new handlers: a new file
        elif "log_level" in changed:
            logging.getLogger().setLevel(config.log_level)
            logging.getLogger("werkzeug").setLevel(max(logging.WARNING,
                                                       logging.getLogger().level))
        self.app.extensions["ollama_server"].manager.apply_config()

    def install_signal_handler(self, signum: int = signal.SIGHUP) -> None:
        """Reload on ``signum`` (main thread only). The reload runs in its own thread: the
        handler interrupts the server's loop, which must go back to accepting at once."""

        def handler(_signum: int, _frame: Any) -> None:
            threading.Thread(target=self.reload, daemon=True, name="config-reload").start()

        signal.signal(signum, handler)
