"""Logging setup: one line format, the request id on every line of a request, a rotating file
under ``log_dir`` and the console (the journal, under systemd)."""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
from pathlib import Path

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - [%(request_id)s] %(message)s"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (from the current context) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def setup_logging(level: str = "INFO", log_dir: str | Path | None = None,
                  max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
    """Configure the root logger once (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_ollama_server", False):
            root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_dir:
        path = Path(log_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.handlers.RotatingFileHandler(
                path / "server.log", maxBytes=max_bytes, backupCount=backups))
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot write logs to %s: %s", path, exc)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        handler._ollama_server = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("werkzeug").setLevel(max(logging.WARNING, root.level))
