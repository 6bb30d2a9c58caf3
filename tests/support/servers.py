"""The life cycle of the harness's in-process servers: a thread each, started and stopped with
a deadline.

Why one base: every thread-run test server needs the same few things, and each copy of them was
a chance to get one wrong: start returns only once the server accepts (or raises what stopped
it), stop wakes the thread from outside and joins it with a deadline (a thread that does not
stop is an error, not a leak into the next test), and the server is a context manager.

- :class:`ThreadRunner`: that life cycle, for anything run on its own thread.
- :class:`ServerThread`: plus a host and a port (``.url``); the server binds port 0 and reports
  the port it got (no port is picked in advance).
- :class:`SocketServer`: a listener bound at construction (so ``.port`` is known before the
  thread runs), an accept loop on a selector woken through a socketpair, and each connection
  handed to :meth:`SocketServer.handle` on its own thread; stop shuts those connections down
  (which wakes a handler blocked in ``recv``) and joins their threads too.
- :class:`LoopThread`: an asyncio (or uvloop) event loop on a thread, for in-process tests
  that run the proxy's async components and drive them with a blocking client.

Nothing here imports shadowlane (see ``support/__init__.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")


class ThreadRunner:
    """Runs :meth:`_run` on a daemon thread between :meth:`start` and :meth:`stop`.

    Subclasses implement :meth:`_run` (call ``self._ready.set()`` once serving), :meth:`_wake`
    (called from the test's thread: make ``_run`` return) and, if they hold resources past
    the thread, :meth:`_release`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        #: what ended the thread with an exception (raised by start() if before ready)
        self._failure: BaseException | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def ident(self) -> int | None:
        """The thread's ident while it runs (to tell what ran on it, and what did not)."""
        return self._thread.ident if self._thread is not None else None

    def start(self, timeout: float = 5.0) -> Self:
        """Start the thread; return once it is serving, or raise what stopped it first."""
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._thread_main, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout}s")
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the thread, join it (bounded), then release what is left. Safe to repeat, and
        to call on a runner that never started."""
        thread = self._thread
        if thread is not None:
            if thread.is_alive():
                self._wake()
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"{self.name} thread did not stop within {timeout}s")
            self._thread = None
        self._release(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            self._run()
        except BaseException as e:  # surfaced to start() if it happened before ready
            self._failure = e
        finally:
            self._ready.set()

    def _run(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _release(self, timeout: float) -> None:
        """After the thread ended (or never ran): close what the runner still holds."""


class ServerThread(ThreadRunner):
    """A :class:`ThreadRunner` that listens on ``host``; ``_port`` is set once it is bound."""

    scheme = "http"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash): what goes into ``endpoints``."""
        return f"{self.scheme}://{self.host}:{self.port}"


class SocketServer(ServerThread):
    """A plain-socket server: listener bound now, accept loop on the thread, and
    :meth:`handle` called for each connection on a thread of its own.

    Subclasses override :meth:`handle` (blocking reads are fine: stop shuts the connection down,
    and ``recv`` then returns ``b""``), or :meth:`_on_accept` to keep connections without a
    thread (call :meth:`_keep` so stop closes them). ``_cond`` guards what the threads share.
    """

    def __init__(self, host: str = "127.0.0.1", backlog: int = 128) -> None:
        super().__init__(host)
        self._listener = socket.create_server((host, 0), backlog=backlog)
        self._port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._cond = threading.Condition()
        self._conns: list[socket.socket] = []
        self._handlers: list[threading.Thread] = []

    def handle(self, conn: socket.socket) -> None:
        """Serve one accepted connection (on its own thread)."""
        raise NotImplementedError

    def _on_accept(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        thread = threading.Thread(
            target=self.handle, args=(conn,), name=f"{self.name}-conn", daemon=True
        )
        with self._cond:
            self._keep(conn)
            self._handlers.append(thread)
        thread.start()

    def _keep(self, conn: socket.socket) -> None:
        """Hold ``conn`` until stop (call with ``_cond`` held)."""
        self._conns.append(conn)
        self._cond.notify_all()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            self._ready.set()
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    conn, addr = self._listener.accept()
                    self._on_accept(conn, addr)

    def _wake(self) -> None:
        self._wake_w.send(b"x")

    def _release(self, timeout: float) -> None:
        with self._cond:
            conns, handlers = list(self._conns), list(self._handlers)
        if handlers:  # wake handlers blocked in recv; held-only connections are just closed
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in handlers:
            thread.join(timeout)
        for conn in conns:
            conn.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()


class LoopThread(ThreadRunner):
    """An event loop (``"asyncio"`` or ``"uvloop"``) running forever on a daemon thread.

    For in-process tests of async components: :meth:`run` executes a coroutine on the loop
    and waits for its result, bounded, from the test's own (blocking) thread. Context manager,
    or ``start()``/``stop()``; stop ends the loop and closes it.
    """

    def __init__(
        self, kind: Literal["asyncio", "uvloop"] = "asyncio", timeout: float = 5.0
    ) -> None:
        super().__init__()
        if kind == "uvloop":
            import uvloop  # a dependency of the proxy, not the proxy: fine for the harness

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.timeout = timeout

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop; its result, or TimeoutError after ``timeout`` (default:
        the loop's)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(self.timeout if timeout is None else timeout)

    def _run(self) -> None:
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def _wake(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _release(self, timeout: float) -> None:
        if not self.loop.is_running():
            self.loop.close()


__all__ = ["LoopThread", "ServerThread", "SocketServer", "ThreadRunner"]
