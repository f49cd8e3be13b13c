"""Several instances of the service behind HAProxy on one host (``make cluster N=3``).

``python -m ollama_server.cluster [--instances N] [service flags]`` reads the service's own
configuration (the same file, environment and flags as ``ollama_server.main``), then:

1. renders HAProxy's configuration (:func:`render_haproxy`) into ``<log_dir>/cluster/``;
2. starts N instances of the service on loopback, instance *i* on ``port + i`` with its
   agent-check on ``port + 100 + i``, its logs in ``<log_dir>/cluster/inst<i>/`` and its drain
   file ``<log_dir>/cluster/inst<i>.drain``;
3. starts Debian's ``haproxy`` on the service's own ``host:port``, in front of them;
4. supervises: an instance that exits while nothing serves its port any more is started
   again (an instance updated with SIGUSR2 hands its port to its successor and exits: that is
   not a failure); Ctrl-C or SIGTERM stops HAProxy, then drains and stops every instance.

With ``--netns`` (root, iproute2) each instance runs in a network namespace of its own behind a
veth pair, a host of its own as far as HAProxy can tell (the tests use it).

``python -m ollama_server.cluster render`` prints the HAProxy configuration only (for an
HAProxy of your own, or to read it); ``status`` shows each instance as HAProxy and the
instance itself see it; ``update`` is the rolling update of a running cluster: one
instance at a time is drained (its agent says ``drain``), waits for its requests in flight,
takes the checkout's current code (SIGUSR2, zero downtime), and comes back (``ready``).

How HAProxy routes (README, "Scaling out"): a request whose JSON body names a ``model`` goes
to the instance that consistent hashing gives that model, so each model is loaded on one
instance, until that instance runs ``cluster_hash_balance_factor`` percent above the cluster's
average load (HAProxy's bounded-load consistent hashing): then the next instance on the ring
takes the overflow. Everything else (GET routes, TGI's bodies without a model) goes to the
instance with the fewest connections, weighted by each instance's free slots (agent-check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent import probe
from .config import Config, ConfigError, ConfigSource, _abs
from .core.engine.spawn import die_with_parent
from .shared_pool import resolve_workers
from .user_service import alive, parent_of, update

AGENT_OFFSET = 100  # instance i's agent-check port: port + 100 + i
AGENT_INTER = "1s"  # how often HAProxy asks each agent
CHECK_INTER = "1s"  # how often HAProxy asks each instance's /health/ready
RETRY_AFTER_S = 5  # Retry-After of the balancer's own 503
BUFSIZE = 65536  # request bodies up to this size are read for their model and can be retried


@dataclass(frozen=True)
class Instance:
    """One service instance behind the balancer."""

    name: str
    host: str
    port: int
    agent_port: int
    drain_file: Path
    netns: str | None = None  # the network namespace it runs in (--netns), else this host's

    @property
    def veth(self) -> tuple[str, str]:
        """(this host's end, the namespace's end) of its veth pair (--netns)."""
        tag = f"{self.port % 100000}"
        return f"lc{tag}", f"ln{tag}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def run_dir(config: Config) -> Path:
    """Where the cluster keeps HAProxy's configuration and socket and the instances' logs."""
    return _abs(config.log_dir) / "cluster"


def plan(config: Config, count: int, netns: bool = False) -> list[Instance]:
    """The instances of a cluster of ``count`` on this host (on loopback, or with ``netns``
    each in its own network namespace at the far end of a veth pair, 10.231.<i>.x/30);
    ConfigError when a port would pass 65535."""
    if count < 1:
        raise ConfigError(f"a cluster needs at least one instance, got {count}")
    if config.port + AGENT_OFFSET + count > 65535:
        raise ConfigError(f"port {config.port} leaves no room for {count} instances (ports "
                          f"port+1..port+{count}, agents port+{AGENT_OFFSET + 1}..)")
    where = run_dir(config)
    out = []
    for i in range(1, count + 1):
        host, ns = "127.0.0.1", None
        if netns:  # a /30 per instance, placed by the port so that two clusters differ
            block = (config.port + i) % 64
            host, ns = f"10.231.{i}.{4 * block + 2}", f"llm-cluster-{config.port + i}"
        out.append(Instance(f"inst{i}", host, config.port + i, config.port + AGENT_OFFSET + i,
                            where / f"inst{i}.drain", ns))
    return out


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ip {' '.join(args)} failed: {done.stderr.strip()} (network "
                         f"namespaces need root and iproute2)")


def netns_up(inst: Instance) -> None:
    """Make ``inst``'s namespace and veth pair (this host's end .1, the namespace's .2)."""
    assert inst.netns is not None
    netns_down(inst)
    near, far = inst.veth
    outer = inst.host.rsplit(".", 1)[0] + "." + str(int(inst.host.rsplit(".", 1)[1]) - 1)
    _ip("netns", "add", inst.netns)
    _ip("link", "add", near, "type", "veth", "peer", "name", far)
    _ip("link", "set", far, "netns", inst.netns)
    _ip("addr", "add", f"{outer}/30", "dev", near)
    _ip("link", "set", near, "up")
    for args in (("addr", "add", f"{inst.host}/30", "dev", far), ("link", "set", far, "up"),
                 ("link", "set", "lo", "up")):
        _ip("netns", "exec", inst.netns, "ip", *args)


