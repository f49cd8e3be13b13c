"""What an engine's exit status means, in words a user can act on.

One place for the text: the engine build's smoke test, the executor's errors and the log all
say the same thing about the same death.
"""

from __future__ import annotations

import signal

REBUILD_COMMAND = "make engine-rebuild"

# Signal → (what it is, what it usually means here, what to do).
_SIGNALS: dict[int, tuple[str, str, str]] = {
    signal.SIGILL: (
        "illegal instruction",
        "the engine ran a CPU instruction this machine cannot execute: it was built for "
        "another CPU (a cache or image copied from elsewhere) or with a code path that is "
        "broken on this CPU (such as ggml's AMX kernels)",
        f"rebuild the engine on this machine: `{REBUILD_COMMAND}`"),
    signal.SIGSEGV: (
        "segmentation fault",
        "the engine crashed on a bad memory access: a bug in llama.cpp or a damaged model file",
        f"check the model file (re-import it), then rebuild the engine: `{REBUILD_COMMAND}`"),
    signal.SIGBUS: (
        "bus error",
        "a memory-mapped model file changed, shrank or sits on a full or failing disk",
        "check the disk and the model file; do not replace a model file while it is loaded"),
    signal.SIGKILL: (
        "killed",
        "usually the kernel's out-of-memory killer (see `journalctl -k` or `dmesg`)",
        "give the engine more memory: a smaller context (num_ctx / default_context_size), "
        "fewer parallel slots, or fewer models loaded at once (max_loaded_models)"),
    signal.SIGABRT: (
        "aborted",
        "llama.cpp stopped itself on a failed internal check; its last log lines say which",
        "read the engine's last log lines; a model the pinned llama.cpp does not support, "
        "or too little memory, are the usual causes"),
    signal.SIGFPE: (
        "arithmetic exception",
        "a bug in the engine for this model or these settings",
        f"try other settings for the model, or rebuild the engine: `{REBUILD_COMMAND}`"),
}


def signal_name(code: int | None) -> str | None:
    """``SIGILL`` for an exit status of -4 (Popen's way of saying 'killed by signal 4')."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def describe_exit(code: int | None) -> str:
    """A sentence for an exit status: which signal, what it usually means, what to do."""
    if code is None:
        return "is still running"
    if code >= 0:
        return f"exited with code {code}"
    name = signal_name(code)
    what = _SIGNALS.get(-code)
    if what is None:
        return f"was killed by {name}"
    label, meaning, fix = what
    return f"was killed by {name} ({label}): {meaning}. To fix: {fix}"
