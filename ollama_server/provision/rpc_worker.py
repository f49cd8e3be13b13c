"""Run llama.cpp's RPC worker (``ggml-rpc-server``) from the project's own engine build.

On each extra host: ``make rpc-worker RPC_HOST=10.0.0.2 RPC_PORT=50052`` (or
``python -m ollama_server.provision.rpc_worker --host 10.0.0.2 --port 50052``), then name it
in the service's ``rpc_servers``. The worker's devices (its GPUs, or its CPU when it has none)
then take layers like local GPUs. Its local tensor cache (``-c``) is on, so a model's weights
cross the network once per host, not at every load.

A worker has no authentication and runs whatever it is sent: listen only on a trusted private
network. A public address is refused unless ``--allow-public`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core.engine.rpc import Endpoint, EndpointError, is_private_address
from .engine import EngineNotFound, resolve_binary, rpc_worker_binary


def main(argv: list[str] | None = None) -> int:
    """Check the address, find the worker binary, and exec it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: a private address of this host")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (CPU device)")
    parser.add_argument("--device", default=None, help="devices to serve, e.g. CUDA0,CUDA1")
    parser.add_argument("--no-cache", action="store_true", help="turn the tensor cache off")
    parser.add_argument("--allow-public", action="store_true",
                        help="listen on a public address (no authentication: trusted networks "
                             "only)")
    parser.add_argument("--llama-cpp-dir", default=None,
                        help="a llama.cpp build folder holding ggml-rpc-server")
    args = parser.parse_args(argv)
    try:
        label = str(Endpoint(args.host, args.port))
        wildcard = args.host in ("0.0.0.0", "::")
        if not args.allow_public and (wildcard or not is_private_address(args.host)):
            raise EndpointError(
                f"{label} is not a private address: an RPC worker has no authentication. "
                f"Listen on this host's private address (10.x, 172.16-31.x, 192.168.x, "
                f"fd00::/8) or pass --allow-public on a trusted network")
    except ValueError as exc:  # EndpointError, or an address that is not an IP
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = resolve_binary(args.llama_cpp_dir)
    except EngineNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worker = rpc_worker_binary(engine)
    if worker is None:
        print(f"error: no ggml-rpc-server beside {engine}; rebuild the engine with "
              f"`make engine-rebuild` (it builds the worker too)", file=sys.stderr)
        return 2
    cmd = [str(worker), "-H", args.host, "-p", str(args.port)]
    if not args.no_cache:
        cmd.append("-c")
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if args.device:
        cmd += ["-d", args.device]
    print(f"[rpc-worker] {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