def netns_down(inst: Instance) -> None:
    """Remove ``inst``'s namespace and veth pair, if there (deleting one end removes both)."""
    if inst.netns is None:
        return
    subprocess.run(["ip", "netns", "del", inst.netns], capture_output=True)
    subprocess.run(["ip", "link", "del", inst.veth[0]], capture_output=True)


def _quote(text: str) -> str:
    """A string as one HAProxy configuration word (in single quotes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _error_body(kind: str, message: str) -> str:
    """The balancer's own error: OpenAI's error shape, which the Ollama, OpenAI and
    Anthropic SDKs all read a message from."""
    return (f'{{"error":{{"message":"{message}","type":"{kind}",'
            f'"param":null,"code":null}}}}')


def too_large_rules(max_body_mb: float) -> list[str]:
    """Frontend lines that answer a body over ``max_body_mb`` (by its Content-Length) at the
    balancer, with the service's own 413 in the dialect of the path (api/common.py's
    ``dialect_for_request`` and error formatters), so that the instance never closes a
    connection whose upload is still arriving (which would reset it, and HAProxy would lose
    the answer). Anthropic's body lacks only the ``request_id`` the service puts in it. A
    chunked upload (no Content-Length) goes on to the instance, which refuses it there."""
    from .api import app as _app  # noqa: F401 - registers every dialect's error formatter
    from .api.common import ERROR_FORMATTERS, OPENAI_ALIASES, body_too_large

    def body(dialect: str) -> str:
        shaped, _ = ERROR_FORMATTERS[dialect](body_too_large(max_body_mb))
        return _quote(json.dumps(shaped))

    limit = int(max_body_mb * 1024 * 1024)
    # The order of dialect_for_request: the first rule that matches answers.
    by_path = [("anthropic", "{ path_beg /v1/messages }"),
               ("openai", "{ path " + " ".join(sorted(OPENAI_ALIASES)) + " }"),
               ("ollama", "{ path_beg /api/ }"),
               ("tgi", "{ path /generate /generate_stream /info } || { path / } METH_POST"),
               ("openai", "{ path_beg /v1/ } || { path /tokenize /detokenize /version }"),
               ("ollama", "")]
    lines = [f"    acl body_too_large req.hdr_val(content-length) gt {limit}"]
    for dialect, cond in by_path:
        where = f"body_too_large {cond}".rstrip()
        if "||" in cond:  # HAProxy's "or" binds loosest: repeat the acl on each side
            where = " || ".join(f"body_too_large {c.strip()}" for c in cond.split("||"))
        lines.append(f"    http-request return status 413 content-type application/json "
                     f"string {body(dialect)} if {where}")
    return lines


def render_haproxy(config: Config, instances: list[Instance], *, bind: str | None = None,
                   stats_socket: Path | None = None, workers: int | None = None) -> str:
    """HAProxy 2.6's configuration for ``instances`` behind ``bind`` (the service's own
    ``host:port`` by default). Every line is explained in README, "Scaling out"."""
    bind = bind or f"{config.host}:{config.port}"
    per_instance = resolve_workers(config.workers) if workers is None else workers
    # What one instance serves at once (gunicorn threads in all its workers); beyond that a
    # request waits at the balancer, at most cluster_queue_timeout, then gets a 503.
    maxconn = per_instance * config.threads_http
    timeout = f"{int(config.request_timeout + config.shutdown_timeout)}s"
    queue = f"{int(config.cluster_queue_timeout * 1000)}ms"
    unavailable = _error_body("service_unavailable",
                              "every instance is busy or down; retry after a few seconds")
    lines = [
        "# Rendered by `python -m ollama_server.cluster` from the service's configuration.",
        "global",
        "    log stdout format raw local0 info",
        f"    maxconn {max(256, 2 * maxconn * len(instances))}",
        f"    tune.bufsize {BUFSIZE}",
    ]
    if stats_socket is not None:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    option http-no-delay",  # streamed tokens leave at once (else +50 ms to TTFT)
        "    timeout connect 2s",
        f"    timeout client {timeout}",
        f"    timeout server {timeout}",
        "    timeout http-request 60s",
        "    timeout http-keep-alive 5s",
        f"    timeout queue {queue}",
        "    retries 3",
        "    retry-on conn-failure empty-response junk-response",
        "    option redispatch 1",
        f"    http-error status 503 content-type application/json hdr Retry-After "
        f"{RETRY_AFTER_S} string {_quote(unavailable)}",
        "    http-error status 502 content-type application/json string "
        + _quote(_error_body("bad_gateway", "the instance failed before it answered")),
        "    http-error status 504 content-type application/json string "
        + _quote(_error_body("gateway_timeout", "the instance did not answer in time")),
        "",
        "frontend llm",
        f"    bind {bind}",
        "    option http-buffer-request",
        "    option forwardfor",
        *too_large_rules(config.max_body_mb),
        "    http-request set-var(txn.model) req.body,json_query('$.model') if METH_POST",
        "    use_backend by_model if { var(txn.model) -m found }",
        "    default_backend by_load",
        "",
        "backend by_model",
        "    balance hash var(txn.model)",
        "    hash-type consistent sdbm avalanche",
        f"    hash-balance-factor {config.cluster_hash_balance_factor}",
    ]
    for inst in instances:
        lines.append(f"    server {inst.name} {inst.host}:{inst.port} track by_load/{inst.name} "
                     f"maxconn {maxconn}")
    lines += [
        "",
        "backend by_load",
        "    balance leastconn",
        "    option httpchk GET /health/ready",
        "    http-check expect status 200",
        f"    default-server inter {CHECK_INTER} fall 2 rise 1",
    ]
    for inst in instances:
        lines.append(f"    server {inst.name} {inst.host}:{inst.port} check maxconn {maxconn} "
                     f"agent-check agent-port {inst.agent_port} agent-inter {AGENT_INTER} "
                     f"weight 100")
    return "\n".join(lines) + "\n"


# --- running a cluster ------------------------------------------------------------------------

def find_haproxy() -> str:
    """The haproxy binary; SystemExit saying how to install it when missing."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                        if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if found is None:
        raise SystemExit("haproxy is not installed: run `make haproxy` (Debian's package) or "
                         "`sudo apt-get install haproxy`, then try again")
    return found


