"""ModelManager: the catalogue of models and the pool of their engines, as the service uses them.

``catalogue.ModelCatalogue`` finds models and resolves names; ``pool.EnginePool`` runs their
engines. The manager puts the two under one name for the blueprints and the service, and
applies a configuration reload to both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from .catalogue import ModelCatalogue
from .pool import EnginePool, ExecutorFactory, LoadedModel, pick_evictions, same_engine
from .store import OllamaStore

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

    @property
    def store(self) -> OllamaStore:
        """The Ollama store the catalogue reads (it follows a reload)."""
        return self.catalogue.store

    def apply_config(self) -> None:
        """Bring the catalogue and the engines in line with the configuration just swapped
        into ``self.config`` (a reload)."""
        self.catalogue.apply_config()
        self.pool.apply_config()
