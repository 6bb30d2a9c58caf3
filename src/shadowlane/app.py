"""Assembly: turn a `Config` into running layers (pools, routes, shadows, proxy, listeners).

Also the process model: `run()` serves in this process; `run_workers()` forks N workers that
share the listen port through SO_REUSEPORT and are supervised by the parent, which relays
SIGTERM (drain) and SIGHUP (reload) to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from typing import IO, Any

import orjson

from shadowlane import __version__
from shadowlane.admin import AdminApp
from shadowlane.admin.comparisons import install_comparison_api
from shadowlane.compare.engine import Comparator
from shadowlane.compare.settings import compile_settings
from shadowlane.config import BackendConfig, Config, load_config
from shadowlane.metrics import Metrics, reset_multiprocess_dir
from shadowlane.proxy import Proxy, RouteRuntime
from shadowlane.routing import RouteTable
from shadowlane.shadow.dispatcher import ShadowDispatcher
from shadowlane.store import Store, open_store
from shadowlane.wire.messages import Request
from shadowlane.wire.server import ServerLimits, ServerState
from shadowlane.wire.upstream import BackendPool, EndpointPool

log = logging.getLogger("shadowlane")


def build_backend(name: str, cfg: BackendConfig) -> BackendPool:
    endpoints = []
    for ep in cfg.endpoints:
        ctx: ssl.SSLContext | None = None
        if ep.scheme == "https":
            ctx = ssl.create_default_context(cafile=cfg.ca_file)
            if not cfg.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        endpoints.append(
            EndpointPool(
                ep.host,
                ep.port,
                connect_timeout=cfg.connect_timeout,
                max_connections=cfg.max_connections,
                max_idle=cfg.max_idle,
                ssl_context=ctx,
                server_hostname=ep.host if ctx else None,
            )
        )
    return BackendPool(name, endpoints, cfg.timeout)


class AccessLogger:
    """One JSON line per request, buffered and flushed once a second (and at exit), so a line
    costs one buffered write and reaches a file or pipe within about a second."""

    FLUSH_EVERY = 1.0

    def __init__(self, target: bool | str) -> None:
        self._own = False
        self.out: IO[bytes]
        if target is True or target == "-":
            self.out = sys.stdout.buffer
        else:
            self.out = open(str(target), "ab", buffering=65536)  # noqa: SIM115 - lives with the app
            self._own = True
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None

    def __call__(
        self,
        req: Request,
        route: str,
        backend: str,
        status: int,
        seconds: float,
        shadows: dict[str, str] | None,
    ) -> None:
        record: dict[str, Any] = {
            "ts": time.time(),
            "request_id": req.request_id,
            "client": req.client_addr,
            "method": req.method,
            "path": req.target.decode("latin-1"),
            "host": req.host,
            "route": route,
            "backend": backend,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        if shadows:
            record["shadows"] = shadows
        self.out.write(orjson.dumps(record) + b"\n")
        if not self._dirty:
            self._dirty = True
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_EVERY, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._dirty:
            self._dirty = False
            self.flush()

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._own:
            self.out.close()


class ListenError(OSError):
    """A listener could not bind; the message names the config key and the address."""

    def __init__(self, key: str, host: str, port: int, err: OSError) -> None:
        reason = "address already in use" if err.errno == errno.EADDRINUSE else str(err)
        shown = f"[{host}]" if ":" in host else host
        super().__init__(err.errno, f"{key} {shown}:{port}: {reason}")


class Instance:
    """Everything one worker process runs."""

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        worker_id: int = 0,
        workers: int = 1,
        metrics_dir: str | None = None,
    ):
        self.cfg = cfg
        self.config_path = config_path
        self.worker_id = worker_id
        self.workers = workers
        # with several workers, counters live in files in metrics_dir and a scrape (served by
        # worker 0) sums them over all workers
        self.metrics = Metrics(multiprocess_dir=metrics_dir)
        self.loop = asyncio.get_running_loop()
        self.backends = {name: build_backend(name, b) for name, b in cfg.backends.items()}
        self.routes = RouteTable(cfg.routes)
        self.store: Store | None = None
        self.comparator: Comparator | None = None
        if any(sc.compare_enabled for rc in cfg.routes for sc in rc.shadows):
            self.store = open_store(cfg.compare.store, cfg.compare)
            self.comparator = Comparator.from_config(self.store, self.metrics, cfg.compare)
            comparator = self.comparator
            self.metrics.set_gauge_provider(
                "shadowlane_compare_queued",
                "Comparisons waiting for the comparison worker.",
                (),
                lambda: [((), float(comparator.queued))],
            )
        self.shadow = ShadowDispatcher(
            self.metrics,
            self.backends,
            cfg,
            compare_submit=self.comparator.submit if self.comparator else None,
            compile_settings=lambda sc, route: compile_settings(sc, route.config, cfg.compare),
        )
        runtimes = {}
        for route in self.routes.routes:
            max_body = route.config.max_body
            if max_body is None:
                max_body = cfg.limits.max_body
            runtimes[route.name] = RouteRuntime(route, max_body, self.shadow.plan(route))
        self.access_log = AccessLogger(cfg.access_log) if cfg.access_log else None
        self.proxy = Proxy(
            self.routes,
            runtimes,
            self.backends,
            self.metrics,
            self.shadow if self.shadow.active else None,
            self.access_log,
        )
        limits = cfg.limits
        self.state = ServerState(
            self.proxy,
            ServerLimits(limits.max_header_size, limits.header_timeout, limits.idle_timeout),
        )
        self.server: asyncio.base_events.Server | None = None
        self.admin: AdminApp | None = None
        self.stopped = asyncio.Event()
        self._draining = False

    async def start(self) -> None:
        if self.comparator is not None:
            self.comparator.start()
        host, port = self.cfg.listen_addr
        try:
            self.server = await self.loop.create_server(
                self.state.protocol_factory,
                host,
                port,
                reuse_port=self.workers > 1,
                backlog=4096,
            )
        except OSError as err:
            raise ListenError("listen", host, port, err) from None
        if self.worker_id == 0:
            token = os.environ.get(self.cfg.admin.token_env) if self.cfg.admin.token_env else None
            self.admin = AdminApp(self.metrics, token=token)
            install_comparison_api(self.admin, self.store)
            ahost, aport = self.cfg.admin.listen_addr
            try:
                await self.admin.start(ahost, aport)
            except OSError as err:
                self.server.close()
                raise ListenError("admin.listen", ahost, aport, err) from None
            self.admin.set_ready(True)
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.drain)):
            self.loop.add_signal_handler(sig, handler)
        if self.worker_id == 0:
            ahost, aport = self.cfg.admin.listen_addr
            print(
                f"shadowlane {__version__}: listening on http://{host}:{port} "
                f"({self.workers} worker{'s' if self.workers > 1 else ''}), "
                f"admin on http://{ahost}:{aport} (/metrics, /healthz), "
                f"{len(self.cfg.routes)} route(s)",
                file=sys.stderr,
                flush=True,
            )

    def drain(self) -> None:
        """SIGTERM: stop accepting, finish in-flight requests (up to the deadline), exit 0."""
        if self._draining:
            return
        self._draining = True
        self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        if self.admin is not None:
            self.admin.set_ready(False)
        if self.server is not None:
            self.server.close()
        self.state.start_drain()
        deadline = self.loop.time() + self.cfg.limits.drain_timeout
        while self.state.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.state.connections):
            conn.close()
        await self.shadow.drain(min(5.0, self.cfg.limits.drain_timeout))
        if self.comparator is not None:
            # compare what is queued and flush the store, off the loop
            await asyncio.to_thread(self.comparator.stop, 10.0)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        self.state.close()
        for backend in self.backends.values():
            backend.close()
        if self.admin is not None:
            await self.admin.close()
        if self.access_log is not None:
            self.access_log.close()
        self.stopped.set()


async def _serve(
    cfg: Config, config_path: str | None, worker_id: int, workers: int, metrics_dir: str | None
) -> None:
    inst = Instance(cfg, config_path, worker_id, workers, metrics_dir)
    await inst.start()
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
) -> int:
    _install_uvloop()
    asyncio.run(_serve(cfg, config_path, worker_id, workers, metrics_dir))
    return 0


def run_workers(cfg: Config, config_path: str | None, workers: int) -> int:
    """Fork `workers` processes sharing the port (SO_REUSEPORT); relay signals; reap them."""
    if workers <= 1:
        return run(cfg, config_path)
    _check_bindable(cfg)
    metrics_dir = tempfile.mkdtemp(prefix="shadowlane-metrics-")
    reset_multiprocess_dir(metrics_dir)
    pids: list[int] = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run(cfg, config_path, i, workers, metrics_dir)
            finally:
                os._exit(code)
        pids.append(pid)

    def relay(signum: int, _frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, relay)
    status = 0
    for pid in pids:
        while True:
            try:
                _, code = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _check_bindable(cfg: Config) -> None:
    """Fail in the parent, with one clear message, when the port is taken."""
    host, port = cfg.listen_addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ListenError("listen", host, port, err) from None


def load(path: str) -> Config:
    return load_config(path)
