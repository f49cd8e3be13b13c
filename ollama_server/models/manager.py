"""ModelManager: the catalogue of models and the pool of their engines, as the service uses them.

``catalogue.ModelCatalogue`` finds models and resolves names; ``pool.EnginePool`` runs their
engines. The manager puts the two under one name for the blueprints and the service, and
applies a configuration reload to both, and preloads the models the configuration names
(``preload``) at start and after a reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from .catalogue import ModelCatalogue
from .pool import EnginePool, ExecutorFactory, LoadedModel, pick_evictions, same_engine
from .store import OllamaStore

log = logging.getLogger(__name__)

__all__ = ["ExecutorFactory", "LoadedModel", "ModelManager", "pick_evictions", "same_engine"]


class ModelManager:
    """Finds models (``catalogue``) and hands out ready engines for them (``pool``)."""

    def __init__(self, config: Config, executor_factory: ExecutorFactory | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 engine_binary: Path | None = None) -> None:
        self.config = config
        self.catalogue = ModelCatalogue(config)
        self.pool = EnginePool(config, executor_factory, clock, engine_binary)
        cat, pool = self.catalogue, self.pool
        # Models: what there is and what a name means.
        self.list_models, self.resolve = cat.list_models, cat.resolve
        self.default_model_name, self.add_alias = cat.default_model_name, cat.add_alias
        # Engines: use, release, and what runs.
        self.acquire, self.release, self.unload = pool.acquire, pool.release, pool.unload
        self.loaded, self.loaded_entry = pool.loaded, pool.loaded_entry
        self.failed_models, self.workers_in_use = pool.failed_models, pool.workers_in_use
        self.engine_settings, self.parallel_for = pool.engine_settings, pool.parallel_for
        self.rpc_workers, self.context_for = pool.rpc_workers, pool.context_for
        self.queue, self.shutdown = pool.queue, pool.shutdown
        self._preloading: list[str] = []
        self._preload_lock = threading.Lock()

    @property
    def store(self) -> OllamaStore:
        """The Ollama store the catalogue reads (it follows a reload)."""
        return self.catalogue.store

    def apply_config(self) -> None:
        """Bring the catalogue and the engines in line with the configuration just swapped
        into ``self.config`` (a reload)."""
        self.catalogue.apply_config()
        self.pool.apply_config()
        self.preload()

    # --- preload --------------------------------------------------------------------------

    def preload(self) -> None:
        """Load the models of ``preload`` in the background, one after the other; until each
        is loaded (or has failed), ``preloading()`` names it and /health answers 503. A
        preloaded model stays loaded (keep_alive forever) until a request sets another
        keep_alive, it is unloaded, or max_loaded_models evicts it."""
        with self._preload_lock:  # names already on their way are not loaded twice
            names = [n for n in self.config.preload if n not in self._preloading]
            self._preloading += names
        if not names:
            return
        threading.Thread(target=self._preload, args=(names,), daemon=True,
                         name="preload").start()

    def preloading(self) -> list[str]:
        """The models a preload has yet to load."""
        with self._preload_lock:
            return list(self._preloading)

    def _preload(self, names: list[str]) -> None:
        for i, name in enumerate(names, 1):
            step = f"preload {i}/{len(names)}"
            try:
                info = self.resolve(name)
                if self.pool.loaded_entry(info.name) is not None:
                    log.info("%s: %s is loaded already", step, info.name)
                    continue
                log.info("%s: loading %s", step, info.name)
                _, load_s = self.pool.acquire(info, slot=False)
                self.pool.release(info.name, -1, slot=False)
                log.info("%s: %s is ready (%.1f s)", step, info.name, load_s)
            except Exception as exc:  # noqa: BLE001 - the log says why; the service serves on
                log.error("%s: %s could not be loaded: %s", step, name, exc)
            finally:
                with self._preload_lock:
                    self._preloading.remove(name)
