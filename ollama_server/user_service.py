"""Helpers of the systemd user unit's scripts (``install-user-service.sh``,
``service-status-user.sh``), which read the configuration exactly as the service does.

- ``python -m ollama_server.user_service settings --config FILE``: shell assignments (port,
  models folder, engine binary, model count, stop timeout) for the install script.
- ``python -m ollama_server.user_service status --config FILE``: the unit's state, process,
  uptime, port, health, loaded models with their devices, and recent errors from the journal,
  in a few lines.
- ``python -m ollama_server.user_service update [--pid PID]``: zero-downtime update to the
  checkout's current code (SIGUSR2 to the running master, see main.py), waiting until the old
  master has handed over and finished its requests.
- ``python -m ollama_server.user_service health --url URL``: exit 0 when ``URL/health``
  answers 200 (the container's health check).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from .config import Config, ConfigError, load_config

UNIT = "llm-inference"
# TimeoutStopSec beyond shutdown_timeout: time to stop the engines (main.ENGINE_STOP_MARGIN)
# and a little more for the processes to exit.
STOP_MARGIN_S = 30


def _config(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None


def settings(config: Config) -> dict[str, Any]:
    """What the install script needs to know about a configuration."""
    from .core.engine.binary import EngineNotFound, resolve_binary
    from .models.manager import ModelManager

    try:
        engine = str(resolve_binary(config.llama_cpp_path))
    except EngineNotFound:
        engine = ""
    manager = ModelManager(config, engine_binary=None)
    try:
        count = len(manager.list_models()) if config.models_path.is_dir() else 0
    finally:
        manager.shutdown()
    return {"host": config.host, "port": config.port, "models": str(config.models_path),
            "models_count": count, "engine": engine,
            "stop_timeout": int(config.shutdown_timeout) + STOP_MARGIN_S}


def _systemctl_show(unit: str) -> dict[str, str]:
    props = "ActiveState,SubState,MainPID,NRestarts,UnitFileState,Result"
    try:
        out = subprocess.run(["systemctl", "--user", "show", unit, "-p", props],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()}
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def process_uptime(pid: int) -> float | None:
    """Seconds since process ``pid`` started (from /proc), None when it is not running."""
    fields = _stat(pid)
    try:
        with open("/proc/uptime") as fh:
            boot_uptime = float(fh.read().split()[0])
        return boot_uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def human_duration(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s`` or ``12s``."""
    s = int(seconds)
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s % 60}s" if minutes else f"{s}s"