def instance_env(config: Config, inst: Instance) -> dict[str, str]:
    """The environment of one instance: its name, agent port, logs and drain file; the Host
    check of a loopback bind relaxed only when the balancer itself listens beyond loopback."""
    env = {**os.environ,
           "OLLAMA_SERVER_INSTANCE_NAME": inst.name,
           "OLLAMA_SERVER_AGENT_PORT": str(inst.agent_port),
           "OLLAMA_SERVER_LOG_DIR": str(run_dir(config) / inst.name),
           "OLLAMA_SERVER_DRAIN_FILE": str(inst.drain_file)}
    if not config.allowed_hosts and config.host not in ("127.0.0.1", "localhost", "::1"):
        env["OLLAMA_SERVER_ALLOWED_HOSTS"] = "*"  # the balancer's clients' Host names
    return env


class Cluster:
    """N instances and HAProxy, started and supervised from this process."""

    def __init__(self, config: Config, count: int, service_args: list[str],
                 say: Callable[[str], Any] = print, netns: bool = False) -> None:
        self.config = config
        self.instances = plan(config, count, netns)
        self.service_args = service_args
        self.say = say
        self.dir = run_dir(config)
        self.haproxy_cfg = self.dir / "haproxy.cfg"
        self.socket = self.dir / "haproxy.sock"
        self.masters: dict[str, int] = {}  # each instance's gunicorn master now
        self.haproxy: subprocess.Popen | None = None
        self._stopping = False

    def render(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.haproxy_cfg.write_text(render_haproxy(self.config, self.instances,
                                                   stats_socket=self.socket))
        return self.haproxy_cfg

    def start_instance(self, inst: Instance) -> None:
        (self.dir / inst.name).mkdir(parents=True, exist_ok=True)
        inst.drain_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "ollama_server.main", *self.service_args,
               "--host", inst.host, "--port", str(inst.port)]
        if inst.netns is not None:
            cmd = ["ip", "netns", "exec", inst.netns, *cmd]
        log = open(self.dir / inst.name / "stdout.log", "ab")  # noqa: SIM115 - the child's
        parent = os.getpid()
        proc = subprocess.Popen(
            cmd, env=instance_env(self.config, inst), stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))
        log.close()
        self.masters[inst.name] = proc.pid
        self.say(f"{inst.name}: starting on {inst.url} (agent {inst.agent_port}, pid "
                 f"{proc.pid}, log {self.dir / inst.name})")

    def start(self, timeout: float) -> None:
        """Render, start the instances, wait until each is live, then start HAProxy."""
        haproxy = find_haproxy()
        cfg = self.render()
        check = subprocess.run([haproxy, "-c", "-q", "-f", str(cfg)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise SystemExit(f"HAProxy refused the configuration {cfg}:\n{check.stderr}")
        for inst in self.instances:
            if inst.netns is not None:
                netns_up(inst)
            self.start_instance(inst)
        deadline = time.monotonic() + timeout
        for inst in self.instances:
            while probe(inst.url + "/health/live", 2.0)[0] != 200:
                _reap()
                if not alive(self.masters[inst.name]):
                    how = _how_it_ended(self.masters[inst.name])
                    raise SystemExit(f"{inst.name} exited before it served{how}; see "
                                     f"{self.dir / inst.name / 'stdout.log'}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{inst.name} did not answer on {inst.url} within "
                                     f"{timeout:.0f}s; see {self.dir / inst.name}")
                time.sleep(0.2)
        parent = os.getpid()
        self.haproxy = subprocess.Popen(
            [haproxy, "-W", "-db", "-f", str(cfg)],
            stdout=open(self.dir / "haproxy.log", "ab"),  # noqa: SIM115 - the child's
            stderr=subprocess.STDOUT, preexec_fn=lambda: die_with_parent(signal.SIGTERM,
                                                                         parent))
        self.say(f"haproxy: serving on http://{self.config.host}:{self.config.port} in front "
                 f"of {len(self.instances)} instances (configuration {cfg}, log "
                 f"{self.dir / 'haproxy.log'})")

    def supervise(self) -> int:
        """Until stopped: restart an instance whose port no longer answers after its master
        exited. Returns HAProxy's exit status when it ends on its own."""
        while not self._stopping:
            time.sleep(0.5)
            _reap()
            if self.haproxy is not None and self.haproxy.poll() is not None:
                if self._stopping:
                    break
                self.say(f"haproxy exited with status {self.haproxy.returncode}; stopping")
                return self.haproxy.returncode or 1
            for inst in self.instances:
                if self._stopping or alive(self.masters[inst.name]):
                    continue
                # An update hands the port to a new master before the old one exits.
                successor = master_of(inst)
                if successor is not None and alive(successor):
                    self.masters[inst.name] = successor
                    continue
                self.say(f"{inst.name}: its master {self.masters[inst.name]} exited and "
                         f"nothing serves {inst.url}; starting it again")
                self.start_instance(inst)
        return 0

    def stop(self, *_: Any) -> None:
        """Every child gracefully (SIGTERM): HAProxy, and each instance's master (adopted
        successors of updated ones included), which drain their requests."""
        self._stopping = True
        for pid in _children_of(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_stopped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap()
            if not any(alive(p) for p in _children_of(os.getpid())):
                return
            time.sleep(0.2)
        for pid in _children_of(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap()

    def cleanup(self) -> None:
        """The network namespaces of --netns, once every instance has stopped."""
        for inst in self.instances:
            netns_down(inst)


def _children_of(pid: int) -> set[int]:
    from .user_service import children

    return children(pid)


_EXITS: dict[int, int] = {}  # pid → wait status of the children _reap() collected


def _reap() -> None:
    """Collect every exited child (adopted ones too: this process is a subreaper)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _EXITS[pid] = status


def _how_it_ended(pid: int) -> str:
    """``exit code N`` or ``killed by SIGX`` for a child _reap() collected, else ''."""
    status = _EXITS.get(pid)
    if status is None:
        return ""
    if os.WIFSIGNALED(status):
        return f" ({signal.Signals(os.WTERMSIG(status)).name})"
    return f" (exit code {os.waitstatus_to_exitcode(status)})"


def _become_subreaper() -> None:
    """Orphans of this process's children (an updated instance's new master, once the old
    one exits) become this process's children rather than init's."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


# --- rolling update ---------------------------------------------------------------------------

def master_of(inst: Instance) -> int | None:
    """The gunicorn master serving ``inst`` (the parent of the worker that answers)."""
    _, body = probe(inst.url + "/health/live", 2.0)
    pid = body.get("pid") if isinstance(body, dict) else None
    return parent_of(int(pid)) if pid else None


def in_flight(inst: Instance) -> int:
    """Requests holding or waiting for a slot on ``inst`` (0 when it does not answer)."""
    _, body = probe(inst.url + "/health/ready", 2.0)
    if not isinstance(body, dict):
        return 0
    return int(body.get("slots_busy", 0)) + int(body.get("requests_waiting", 0))


def _answers(url: str, timeout: float) -> bool:
    """Whether ``url`` answers 200 within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while probe(url, 2.0)[0] != 200:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def rolling_update(instances: list[Instance], timeout: float, settle_s: float = 3.0,
                   say: Callable[[str], Any] = print) -> int:
    """Drain, update (SIGUSR2) and bring back each instance in turn; 0 when every one took the
    new code, else 1 (the rest are left as they are, serving)."""
    for inst in instances:
        master = master_of(inst)
        if master is None:
            say(f"{inst.name}: not serving on {inst.url}; skipped")
            continue
        say(f"{inst.name}: draining (balancer sends it nothing new)")
        inst.drain_file.parent.mkdir(parents=True, exist_ok=True)
        inst.drain_file.touch()
        try:
            # The balancer reads the agent every AGENT_INTER; the agent polls twice a second.
            time.sleep(settle_s)
            deadline = time.monotonic() + timeout
            while in_flight(inst) > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            name = inst.name
            if update(master, timeout, say=lambda line, name=name: say(f"{name}: {line}")):
                return 1
            if not _answers(inst.url + "/health/live", timeout):
                say(f"{inst.name}: not answering after its update")
                return 1
        finally:
            inst.drain_file.unlink(missing_ok=True)
        if not _answers(inst.url + "/health/ready", timeout):
            say(f"{inst.name}: not ready after its update")
            return 1
        time.sleep(settle_s)  # the balancer hears "ready" before the next one drains
        say(f"{inst.name}: updated and back in the balancer")
    return 0


# --- status ---------------------------------------------------------------------------------

def haproxy_command(sock_path: Path, command: str) -> str:
    """One command on HAProxy's stats socket (``level admin``); its answer."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        sock.sendall(command.encode() + b"\n")
        return sock.makefile().read()


def server_states(sock_path: Path) -> dict[str, dict[str, str]]:
    """by_load's servers as HAProxy sees them, by name (``show servers state``'s columns)."""
    lines = haproxy_command(sock_path, "show servers state by_load").splitlines()
    header = lines[1].lstrip("# ").split() if len(lines) > 1 else []
    rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:] if line.strip()]
    return {row["srv_name"]: row for row in rows}


def status_lines(instances: list[Instance], sock_path: Path) -> list[str]:
    """One line per instance: HAProxy's view (up/down, drain, weight) and the instance's own
    (/health/ready: status, slots)."""
    try:
        states = server_states(sock_path)
    except OSError as exc:
        states = {}
        out = [f"haproxy: no answer on {sock_path} ({exc}); is the cluster running?"]
    else:
        out = [f"haproxy: {len(states)} instances ({sock_path})"]
    for inst in instances:
        row = states.get(inst.name, {})
        up = {"2": "UP", "0": "DOWN", "1": "STARTING", "3": "STOPPING"}.get(
            row.get("srv_op_state", ""), "?")
        admin = int(row.get("srv_admin_state", "0") or 0)
        drain = " DRAIN" if admin & 0x18 else (" MAINT" if admin & 0x27 else "")
        code, body = probe(inst.url + "/health/ready", 2.0)
        own = (f"{body.get('status')}, {body.get('slots_busy')}/{body.get('slots_total')} "
               f"slots busy, {body.get('requests_waiting')} waiting"
               if isinstance(body, dict) and body else "no answer")
        out.append(f"{inst.name} {inst.url}: haproxy {up}{drain} weight "
                   f"{row.get('srv_uweight', '?')}; instance {own}")
    return out


# --- command line -----------------------------------------------------------------------------

def _service_args(argv: list[str]) -> list[str]:
    """``argv`` without the cluster's own words, and without --host/--port (the balancer's):
    what every instance is started with."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in ("--instances", "-n", "--ready-timeout", "--host", "--port"):
            skip = 0 if "=" in arg else 1
            continue
        if arg in ("run", "render", "update", "status", "--netns"):
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from .main import build_parser

    parser = argparse.ArgumentParser(
        prog="python -m ollama_server.cluster", parents=[build_parser(add_help=False)],
        description="N instances of the service behind HAProxy on this host; the service's "
                    "flags apply to every instance, --host and --port to HAProxy.")
    parser.add_argument("command", nargs="?", default="run",
                        choices=["run", "render", "update", "status"])
    parser.add_argument("--instances", "-n", type=int, default=3)
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds each instance may take to start")
    parser.add_argument("--netns", action="store_true",
                        help="each instance in its own network namespace behind a veth pair "
                             "(10.231.<i>.x; as root, needs iproute2): hosts of their own, "
                             "for tests")
    args = parser.parse_args(argv)
    own = {"command", "instances", "ready_timeout", "netns"}
    overrides = {k: v for k, v in vars(args).items()
                 if k not in own | {"config"} and v is not None}
    if args.debug:
        overrides["log_level"] = "DEBUG"
    try:
        config = ConfigSource(args.config, overrides).load()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    service_args = _service_args(sys.argv[1:] if argv is None else argv)
    cluster = Cluster(config, args.instances, service_args, netns=args.netns)
    if args.command == "render":
        sys.stdout.write(render_haproxy(config, cluster.instances, stats_socket=cluster.socket))
        return 0
    if args.command == "update":
        return rolling_update(cluster.instances, config.shutdown_timeout + 60)
    if args.command == "status":
        print("\n".join(status_lines(cluster.instances, cluster.socket)))
        return 0
    _become_subreaper()
    signal.signal(signal.SIGTERM, cluster.stop)
    signal.signal(signal.SIGINT, cluster.stop)
    try:
        cluster.start(args.ready_timeout)
        status = cluster.supervise()
    except SystemExit as exc:
        cluster.stop()
        cluster.wait_stopped(config.shutdown_timeout + 30)
        cluster.cleanup()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cluster.stop()
    cluster.wait_stopped(config.shutdown_timeout + 30)
    cluster.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
