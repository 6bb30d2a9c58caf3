"""The process model: serve in this process, or fork workers that share one port.

`run()` serves one `Instance` on uvloop until it drained. `run_workers()` with `workers > 1`
forks N workers that share the listen port through SO_REUSEPORT; the parent only supervises:
it relays SIGTERM, SIGINT (drain) and SIGHUP (reload) to them, learns from a pipe when all of
them accept connections (for `--ready-file`), stops the rest when one fails to start, restarts
a worker that dies once all served (nginx's master does the same: a `kill -9` or a crash of one
worker costs its in-flight requests, never the listener), and exits 0 only when every worker
of the last set did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

import orjson

from shadowlane.app.instance import Instance, ListenError, ReadyHook
from shadowlane.config import Config
from shadowlane.importers import ConfigSource
from shadowlane.metrics import mark_process_dead, reset_multiprocess_dir

__all__ = ["remove_ready_file", "run", "run_workers", "write_ready_file"]

log = logging.getLogger("shadowlane")


def write_ready_file(path: str, listen: str, admin: str | None, pid: int) -> None:
    """Write the `--ready-file` in one step: a reader sees no file, or all of it, never half.

    Why a file and not a port probe: with `listen: ...:0` the port is not known in advance,
    and a probe that connects says nothing about the admin listener or about the other workers.
    """
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "wb") as out:
        out.write(orjson.dumps({"listen": listen, "admin": admin, "pid": pid}) + b"\n")
    os.replace(tmp, path)


def remove_ready_file(path: str | None) -> None:
    """At exit: a ready file left behind would say a stopped process is serving."""
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _tune_gc() -> None:
    """Objects made at start-up (config, routes, pools, modules) live for the whole process:
    move them out of the collector's sight, and collect the young generation less often. A
    full collection walks every tracked object; with thousands of shadow copies in flight, a
    pause shows directly in the primary's p99."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: free memory kept at the top of the heap instead of being given back to the kernel
MALLOC_TRIM_THRESHOLD = 64 << 20
#: allocations below this come from the heap; above, each is its own mmap (glibc's own cap
#: for its adaptive threshold)
MALLOC_MMAP_THRESHOLD = 32 << 20


