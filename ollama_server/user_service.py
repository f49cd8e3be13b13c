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

Several instances behind HAProxy (``install-user-service.sh --instances N``, README "Scaling
out"), the units ``llm-inference@1..N`` and ``llm-inference-balancer``:

- ``instances --instances N --dir DIR``: renders the balancer's configuration with
  ``python -m ollama_server.cluster render`` (checked with ``haproxy -c``) into
  ``DIR/balancer.cfg`` and each instance's environment file ``DIR/instance-<i>.env`` from the
  servers it names, so that the two agree; prints shell assignments for the install script.
- ``status --instances N``: the balancer and one line per instance.
- ``update --all --instances N``: the rolling update of ``python -m ollama_server.cluster
  update`` (one instance at a time: drain, SIGUSR2, back in the balancer).

The cluster module is run, not imported: it imports this module, and its command line imports
main, which this module may not (the layers of pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import ENV_PREFIX, Config, ConfigError, load_config, read_env_file

UNIT = "llm-inference"
BALANCER = f"{UNIT}-balancer"
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


def recent_errors(unit: str | list[str], n: int = 5) -> list[str]:
    """The last ``n`` error lines of the unit (or units) in the journal over the last hour."""
    units = [unit] if isinstance(unit, str) else unit
    selectors = [word for name in units for word in ("-u", name)]
    try:
        out = subprocess.run(["journalctl", "--user", *selectors, "-p", "err", "--since",
                              "-1h", "-n", str(n), "--no-pager", "-o", "short-iso", "-q"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def unit_line(unit: str) -> str:
    """The unit's state, main process, uptime, enablement and restarts, in one line."""
    show = _systemctl_show(unit)
    if "error" in show:
        return f"{unit}: systemd user manager not reachable ({show['error']})"
    state = f"{show.get('ActiveState')} ({show.get('SubState')})"
    pid = int(show.get("MainPID") or 0)
    up = process_uptime(pid) if pid else None
    extra = f", pid {pid}, up {human_duration(up)}" if pid and up is not None else ""
    return (f"{unit}: {state}{extra}, {show.get('UnitFileState') or 'not installed'}"
            f", restarts {show.get('NRestarts', '0')}")


def status_lines(config: Config, unit: str = UNIT) -> list[str]:
    """The status report, line by line."""
    lines = [unit_line(unit)]
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


# --- several instances behind HAProxy (install-user-service.sh --instances N) ----------------

# Set per instance in its own file; the shared environment file is laid over the process
# environment (config.effective_environ), so there they would override every instance's own.
INSTANCE_KEYS = ("INSTANCE_NAME", "AGENT_PORT", "DRAIN_FILE", "LOG_DIR")
BALANCER_CFG = "balancer.cfg"
_SERVER = re.compile(r"^\s*server (\S+) (\S+):(\d+) check .*\bagent-port (\d+)\b")
_SOCKET = re.compile(r"^\s*stats socket (\S+)")


def instance_file(conf_dir: Path, index: int) -> Path:
    """The environment file of instance ``index`` (the unit ``llm-inference@<index>``)."""
    return conf_dir / f"instance-{index}.env"


def find_haproxy() -> str | None:
    """The haproxy binary (PATH, else Debian's /usr/sbin/haproxy), None when missing."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def render_balancer(config_path: str | None, count: int) -> str:
    """HAProxy's configuration for ``count`` instances, as ``python -m ollama_server.cluster
    render`` gives it (this process's environment, so the same settings as the service)."""
    cmd = [sys.executable, "-m", "ollama_server.cluster", "render", "--instances", str(count)]
    if config_path:
        cmd += ["--config", config_path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"rendering the balancer's configuration failed: "
                         f"{(out.stderr or out.stdout).strip()}")
    return out.stdout


def balancer_plan(text: str) -> tuple[Path, list[tuple[str, str, int, int]]]:
    """From a rendered configuration: the cluster's folder (where its stats socket lies) and
    each instance behind it as (name, host, port, agent port), in order."""
    run_dir = None
    servers: dict[str, tuple[str, str, int, int]] = {}
    for line in text.splitlines():
        if (match := _SOCKET.match(line)) is not None:
            run_dir = Path(match.group(1)).parent
        elif (match := _SERVER.match(line)) is not None:
            name, host, port, agent = match.groups()
            servers.setdefault(name, (name, host, int(port), int(agent)))
    if run_dir is None or not servers:
        raise SystemExit("the rendered balancer configuration names no stats socket or no "
                         "server with an agent-check; is ollama_server.cluster current?")
    return run_dir, list(servers.values())


def instance_settings(config: Config, run_dir: Path, name: str, host: str, port: int,
                      agent_port: int) -> dict[str, str]:
    """The environment of one installed instance: as cluster.instance_env gives a cluster's
    (logs in <run_dir>/<name>/, drain file <run_dir>/<name>.drain, which is where
    ``cluster update`` drains it), and its address."""
    env = {"HOST": host, "PORT": str(port), "AGENT_PORT": str(agent_port),
           "INSTANCE_NAME": name, "DRAIN_FILE": str(run_dir / f"{name}.drain"),
           "LOG_DIR": str(run_dir / name)}
    if not config.allowed_hosts and config.host not in ("127.0.0.1", "localhost", "::1"):
        env["ALLOWED_HOSTS"] = "*"  # the balancer's clients' Host names
    return {ENV_PREFIX + key: value for key, value in env.items()}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_instances(config: Config, config_path: str | None, count: int,
                    conf_dir: Path) -> dict[str, Any]:
    """Render and check the balancer's configuration, write it and every instance's
    environment file into ``conf_dir`` (removing those of instances beyond ``count``);
    what the install script needs to know, as a dict."""
    env_file = os.environ.get(ENV_PREFIX + "ENV_FILE")
    shared = read_env_file(env_file) if env_file and Path(env_file).exists() else {}
    clash = [ENV_PREFIX + key for key in INSTANCE_KEYS if ENV_PREFIX + key in shared]
    if clash:
        raise SystemExit(f"{env_file} sets {', '.join(clash)}, which each instance sets for "
                         f"itself: remove it there (log_dir may go in the config file)")
    haproxy = find_haproxy()
    if haproxy is None:
        raise SystemExit("haproxy is not installed: run `make haproxy` (Debian's package) or "
                         "`sudo apt-get install haproxy`, then install again")
    text = render_balancer(config_path, count)
    run_dir, servers = balancer_plan(text)
    if len(servers) != count:
        raise SystemExit(f"the balancer's configuration names {len(servers)} instances, "
                         f"not {count}")
    conf_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, new = conf_dir / BALANCER_CFG, conf_dir / f"{BALANCER_CFG}.new"
    new.write_text(text)
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(new)], capture_output=True,
                           text=True, timeout=60)
    if check.returncode != 0:  # the file stays, to be read; the installed one is untouched
        raise SystemExit(f"HAProxy refused the rendered configuration {new}:\n"
                         f"{check.stderr or check.stdout}")
    new.replace(cfg)
    for index, (name, host, port, agent_port) in enumerate(servers, 1):
        values = instance_settings(config, run_dir, name, host, port, agent_port)
        _write(instance_file(conf_dir, index),
               f"# Instance {index} of the {UNIT} service (the unit {UNIT}@{index}), behind "
               f"{BALANCER}.\n# Written by ./install-user-service.sh --instances {count} "
               f"from `python -m ollama_server.cluster render`;\n# rewritten on every install"
               f": put shared settings in {env_file or 'the shared environment file'}.\n"
               + "".join(f"{key}={value}\n" for key, value in values.items()))
    for stale in conf_dir.glob("instance-*.env"):
        index = stale.name[len("instance-"):-len(".env")]
        if not index.isdigit() or int(index) > count:
            stale.unlink()
    return {"haproxy": haproxy, "balancer_cfg": str(cfg), "run_dir": str(run_dir),
            "instance_ports": " ".join(str(port) for _, _, port, _ in servers),
            "agent_ports": " ".join(str(agent) for _, _, _, agent in servers)}


def installed_instances(conf_dir: Path, count: int) -> list[dict[str, str]]:
    """The environment files of instances 1..``count`` ({} for one that is missing)."""
    out = []
    for index in range(1, count + 1):
        path = instance_file(conf_dir, index)
        out.append(read_env_file(path) if path.exists() else {})
    return out


def instance_line(unit: str, settings: dict[str, str]) -> str:
    """One instance: its unit's state, and what its /health says."""
    line = unit_line(unit)
    port = settings.get(ENV_PREFIX + "PORT")
    if not port:
        return f"{line}; no environment file (install again)"
    code, health = fetch_health(settings.get(ENV_PREFIX + "HOST", "127.0.0.1"), int(port))
    if code is None:
        return f"{line}; port {port}: not answering"
    if not isinstance(health, dict):
        return f"{line}; port {port}: HTTP {code}"
    loaded = [str(m.get("name")) for m in health.get("models_loaded") or []]
    return (f"{line}; port {port}: {health.get('status')}, {len(loaded)} loaded"
            + (f" ({', '.join(loaded)})" if loaded else "")
            + f", {health.get('requests_in_flight', 0)} in flight")


def cluster_status_lines(config: Config, count: int, conf_dir: Path,
                         unit: str = UNIT) -> list[str]:
    """The status report of the balancer and its ``count`` instances."""
    balancer = f"{unit}-balancer"
    lines = [unit_line(balancer)]
    code, health = fetch_health(config.host, config.port)
    url = f"http://{config.host}:{config.port}"
    if code is None:
        lines.append(f"{url} (HAProxy): not answering ({health})")
    elif isinstance(health, dict):
        lines.append(f"{url} (HAProxy): {health.get('status')} (HTTP {code}), default model "
                     f"{health.get('default_model')}, {health.get('models_available', '?')} "
                     f"models available")
    else:
        lines.append(f"{url} (HAProxy): HTTP {code}: {health}")
    units = [f"{unit}@{index}" for index in range(1, count + 1)]
    for name, settings in zip(units, installed_instances(conf_dir, count), strict=True):
        lines.append(instance_line(name, settings))
    errors = recent_errors([balancer, *units])
    lines.append(f"errors in the journal, last hour: {len(errors) or 'none'}"
                 + (" (latest last)" if errors else ""))
    lines += [f"  {line}" for line in errors]
    return lines


def update_all(config_path: str | None, count: int) -> int:
    """The rolling update of the installed instances (``python -m ollama_server.cluster
    update``: each in turn drained, updated with SIGUSR2, ready again); its exit status."""
    cmd = [sys.executable, "-m", "ollama_server.cluster", "update", "--instances", str(count)]
    if config_path:
        cmd += ["--config", config_path]
    return subprocess.run(cmd).returncode


def _conf_dir() -> Path:
    """The installation's settings folder: where its shared environment file lies."""
    env_file = os.environ.get(ENV_PREFIX + "ENV_FILE")
    if not env_file:
        raise SystemExit(f"{ENV_PREFIX}ENV_FILE is not set (run this through the unit's "
                         f"scripts)")
    return Path(env_file).expanduser().parent


def main(argv: list[str] | None = None) -> int:
    """CLI for the unit's shell scripts."""
    parser = argparse.ArgumentParser(prog="python -m ollama_server.user_service")
    parser.add_argument("command", choices=["settings", "status", "update", "health",
                                            "instances"])
    parser.add_argument("--config", default=None, help="the YAML config file the unit uses")
    parser.add_argument("--unit", default=UNIT)
    parser.add_argument("--pid", type=int, default=None,
                        help="update: the master's pid (default: the unit's main process)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="update: seconds to wait (default: shutdown_timeout + 60)")
    parser.add_argument("--url", default=None, help="health: the service's base URL")
    parser.add_argument("--instances", type=int, default=0,
                        help="how many instances are installed behind the balancer (0: one "
                             "unit, no balancer)")
    parser.add_argument("--all", action="store_true",
                        help="update: every instance, one at a time (rolling update)")
    parser.add_argument("--dir", default=None,
                        help="instances: the folder of the balancer's configuration and the "
                             "instances' environment files")
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
    if args.command == "instances":
        if args.instances < 1 or not args.dir:
            parser.error("instances needs --instances N (1 or more) and --dir")
        made = write_instances(config, args.config, args.instances, Path(args.dir))
        for key, value in made.items():
            print(f"{key}={shlex.quote(str(value))}")
        return 0
    if args.command == "update" and args.all:
        if args.instances < 1:
            raise SystemExit(f"no instances of {args.unit} are installed (install them with "
                             f"./install-user-service.sh --instances N)")
        if args.pid or args.timeout:
            parser.error("--all takes no --pid or --timeout (each step waits up to "
                         "shutdown_timeout + 60 s)")
        return update_all(args.config, args.instances)
    if args.command == "update":
        if args.instances and not args.pid:
            raise SystemExit(f"{args.instances} instances of {args.unit} are installed behind "
                             f"a balancer: update them with ./update-service.sh --all")
        pid = args.pid or main_pid(args.unit)
        if pid <= 0:
            raise SystemExit(f"{args.unit} is not running; start it first")
        return update(pid, args.timeout or config.shutdown_timeout + 60)
    if args.command == "settings":
        for key, value in settings(config).items():
            print(f"{key}={shlex.quote(str(value))}")
        return 0
    if args.instances:
        print("\n".join(cluster_status_lines(config, args.instances, _conf_dir(), args.unit)))
        return 0
    print("\n".join(status_lines(config, args.unit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
