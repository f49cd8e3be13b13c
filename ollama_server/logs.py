"""Logging setup: one line format, the request id on every line of a request, a rotating file
``<log_dir>/server.log`` and the console — which, under systemd, is the journal.

Line format (the original README's)::

    2025-01-31 12:00:00,123 - ollama_server.api.handlers - INFO - [9f1c…] request 9f1c… completed

The request id comes from a context variable that the app's ``before_request`` sets. Each WSGI
call runs in its own copy of the context (``isolate_request_context``), and so does every step
of its response body, so lines logged inside streaming generators — which run after the view
returned — carry the id of their request, and no id leaks onto the next request of a thread.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - [%(request_id)s] %(message)s"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# sd-daemon(3) priority prefixes: journald strips them and records the level, so
# `journalctl -p warning` works.
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                     logging.CRITICAL: 2}


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (from the current context) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; sets ``record.request_id`` unless given in ``extra``."""
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JournalFormatter(logging.Formatter):
    """The line format with an ``<N>`` syslog priority prefix that journald understands."""

    def format(self, record: logging.LogRecord) -> str:
        """Prefix each line of the formatted record (tracebacks included) with its priority."""
        prefix = f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def connected_to_journal(stream: IO[Any], environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd gave this service.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose stdout or stderr goes to
    the journal (systemd.exec(5)); comparing it with the stream's file avoids treating a child
    whose output was redirected elsewhere as journal-bound.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(stream.fileno())
        device, inode = (int(x) for x in value.split(":", 1))
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == device and st.st_ino == inode


def console_handler(environ: dict[str, str] | None = None) -> logging.Handler:
    """stderr, or under systemd (INVOCATION_ID or JOURNAL_STREAM set) the journal's stream with
    priority prefixes."""
    env = os.environ if environ is None else environ
    under_systemd = bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))
    if under_systemd:
        for stream in (sys.stdout, sys.stderr):
            if connected_to_journal(stream, env):
                handler = logging.StreamHandler(stream)
                handler.setFormatter(JournalFormatter(LOG_FORMAT))
                return handler
        # A unit may route output to the journal without JOURNAL_STREAM (socket units):
        # stdout is what journald reads by default.
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def setup_logging(level: str = "INFO", log_dir: str | Path | None = None,
                  max_bytes: int = 10 * 1024 * 1024, backups: int = 5,
                  environ: dict[str, str] | None = None) -> list[logging.Handler]:
    """Configure the root logger (idempotent); return the handlers it installed.

    ``level`` is the config's ``log_level`` (``--debug`` makes it DEBUG). The file handler
    rotates ``server.log`` at ``max_bytes`` and keeps ``backups`` old files.
    """
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_ollama_server", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [console_handler(environ)]
    if log_dir:
        path = Path(log_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            file_handler = logging.handlers.RotatingFileHandler(
                path / "server.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            handlers.append(file_handler)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot write logs to %s: %s", path, exc)
    for handler in handlers:
        handler.addFilter(RequestIdFilter())
        handler._ollama_server = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # Werkzeug's per-request lines duplicate gunicorn's access log; keep them for --debug only.
    logging.getLogger("werkzeug").setLevel(max(logging.WARNING, root.level))
    return handlers


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _ContextBody:
    """A WSGI response body whose every step runs in the request's own context."""

    def __init__(self, body: Iterable[bytes], ctx: contextvars.Context) -> None:
        self._body = body
        self._ctx = ctx
        self._iter: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            self._iter = self._ctx.run(iter, self._body)
        return self._ctx.run(next, self._iter)

    def close(self) -> None:
        """Close the body inside the context too (a generator's ``finally`` logs there)."""
        close = getattr(self._body, "close", None)
        if close is not None:
            self._ctx.run(close)


def isolate_request_context(wsgi_app: WSGIApp) -> WSGIApp:
    """Wrap a WSGI app so each request, and the iteration of its body, runs in a fresh copy of
    the context: the request id set in ``before_request`` is seen by streaming generators and
    never outlives its request in a reused server thread."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        ctx = contextvars.copy_context()
        ctx.run(request_id_var.set, "-")
        return _ContextBody(ctx.run(wsgi_app, environ, start_response), ctx)

    return app
