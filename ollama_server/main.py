"""Entry point: ``python -m ollama_server.main --model-dir DIR --llama-cpp-dir DIR --port 11435``.

Serves the app under gunicorn with one worker process (the engines are its children, so all
state lives in one process) and a thread pool for concurrent streams. SIGTERM and SIGINT stop
the service and every llama-server with it.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import sys
from typing import Any

from .config import Config, ConfigError, load_config
from .utils.logging import setup_logging

log = logging.getLogger("ollama_server")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (each overrides the config file and the environment)."""
    p = argparse.ArgumentParser(prog="python -m ollama_server.main",
                                description="LLM inference service on llama.cpp: OpenAI, "
                                            "Ollama, Anthropic, vLLM and TGI APIs on one port.")
    p.add_argument("--config", help="YAML config file (default: config/service_config.yaml)")
    p.add_argument("--model-dir", dest="models_dir",
                   help="an Ollama models folder (holding manifests/ and blobs/)")
    p.add_argument("--gguf-dir", dest="gguf_dirs", action="append",
                   help="a folder of plain .gguf files (repeatable)")
    p.add_argument("--llama-cpp-dir", dest="llama_cpp_path",
                   help="a llama.cpp build folder (or the llama-server binary)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 11435)")
    p.add_argument("--debug", action="store_true", default=None, help="debug logging")
    p.add_argument("--default-tensor-split", dest="tensor_split",
                   help="split models across GPUs, e.g. '3,1'")
    p.add_argument("--gpu-layers", dest="gpu_layers", type=int,
                   help="layers to offload to the GPU (-ngl)")
    p.add_argument("--rpc", dest="rpc_servers",
                   help="llama.cpp RPC workers to spread models over, e.g. "
                        "'10.0.0.2:50052,10.0.0.3:50052' (private network only)")
    p.add_argument("--threads", type=int, help="CPU threads per engine (0: automatic)")
    p.add_argument("--parallel", type=int, help="parallel slots per model")
    p.add_argument("--context-size", dest="default_context_size", type=int,
                   help="cap on the context a model is loaded with")
    p.add_argument("--default-model", dest="default_model", help="the default model")
    return p


def config_from_args(argv: list[str] | None = None) -> Config:
    """Parse flags and build the configuration (ConfigError on a bad value)."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    if args.debug:
        overrides["log_level"] = "DEBUG"
    return load_config(args.config, overrides)


def create_service_app(config: Config) -> Any:
    """The app with its engines tied to this process's exit."""
    from .api.app import create_app

    app = create_app(config)
    manager = app.extensions["ollama_server"].manager
    atexit.register(manager.shutdown)
    return app


def serve(config: Config) -> None:
    """Run gunicorn in this process (one worker, many threads)."""
    from gunicorn.app.base import BaseApplication

    class Service(BaseApplication):
        def load_config(self) -> None:
            settings = {
                "bind": f"{config.host}:{config.port}",
                "workers": 1,
                "worker_class": "gthread",
                "threads": config.threads_http,
                "timeout": 0,  # streams may run for minutes; the engines have their own limit
                "graceful_timeout": 15,
                "keepalive": 5,
                "loglevel": "debug" if config.log_level == "DEBUG" else "warning",
                "accesslog": "-" if config.log_level == "DEBUG" else None,
                "worker_exit": _worker_exit,
                "proc_name": "ollama-server",
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Built inside the worker: engines are children of the process that serves.
            return create_service_app(config)

    log.info("serving on http://%s:%d", config.host, config.port)
    Service().run()


def _worker_exit(server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    try:
        if app is not None:
            app.extensions["ollama_server"].manager.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        log.exception("error while stopping the engines")


def main(argv: list[str] | None = None) -> int:
    """Configure, check the engine, and serve."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_dir)
    from .provision.engine import EngineNotFound, resolve_binary

    try:
        binary = resolve_binary(config.llama_cpp_path)
    except EngineNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.models_path.is_dir():
        print(f"error: the model folder {config.models_path} does not exist; set --model-dir "
              f"(an Ollama store such as ~/.ollama/models) or run `make models`",
              file=sys.stderr)
        return 2
    config.llama_cpp_path = str(binary)
    log.info("engine: %s; models: %s", binary, config.models_path)
    serve(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
