"""Stopping the server processes the harness started, by PID and process group only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


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
