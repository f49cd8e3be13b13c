"""The engine: llama.cpp's ``llama-server``, one child process per loaded model.

- ``payload``: InternalRequest → the engine's JSON (pure).
- ``parse``: the engine's JSON → internal events and typed errors (pure).
- ``transport``: streams and calls to a running engine (``EngineClient``, ``EngineStream``).
- ``process``: the process and its state machine (``LLAMAExecutor``, ``EngineSettings``).
"""

from .process import EngineSettings, EngineState, LLAMAExecutor, free_port, kv_pool_cells
from .transport import EngineStream

__all__ = ["EngineSettings", "EngineState", "EngineStream", "LLAMAExecutor", "free_port",
           "kv_pool_cells"]