def _tune_malloc() -> None:
    """Big request bodies are 256 KiB reads, freed a moment later. glibc's adaptive
    thresholds then give the top of the heap back to the kernel whenever 2 MiB of it is free,
    and fault it in again for the next body, zeroed: 45-65k page faults a second with 50
    clients posting 1 MiB (8% of the proxy's CPU in the kernel). Fixed thresholds keep up
    to 64 MiB of freed heap for reuse: page faults fell to under 1k a second and req/s rose
    10-25% in that load (tests/test_upload_memory.py: 181 faults per upload to none, and a
    lower peak RSS, since 1 MiB chunks are no longer mmapped one by one). What is kept after
    a burst is handed back by the heap release (app/heap.py), a second later rather than at
    every free. MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_ in the environment (glibc
    reads them at start) wins over this."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


async def _serve(
    cfg: Config,
    config_path: str | None,
    worker_id: int,
    workers: int,
    metrics_dir: str | None,
    watch: bool,
    listen_port: int | None,
    on_ready: ReadyHook | None,
    source: ConfigSource | None = None,
    admin_port: int | None = None,
    restarted: bool = False,
) -> None:
    inst = Instance(
        cfg,
        config_path,
        worker_id,
        workers,
        metrics_dir,
        watch,
        listen_port=listen_port,
        on_ready=on_ready,
        source=source,
        admin_port=admin_port,
        restarted=restarted,
    )
    await inst.start()
    _tune_gc()
    _tune_malloc()
    await inst.stopped.wait()


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        log.warning("uvloop not available; using the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(
    cfg: Config,
    config_path: str | None = None,
    worker_id: int = 0,
    workers: int = 1,
    metrics_dir: str | None = None,
    watch: bool = False,
    *,
    listen_port: int | None = None,
    on_ready: ReadyHook | None = None,
    source: ConfigSource | None = None,
    admin_port: int | None = None,
    restarted: bool = False,
) -> int:
    _install_uvloop()
    asyncio.run(
        _serve(
            cfg,
            config_path,
            worker_id,
            workers,
            metrics_dir,
            watch,
            listen_port,
            on_ready,
            source,
            admin_port,
            restarted,
        )
    )
    return 0


def run_workers(
    cfg: Config,
    config_path: str | None,
    workers: int,
    *,
    watch: bool = False,
    ready_file: str | None = None,
    source: ConfigSource | None = None,
) -> int:
    """Serve in this process, or fork `workers` processes sharing the port (SO_REUSEPORT);
    relay signals; reap them. `ready_file` is written once every listener accepts."""
    if workers <= 1:
        try:
            return run(
                cfg,
                config_path,
                watch=watch,
                source=source,
                on_ready=(
                    (lambda listen, admin: write_ready_file(ready_file, listen, admin, os.getpid()))
                    if ready_file is not None
                    else None
                ),
            )
        finally:
            remove_ready_file(ready_file)
    # Bound (not listening) for the parent's life: it fails here, with one clear message, when
    # the port is taken; it turns port 0 into one port all workers share; and it keeps that
    # port from being taken between the workers' binds.
    reservation = _reserve_listen_port(cfg)
    port = reservation.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="shadowlane-metrics-")
    reset_multiprocess_dir(metrics_dir)
    ready_r, ready_w = os.pipe()

    def spawn(i: int, report_fd: int) -> int:
        pid = os.fork()
        if pid == 0:
            if report_fd >= 0:
                os.close(ready_r)
            reservation.close()
            restarted = report_fd < 0
            admin_port = readiness_admin_port() if restarted and i == 0 else None
            os._exit(
                _worker(
                    cfg,
                    config_path,
                    i,
                    workers,
                    metrics_dir,
                    watch,
                    port,
                    report_fd,
                    source,
                    admin_port,
                    restarted,
                )
            )
        return pid

    readiness = _Readiness(ready_r, workers, ready_file)

    def readiness_admin_port() -> int | None:
        admin = readiness.admin
        return int(admin.rpartition(":")[2]) if admin else None

    #: pid -> worker id, of the workers alive now
    live: dict[int, int] = {spawn(i, ready_w): i for i in range(workers)}
    os.close(ready_w)
    readiness.start()
    stopping = False
    restarts = _Restarts()

    def relay(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True  # a worker that exits now is not replaced
        for pid in list(live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, relay)
    status = 0
    while live:
        try:
            pid, code = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        worker_id = live.pop(pid, None)
        if worker_id is None:
            continue
        # a worker that is gone must stop counting in the summed gauges (queue depth, ...)
        mark_process_dead(pid, metrics_dir)
        exit_code = os.waitstatus_to_exitcode(code)
        if not readiness.complete.is_set():
            if exit_code != 0:
                status = 1
                # a worker that fails before the whole set serves (its admin port is taken,
                # say) fails the start: serving with a hole, or without admin, is worse
                relay(signal.SIGTERM, None)
            continue
        if stopping:
            if exit_code != 0:
                status = 1
            continue
        how = f"signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
        delay = restarts.delay(worker_id)
        log.error(
            "worker %d (pid %d) died (%s); restarting it%s",
            worker_id,
            pid,
            how,
            f" in {delay:.1f}s" if delay else "",
        )
        if delay:
            time.sleep(delay)  # a worker that dies at once again must not spin the parent
            if stopping:
                continue
        live[spawn(worker_id, -1)] = worker_id
    readiness.complete.set()  # nobody will report any more
    reservation.close()
    remove_ready_file(ready_file)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _worker(
    cfg: Config,
    config_path: str | None,
    worker_id: int,
    workers: int,
    metrics_dir: str,
    watch: bool,
    port: int,
    ready_w: int,
    source: ConfigSource | None = None,
    admin_port: int | None = None,
    restarted: bool = False,
) -> int:
    """One forked worker's life; its exit code. A start-up error is printed here, since the
    parent's CLI never sees a child's exception."""

    def report(listen: str, admin: str | None) -> None:
        if ready_w < 0:
            return  # a restarted worker: the set was reported ready long ago
        line = orjson.dumps({"worker": worker_id, "listen": listen, "admin": admin}) + b"\n"
        os.write(ready_w, line)  # one short write to a pipe: atomic (< PIPE_BUF)
        os.close(ready_w)

    try:
        return run(
            cfg,
            config_path,
            worker_id,
            workers,
            metrics_dir,
            watch,
            listen_port=port,
            on_ready=report,
            source=source,
            admin_port=admin_port,
            restarted=restarted,
        )
    except OSError as err:
        print(
            f"shadowlane: worker {worker_id}: cannot listen: {err.strerror or err}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


class _Restarts:
    """How long to wait before restarting a worker: at once, unless it died within
    `window` seconds of its last restart, then doubling from 0.5 s up to 10 s."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._last: dict[int, tuple[float, float]] = {}  # worker id -> (restarted at, delay)

    def delay(self, worker_id: int) -> float:
        now = time.monotonic()
        last = self._last.get(worker_id)
        delay = 0.0
        if last is not None and now - last[0] < self.window:
            delay = min(max(last[1] * 2, 0.5), 10.0)
        self._last[worker_id] = (now + delay, delay)
        return delay


class _Readiness(threading.Thread):
    """The parent's side of the workers' ready reports: once every worker said it listens,
    write the ready file (listen address and worker 0's admin address, the parent's PID)."""

    def __init__(self, fd: int, workers: int, ready_file: str | None) -> None:
        super().__init__(name="shadowlane-readiness", daemon=True)
        self.fd = fd
        self.workers = workers
        self.ready_file = ready_file
        self.complete = threading.Event()
        #: worker 0's admin address once reported ("host:port")
        self.admin: str | None = None

    def run(self) -> None:
        reports: dict[int, dict[str, Any]] = {}
        with os.fdopen(self.fd, "rb") as pipe:
            for line in pipe:  # EOF once every worker wrote its line or died
                report = orjson.loads(line)
                reports[int(report["worker"])] = report
                if len(reports) == self.workers:
                    break
        if 0 in reports:
            self.admin = reports[0]["admin"]
        if len(reports) < self.workers or self.complete.is_set():
            return
        if self.ready_file is not None:
            write_ready_file(
                self.ready_file, reports[0]["listen"], reports[0]["admin"], os.getpid()
            )
        self.complete.set()


def _reserve_listen_port(cfg: Config) -> socket.socket:
    """Bind the listen address with SO_REUSEPORT, without listening: the workers bind the same
    port beside it; nothing connects to a socket that does not listen."""
    host, port = cfg.listen_addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as err:
        s.close()
        raise ListenError("listen", host, port, err) from None
    return s
