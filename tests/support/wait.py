"""Bounded waiting for conditions that nobody can notify us about.

Inside this process, state changes go through condition variables (see backend.py). Another
process's state (a proxy's metrics, its exit, a file it writes) can only be polled: do it with a
deadline and a message that says what never happened, never with a bare ``sleep``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises TimeoutError naming ``what`` after ``timeout`` seconds. Exceptions from the
    predicate propagate: a predicate that can fail transiently should catch its own errors.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
