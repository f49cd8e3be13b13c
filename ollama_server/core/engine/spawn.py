"""Engines die with the service: every llama-server is started so that the kernel kills it when
the service process dies, however it dies.

A graceful stop (SIGTERM, an update, the end of a test) stops each engine itself. What that
cannot cover is a service killed outright: gunicorn's master SIGKILLs a worker that misses its
timeout, the out-of-memory killer picks the worker, a user runs ``kill -9``. The engines would
then run on as orphans, holding their memory and the model files, and the next start would load
every model a second time.

Linux's ``PR_SET_PDEATHSIG`` asks the kernel to signal a child when its parent dies, but
"parent" means the *thread* that forked it: a child started from a request's thread would be
killed when that thread ends. So every engine is started from one long-lived thread of the
process ("engine-spawner"), which ends only with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any

PR_SET_PDEATHSIG = 1

_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - a Linux without a loadable libc
        _libc = None

_jobs: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_thread_pid: int | None = None
_start_lock = threading.Lock()


def _serve() -> None:
    while True:
        cmd, kwargs, result = _jobs.get()
        if not result.set_running_or_notify_cancel():
            continue
        try:
            tie = functools.partial(die_with_parent, signal.SIGKILL, os.getpid())
            result.set_result(subprocess.Popen(cmd, preexec_fn=tie, **kwargs))
        except BaseException as exc:  # handed to the caller, who raises it
            result.set_exception(exc)


def _spawner() -> None:
    """Start the spawner thread once per process (again in a forked child, whose threads are
    gone: gunicorn forks its workers after the app module may have been imported)."""
    global _thread, _thread_pid
    with _start_lock:
        if _thread is None or _thread_pid != os.getpid() or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, name="engine-spawner", daemon=True)
            _thread.start()
            _thread_pid = os.getpid()


def popen_tied(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` for a child that the kernel kills (SIGKILL) when
    this process dies; on systems without ``prctl`` a plain Popen."""
    if _libc is None:
        return subprocess.Popen(cmd, **kwargs)
    _spawner()
    result: Future = Future()
    _jobs.put((cmd, kwargs, result))
    return result.result()


def die_with_parent(signum: int, parent: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (an engine,
    between fork and exec, with SIGKILL; the engine pool process with SIGTERM); exit at once
    if it died already, rather than run unsupervised. Nothing on systems without ``prctl``.

    Call it first thing after fork with ``parent`` the parent's pid taken before the fork:
    the parent may be pid 1 itself (the service in a container)."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