def fetch_health(host: str, port: int) -> tuple[int | None, dict[str, Any] | str]:
    """(status, body) of ``/health``, or (None, the reason it could not be reached)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, str(exc)
    except (OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc))


def model_line(model: dict[str, Any]) -> str:
    """One loaded model: name, engine state and pid, context, and where it runs."""
    devices = model.get("devices")
    if isinstance(devices, list) and devices:
        where = ", ".join(str(d.get("name", d)) if isinstance(d, dict) else str(d)
                          for d in devices)
    elif model.get("gpu_memory_mib"):
        where = f"GPU ({model['gpu_memory_mib']:.0f} MiB)"
    else:
        where = "CPU"
    return (f"  {model.get('name')}: {model.get('state')}, pid {model.get('pid')}, context "
            f"{model.get('context_length')}, on {where}, {model.get('in_flight', 0)} in flight")


def recent_errors(unit: str, n: int = 5) -> list[str]:
    """The last ``n`` error lines of the unit in the journal over the last hour."""
    try:
        out = subprocess.run(["journalctl", "--user", "-u", unit, "-p", "err", "--since",
                              "-1h", "-n", str(n), "--no-pager", "-o", "short-iso", "-q"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def status_lines(config: Config, unit: str = UNIT) -> list[str]:
    """The status report, line by line."""
    lines = []
    show = _systemctl_show(unit)
    if "error" in show:
        lines.append(f"{unit}: systemd user manager not reachable ({show['error']})")
    else:
        state = f"{show.get('ActiveState')} ({show.get('SubState')})"
        pid = int(show.get("MainPID") or 0)
        up = process_uptime(pid) if pid else None
        extra = f", pid {pid}, up {human_duration(up)}" if pid and up is not None else ""
        lines.append(f"{unit}: {state}{extra}, {show.get('UnitFileState') or 'not installed'}"
                     f", restarts {show.get('NRestarts', '0')}")
    code, health = fetch_health(config.host, config.port)
    url = f"http://{config.host}:{config.port}"
    if code is None:
        lines.append(f"port {config.port}: not answering ({health})")
    elif not isinstance(health, dict):
        lines.append(f"{url}/health: HTTP {code}: {health}")
    else:
        lines.append(f"{url}: {health.get('status')} (HTTP {code}), default model "
                     f"{health.get('default_model')}, {health.get('models_available', '?')} "
                     f"models available, {health.get('requests_in_flight', 0)} requests in "
                     f"flight")
        cfg = health.get("config") or {}
        note = f"; last reload refused: {cfg['last_error']}" if cfg.get("last_error") else ""
        lines.append(f"config: {cfg.get('file') or 'defaults'}, loaded {cfg.get('loaded_at')}"
                     f" ({cfg.get('reloads', 0)} reloads){note}")
        loaded = health.get("models_loaded") or []
        lines.append(f"models loaded: {len(loaded)}" + ("" if loaded else " (none yet)"))
        lines += [model_line(m) for m in loaded]
        for failed in health.get("failed_models") or []:
            lines.append(f"  {failed.get('name')}: FAILED: {failed.get('error')}")
    errors = recent_errors(unit)
    lines.append(f"errors in the journal, last hour: {len(errors) or 'none'}"
                 + (" (latest last)" if errors else ""))
    lines += [f"  {line}" for line in errors]
    return lines


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); [] when gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def parent_of(pid: int) -> int | None:
    """The parent process id of ``pid``, None when it is gone."""
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid``."""
    return {int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and parent_of(int(entry)) == pid}


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def update(old: int, timeout: float, say: Any = print) -> int:
    """SIGUSR2 to the master ``old``; wait until a new master has taken over and ``old`` has
    drained and exited. 0 on success; 1 when the new code did not take over (the old master
    then keeps serving as before)."""
    before = children(old)
    os.kill(old, signal.SIGUSR2)
    say(f"update: asked master {old} to start the current code beside it (SIGUSR2)")
    deadline = time.monotonic() + timeout
    new: int | None = None
    while time.monotonic() < deadline:
        if not alive(old):
            say(f"update: done; master {new or '?'} serves the current code, {old} has exited")
            return 0
        if new is None:
            started = children(old) - before
            new = min(started) if started else None
            if new is not None:
                say(f"update: new master {new} is starting")
        elif not alive(new):
            say(f"update: the new master {new} exited before it could serve; master {old} "
                f"keeps serving the old code (see the log: journalctl --user -u {UNIT})")
            return 1
        time.sleep(0.2)
    say(f"update: master {old} had not handed over after {timeout:.0f}s; see the log "
        f"(journalctl --user -u {UNIT})")
    return 1


def main_pid(unit: str) -> int:
    """The unit's main process id (0 when it is not running)."""
    show = _systemctl_show(unit)
    if "error" in show:
        raise SystemExit(f"cannot ask systemd for {unit}'s process: {show['error']}; "
                         f"pass --pid")
    return int(show.get("MainPID") or 0)


def main(argv: list[str] | None = None) -> int:
    """CLI for the unit's shell scripts."""
    parser = argparse.ArgumentParser(prog="python -m ollama_server.user_service")
    parser.add_argument("command", choices=["settings", "status", "update", "health"])
    parser.add_argument("--config", default=None, help="the YAML config file the unit uses")
    parser.add_argument("--unit", default=UNIT)
    parser.add_argument("--pid", type=int, default=None,
                        help="update: the master's pid (default: the unit's main process)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="update: seconds to wait (default: shutdown_timeout + 60)")
    parser.add_argument("--url", default=None, help="health: the service's base URL")
    args = parser.parse_args(argv)
    if args.command == "health" and args.url:
        host, _, port = args.url.split("://", 1)[-1].rstrip("/").rpartition(":")
        code, body = fetch_health(host, int(port))
        if code != 200:
            print(f"unhealthy: {code or ''} {body}", file=sys.stderr)
        return 0 if code == 200 else 1
    config = _config(args.config)
    if args.command == "health":
        return main(["health", "--url", f"http://{config.host}:{config.port}"])
    if args.command == "update":
        pid = args.pid or main_pid(args.unit)
        if pid <= 0:
            raise SystemExit(f"{args.unit} is not running; start it first")
        return update(pid, args.timeout or config.shutdown_timeout + 60)
    if args.command == "settings":
        for key, value in settings(config).items():
            print(f"{key}={shlex.quote(str(value))}")
        return 0
    print("\n".join(status_lines(config, args.unit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
