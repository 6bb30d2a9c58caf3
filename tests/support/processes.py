"""Stopping the server processes the harness started, by PID and process group only."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

#: prctl(2) option: the signal the kernel sends this process when the thread that forked it ends
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def ends_with_us() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the started server when this test process
    dies, however it dies (a CI run stopped by its process group, `kill -9` of pytest).

    The servers start their own sessions (`start_new_session`, so that `end_process_group`
    can take their children), which put them out of reach of a signal to the test run's
    group: one stopped run left a proxy and its comparison child running for 50 minutes. The
    kernel ties the signal to the forking *thread*, so it is asked for only from the main
    thread (a helper thread ending is not the test process dying); a server's own children
    end with it (workers watch their supervisor, comparison children their pipe's EOF).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def arm() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died between fork and prctl: nobody will signal us
            os._exit(1)

    return arm


def end_process_group(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Send ``sig`` to ``proc`` and wait up to ``timeout``; SIGKILL its group after that.

    ``proc`` must have been started with ``start_new_session=True``, so that its group is ours:
    children a dead parent left behind (proxy workers, gunicorn workers) are ended with it.
    Returns the exit code as ``Popen`` reports it (negative: killed by that signal).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # what the parent left behind in its group
    return proc.returncode
