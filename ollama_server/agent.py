"""HAProxy's agent-check, answered by the service's master process (``agent_port``).

HAProxy connects to the agent port every ``agent-inter`` and reads one line
(https://docs.haproxy.org/2.6/configuration.html#5.2-agent-check). This agent answers:

- ``drain`` while the instance drains (its ``drain_file`` exists), is stopping (SIGTERM with no
  successor), preloads, or cannot serve its default model: the balancer sends it no new
  requests, and those in flight finish;
- otherwise the weight its free slots and queue give (``75%``; /health/ready's ``weight``),
  preceded by ``ready`` during the minute after it was last not ready (so that HAProxy leaves a
  drain this agent asked for; later answers leave ``ready`` out, so an operator's own
  ``set server ... state maint`` on HAProxy's socket is not undone every second).

The weight is read by one poller thread from the instance's own /health/ready on loopback twice
a second (whichever worker answers, with several), so that each agent connection is answered
at once from memory. The master holds no engine and no app: the poller is its only view.

During a zero-downtime update (SIGUSR2) two masters briefly serve the same port: both listen
on the agent port (SO_REUSEPORT), and the old one closes its agent when the new one stops it,
rather than answering ``drain`` for an instance that is still serving.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
POLL_TIMEOUT_S = 2.0
READY_ECHO_S = 60.0  # "ready" is repeated this long after the instance was last not ready


class LoadAgent:
    """The agent of one instance: a listener on ``(host, port)`` and a poller of
    ``health_url`` (its /health/ready)."""

    def __init__(self, host: str, port: int, health_url: str) -> None:
        self.host, self.port, self.health_url = host, port, health_url
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._stopping = False  # the master is stopping (no successor): drain
        self._state = "starting"  # ready | draining | starting | unhealthy | unknown
        self._weight: int | None = None
        self._not_ready_at = time.monotonic()  # the instance starts not ready

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Listen and start answering; OSError (with the port) when the port is taken."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # an updating master's too
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"agent_port {self.port} on {self.host}: {exc.strerror}"
                          f" (another program holds it: choose another agent_port)") from None
        sock.listen(64)
        self._sock = sock
        for target, name in ((self._serve, "agent"), (self._poll, "agent-poller")):
            threading.Thread(target=target, name=name, daemon=True).start()
        log.info("agent-check for the balancer on %s:%d", self.host, self.port)

    def stopping(self) -> None:
        """The instance is stopping: answer ``drain`` until the process exits."""
        self._stopping = True

    def close(self) -> None:
        """Stop answering (a new master's agent takes over the port)."""
        self._stop.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # --- what the balancer reads ---------------------------------------------------------

    def reply(self, now: float | None = None) -> str:
        """The line HAProxy reads now."""
        now = time.monotonic() if now is None else now
        if self._stopping:
            return "drain"
        # "unknown": the instance did not answer its probe in time (every thread busy, say):
        # the last weight stands rather than a guess.
        if self._state in ("draining", "starting", "unhealthy") or self._weight is None:
            return "drain"
        words = [f"{self._weight}%"]
        if now - self._not_ready_at < READY_ECHO_S:
            words.insert(0, "ready")
        return " ".join(words)

    def observe(self, status: int | None, body: dict | None, now: float | None = None) -> None:
        """Take one answer of /health/ready (status None: no answer)."""
        now = time.monotonic() if now is None else now
        if status is None or body is None:
            self._state = "unknown"
            return
        state = str(body.get("status") or ("ready" if status == 200 else "unhealthy"))
        if status != 200 and state == "ready":
            state = "unhealthy"
        self._state = state
        if state != "ready":
            self._not_ready_at = now
            return
        try:
            self._weight = max(1, min(100, int(body.get("weight", 100))))
        except (TypeError, ValueError):
            self._weight = 100

    # --- threads -------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            try:
                conn.settimeout(1.0)
                conn.sendall((self.reply() + "\n").encode())
            except OSError:
                pass
            finally:
                conn.close()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            status, body = probe(self.health_url, POLL_TIMEOUT_S)
            self.observe(status, body)


def probe(url: str, timeout: float) -> tuple[int | None, dict | None]:
    """(status, JSON body) of one GET, or (None, None) when nothing usable came back."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return None, None


def local_url(host: str, port: int, path: str) -> str:
    """The URL of ``path`` on this instance, from the master (a wildcard bind is reached on
    loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"
