"""Entry point: ``python -m ollama_server.main --model-dir DIR --llama-cpp-dir DIR --port 11435``
(``python ollama_server/main.py …`` works too).

Serves the app under gunicorn: ``workers`` processes (default: one per core), each with a
thread pool for concurrent streams. With one worker the engines are its children and all state
lives in it; with more, the master first starts the engine pool process (shared_pool.py),
which owns the engines, admits requests and keeps the one view of them. Signals to the process
started (gunicorn's master):

- ``SIGHUP``: reload the configuration without a restart (in the workers and the pool; see
  reload.py).
- ``SIGUSR2``: zero-downtime update. A new master runs the checkout's current code beside the
  old one, on the same listening socket; once its worker has loaded the app, the worker tells
  systemd the new master is the unit's main process and stops the old master, which drains.
  New code that fails to start leaves the old service running as it was.
- ``SIGTERM`` / ``SIGINT``: graceful stop. No new connections; requests in flight get up to
  ``shutdown_timeout`` seconds; then every llama-server is stopped (the pool, if any, goes
  last).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (`python ollama_server/main.py`, the original design's command, which is
    # also what gunicorn executes again on SIGUSR2): run the package's module instead, so that
    # its relative imports work. The script's own folder leaves sys.path: its modules must not
    # shadow top-level ones.
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    runpy.run_module("ollama_server.main", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

import argparse
import atexit
import logging
import math
import os
import signal
from typing import Any

from .config import Config, ConfigError, ConfigSource
from .logs import setup_logging

log = logging.getLogger("ollama_server")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command-line flags (each overrides the config file and the environment)."""
    p = argparse.ArgumentParser(prog="python -m ollama_server.main", add_help=add_help,
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


def source_from_args(argv: list[str] | None = None) -> ConfigSource:
    """Parse flags into where the configuration comes from (file and flag overrides)."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    if args.debug:
        overrides["log_level"] = "DEBUG"
    return ConfigSource(args.config, overrides)


def config_from_args(argv: list[str] | None = None) -> Config:
    """Parse flags and build the configuration (ConfigError on a bad value)."""
    return source_from_args(argv).load()


def create_service_app(config: Config, source: ConfigSource | None = None) -> Any:
    """The app of one worker: in front of the engine pool process when the master started one
    (several workers), else with its engines as its own children."""
    from .api.app import create_app
    from .shared_pool import ADDRESS_ENV, PoolClient, RemoteManager, RemoteMetrics, SharedTracker

    address = os.environ.get(ADDRESS_ENV)
    if address:
        client = PoolClient(address)
        app = create_app(config, manager=RemoteManager(config, client),
                         tracker=SharedTracker(client), metrics=RemoteMetrics(client),
                         source=source)
        client.register()
    else:
        app = create_app(config, source=source)
    manager = app.extensions["ollama_server"].manager
    atexit.register(manager.shutdown)
    return app


# Seconds the master gives the worker beyond shutdown_timeout to stop its engines before it
# kills the worker (a killed worker could not stop them).
ENGINE_STOP_MARGIN = 20


def serve(config: Config, source: ConfigSource | None = None) -> None:
    """Run gunicorn in this process: ``workers`` processes of many threads each; with more
    than one, the engines belong to a pool process that this master starts first."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.gthread import ThreadWorker

    from .shared_pool import ADDRESS_ENV, PID_ENV, PoolProcess, resolve_workers

    workers = resolve_workers(config.workers)
    for key in (ADDRESS_ENV, PID_ENV):  # an updating master's: this one starts its own pool
        os.environ.pop(key, None)
    from .api.app import create_app

    pool = PoolProcess(create_app, config, source) if workers > 1 else None
    agent = None
    if config.agent_port is not None:  # HAProxy's agent-check, answered by this master
        from .agent import LoadAgent, local_url

        agent = LoadAgent(config.host, config.agent_port,
                          local_url(config.host, config.port, "/health/ready"))

    class DrainingWorker(ThreadWorker):
        def set_accept_enabled(self, enabled: bool) -> None:
            super().set_accept_enabled(enabled)
            if not self.alive and self.sockets:
                # Stopping: let go of the listening socket now rather than after the drain,
                # so that new connections are refused at once (or, during an update, go to
                # the new master, which holds the same socket) instead of waiting in its
                # queue for a worker that will never accept them.
                for listener in self.sockets:
                    listener.close()
                self.sockets = []

    class ServiceArbiter(Arbiter):
        def handle_hup(self) -> None:
            # gunicorn's own SIGHUP starts new workers, and every engine with them; ours
            # reloads the configuration inside the running workers and the engine pool.
            self.log.info("SIGHUP: the workers reload the configuration")
            self.kill_workers(signal.SIGHUP)
            if pool is not None:
                pool.signal(signal.SIGHUP)

        def handle_term(self) -> None:
            self._agent_stops()
            super().handle_term()

        def handle_int(self) -> None:
            self._agent_stops()
            super().handle_int()

        def handle_quit(self) -> None:
            self._agent_stops()
            super().handle_quit()

        def _agent_stops(self) -> None:
            if agent is None:
                return
            if self.reexec_pid:  # stopped by its successor (SIGUSR2): the new master answers
                agent.close()
            else:  # the balancer sends no new requests while this one drains
                agent.stopping()

        def manage_workers(self) -> None:
            # Run on every turn of the master's loop (at least once a second). Not in
            # reap_workers: its waitpid(-1) may reap the pool before a check there sees it,
            # and nothing would look again; exited() also sees a pool reaped that way.
            if pool is not None and pool.exited() is not None:
                self.log.error("the engine pool process exited; starting it again (its "
                               "engines were stopped: requests on them failed)")
                try:
                    pool.start()
                except RuntimeError as exc:
                    self.log.error("%s", exc)
            super().manage_workers()

    class Service(BaseApplication):
        def load_config(self) -> None:
            settings = {
                "bind": f"{config.host}:{config.port}",
                "workers": workers,
                "worker_class": DrainingWorker,
                "threads": config.threads_http,
                "timeout": 0,  # streams may run for minutes; the engines have their own limit
                # The worker drains for shutdown_timeout (set in _post_worker_init).
                "graceful_timeout": math.ceil(config.shutdown_timeout + ENGINE_STOP_MARGIN),
                "keepalive": 5,
                "loglevel": "debug" if config.log_level == "DEBUG" else "warning",
                "accesslog": "-" if config.log_level == "DEBUG" else None,
                "post_worker_init": _post_worker_init,
                "worker_exit": _worker_exit,
                "on_exit": lambda _server: pool.stop() if pool is not None else None,
                "proc_name": "llm-inference",
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Built inside the worker: engines are children of the process that serves.
            return create_service_app(config, source)

        def run(self) -> None:
            try:
                if pool is not None:
                    pool.start()
                if agent is not None:
                    try:
                        agent.start()
                    except OSError as exc:
                        raise RuntimeError(str(exc)) from None
                ServiceArbiter(self).run()
            except RuntimeError as exc:
                print(f"\nError: {exc}\n", file=sys.stderr)
                raise SystemExit(1) from None

    log.info("serving on http://%s:%d (pid %d, %d worker%s)", config.host, config.port,
             os.getpid(), workers, "s" if workers > 1 else "")
    Service().run()


def _post_worker_init(worker: Any) -> None:
    """In the worker, once the app is loaded: drain for shutdown_timeout on SIGTERM, reload on
    SIGHUP, and finish a zero-downtime update if this worker belongs to the new master."""
    app = worker.wsgi
    config = app.extensions["ollama_server"].config
    worker.cfg.set("graceful_timeout", math.ceil(config.shutdown_timeout))
    app.extensions["ollama_server_reloader"].install_signal_handler(signal.SIGHUP)
    finish_update(os.environ.get("GUNICORN_PID"), worker.log)


def finish_update(old_master: str | None, logger: Any) -> None:
    """The last step of a SIGUSR2 update, run by the new master's worker once it can serve:
    make the new master systemd's main process (with ``NotifyAccess=all``) and stop the old
    master gracefully (it stops taking connections and drains its requests).

    ``old_master`` is gunicorn's ``GUNICORN_PID`` (set only in a master started by SIGUSR2);
    nothing happens unless it is the parent of this worker's master.
    """
    if not old_master or not old_master.isdigit():
        return
    from gunicorn import systemd

    from .user_service import parent_of

    master, old = os.getppid(), int(old_master)
    if parent_of(master) != old:
        return

    systemd.sd_notify(f"MAINPID={master}", logger)
    log.info("update: the new master %d serves; stopping the old master %d gracefully", master,
             old)
    try:
        os.kill(old, signal.SIGTERM)
    except ProcessLookupError:
        pass


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
        source = source_from_args(argv)
        config = source.load()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_dir)
    from .core.engine.binary import EngineNotFound, resolve_binary

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
    log.info("engine: %s; models: %s", binary, config.models_path)
    serve(config, source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
