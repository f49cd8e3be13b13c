"""core/engine/spawn.py: a child started with popen_tied dies with the process that started it, and
not with the thread that asked for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from ollama_server.core.engine.spawn import popen_tied
from tests.helpers import ROOT, pid_alive, wait_for

PARENT = textwrap.dedent("""
    import threading, time
    from ollama_server.core.engine.spawn import popen_tied
    out = []
    t = threading.Thread(target=lambda: out.append(popen_tied(["sleep", "300"])))
    t.start(); t.join()          # the asking thread is gone before the parent dies
    time.sleep(0.5)
    print(out[0].pid, out[0].poll(), flush=True)
    time.sleep(300)
""")


def test_child_survives_the_asking_thread_and_dies_with_the_process():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        pid_text, returncode = parent.stdout.readline().split()
        child = int(pid_text)
        assert returncode == "None"  # still running after the thread that asked ended
        assert pid_alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not pid_alive(child), "the child to die with its parent", 10)
    finally:
        parent.kill()
        parent.wait()


def test_errors_reach_the_caller():
    try:
        popen_tied(["/nonexistent/llama-server"])
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("a missing binary must raise in the caller")


def test_keyword_arguments_pass_through(tmp_path):
    proc = popen_tied([sys.executable, "-c", "import os; print(os.getcwd())"], cwd=tmp_path,
                      stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == str(tmp_path)
    assert proc.returncode == 0
    assert os.getpid() != proc.pid
