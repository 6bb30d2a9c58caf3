"""Assembly: turn a `Config` into running layers (pools, routes, shadows, proxy, listeners).

Also the process model: `run()` serves in this process; `run_workers()` forks N workers that
share the listen port through SO_REUSEPORT and are supervised by the parent, which relays
SIGTERM (drain) and SIGHUP (reload) to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from shadowlane import __version__, build_kind
from shadowlane.admin import AdminApp
from shadowlane.admin.comparisons import install_comparison_api
from shadowlane.admin.control_api import install_control_api
from shadowlane.compare.engine import Comparator
from shadowlane.compare.settings import compile_settings
from shadowlane.config import BackendConfig, Config, ConfigError, TlsConfig, load_config
from shadowlane.control import Control
from shadowlane.metrics import Metrics, mark_process_dead, reset_multiprocess_dir
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


def build_tls(cfg: TlsConfig) -> ssl.SSLContext:
    """The listener's TLS context; with `client_ca`, clients must present a certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.cert, cfg.key)
    if cfg.client_ca is not None:
        ctx.load_verify_locations(cfg.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


#: compare settings the running comparator and store keep until a restart (the ignore rules
#: are compiled per shadow and do change on reload)
_COMPARATOR_KEYS = (
    "queue",
    "flush_interval",
    "batch",
    "cpu_share",
    "examples_per_field",
    "retention",
    "thresholds",
)


def _tls_shape(cfg: Config) -> tuple[bool, str | None]:
    return cfg.tls is not None, cfg.tls.client_ca if cfg.tls is not None else None


class _LiveStore:
    """The comparison API's view of whichever store the instance has now (a reload may open
    the first one); empty answers while there is none."""

    def __init__(self, inst: Instance) -> None:
        self._inst = inst

    def summary(self) -> list[dict[str, Any]]:
        store = self._inst.store
        return store.summary() if store is not None else []

    def fields(self, route: str, target: str) -> list[dict[str, Any]]:
        store = self._inst.store
        return store.fields(route, target) if store is not None else []

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        store = self._inst.store
        return store.examples(route, target, field, limit) if store is not None else []


#: called once every listener of the process accepts connections: (listen, admin or None)
ReadyHook = Callable[[str, str | None], None]


def bound_address(server: asyncio.base_events.Server) -> str:
    """`host:port` as the socket got it: port 0 in the config becomes the kernel's pick."""
    host, port = server.sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        watch: bool = False,
        *,
        listen_port: int | None = None,
        on_ready: ReadyHook | None = None,
    ):
        self.cfg = cfg
        self.watch = watch
        # with --workers and `listen: ...:0`, the parent resolved the port for all of them
        self.listen_port = listen_port
        self.on_ready = on_ready
        #: the bound addresses ("host:port"), known once start() has bound them
        self.listen_address = ""
        self.admin_address: str | None = None
        self.config_path = config_path
        self.worker_id = worker_id
        self.workers = workers
        # with several workers, counters live in files in metrics_dir and a scrape (served by
        # worker 0) sums them over all workers
        self.metrics = Metrics(multiprocess_dir=metrics_dir)
        self.loop = asyncio.get_running_loop()
        self.store: Store | None = None
        self.comparator: Comparator | None = None
        self._ensure_comparator(cfg)
        self.access_log = AccessLogger(cfg.access_log) if cfg.access_log else None
        self.backends, self.routes, self.shadow, runtimes = self._build(cfg)
        self.tls = build_tls(cfg.tls) if cfg.tls is not None else None
        self.proxy = Proxy(
            self.routes,
            runtimes,
            self.backends,
            self.metrics,
            self.shadow if self.shadow.active else None,
            self.access_log,
            proto=b"https" if self.tls is not None else b"http",
        )
        state_path = os.path.join(metrics_dir, "runtime.json") if metrics_dir else None
        self.control = Control(self._live, state_path, writer=worker_id == 0)
        limits = cfg.limits
        self.state = ServerState(
            self.proxy,
            ServerLimits(limits.max_header_size, limits.header_timeout, limits.idle_timeout),
        )
        self.server: asyncio.base_events.Server | None = None
        self.admin: AdminApp | None = None
        self.stopped = asyncio.Event()
        self._draining = False

    # ----- the parts a reload replaces -----
    def _ensure_comparator(self, cfg: Config) -> None:
        if self.comparator is not None:
            return
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

    def _build(
        self, cfg: Config
    ) -> tuple[dict[str, BackendPool], RouteTable, ShadowDispatcher, dict[str, RouteRuntime]]:
        backends = {name: build_backend(name, b) for name, b in cfg.backends.items()}
        routes = RouteTable(cfg.routes)
        compare_cfg = cfg.compare
        shadow = ShadowDispatcher(
            self.metrics,
            cfg,
            build_pool=build_backend,
            compare_submit=self.comparator.submit if self.comparator else None,
            compile_settings=lambda sc, route: compile_settings(sc, route.config, compare_cfg),
        )
        runtimes = {}
        for route in routes.routes:
            max_body = route.config.max_body
            if max_body is None:
                max_body = cfg.limits.max_body
            runtimes[route.name] = RouteRuntime(route, max_body, shadow.plan(route))
        return backends, routes, shadow, runtimes

    def _live(self) -> Instance:
        return self

    def reload(self) -> list[str]:
        """Swap in the config file's current content; on any problem keep serving the old one.

        In-flight requests finish on the objects they started with; keep-alive connections
        stay (the listener is untouched). Returns the problems (empty when reloaded).
        """
        if self.config_path is None:
            return ["no config file to reload"]
        try:
            cfg = load_config(self.config_path)
        except ConfigError as err:
            problems = err.errors
        except OSError as err:
            problems = [f"{self.config_path}: {err.strerror or err}"]
        else:
            problems = []
        if problems:
            for line in problems:
                log.error("reload refused, still serving the previous config: %s", line)
            return problems
        old_cmp, new_cmp = self.cfg.compare, cfg.compare
        kept = [
            key
            for key, old, new in (
                ("listen", self.cfg.listen, cfg.listen),
                ("admin", self.cfg.admin, cfg.admin),
                ("access_log", self.cfg.access_log, cfg.access_log),
                ("tls (on/off, client_ca)", _tls_shape(self.cfg), _tls_shape(cfg)),
                ("compare.store", old_cmp.store, new_cmp.store),
                *(
                    (f"compare.{k}", getattr(old_cmp, k), getattr(new_cmp, k))
                    for k in _COMPARATOR_KEYS
                ),
            )
            if old != new
        ]
        for key in kept:
            log.warning("reload: %s changed; that takes a restart (keeping the old value)", key)
        try:
            had_comparator = self.comparator is not None
            self._ensure_comparator(cfg)
            if not had_comparator and self.comparator is not None:
                self.comparator.start()  # compare turned on by this reload
            backends, routes, shadow, runtimes = self._build(cfg)
            if self.tls is not None and cfg.tls is not None:
                self.tls.load_cert_chain(cfg.tls.cert, cfg.tls.key)  # new handshakes only
        except (OSError, ValueError, ssl.SSLError) as err:
            log.error("reload refused, still serving the previous config: %s", err)
            return [str(err)]
        old_backends, old_shadow = self.backends, self.shadow
        self.cfg, self.backends, self.routes, self.shadow = cfg, backends, routes, shadow
        proxy = self.proxy
        proxy.routes, proxy.runtimes, proxy.backends = routes, runtimes, backends
        proxy.shadow = shadow if shadow.active else None
        limits = self.state.limits
        limits.max_header_size = cfg.limits.max_header_size
        limits.header_timeout = cfg.limits.header_timeout
        limits.idle_timeout = cfg.limits.idle_timeout
        self.control.reset()
        # the old pools finish what they carry: idle connections close now, busy ones on release
        for backend in old_backends.values():
            backend.close()
        self.loop.create_task(old_shadow.drain(5.0))
        log.warning("reloaded %s: %d route(s)", self.config_path, len(cfg.routes))
        return []

    async def _watch(self) -> None:
        """--watch: reload when the file's modification time changes (checked every second)."""
        assert self.config_path is not None
        last = os.stat(self.config_path).st_mtime_ns
        while not self._draining:
            await asyncio.sleep(1.0)
            try:
                now = os.stat(self.config_path).st_mtime_ns
            except OSError:
                continue
            if now != last:
                last = now
                self.reload()

    def _reload_all(self) -> list[str]:
        """The admin API's reload: with workers, ask the parent to SIGHUP them all."""
        if self.workers > 1:
            # check the file here first, so the caller hears about a bad one; then every
            # worker reloads it (the parent relays SIGHUP to all)
            if self.config_path is None:
                return ["no config file to reload"]
            try:
                load_config(self.config_path)
            except ConfigError as err:
                return err.errors
            except OSError as err:
                return [f"{self.config_path}: {err.strerror or err}"]
            os.kill(os.getppid(), signal.SIGHUP)
            return []
        return self.reload()

    async def start(self) -> None:
        if self.comparator is not None:
            self.comparator.start()
        host, port = self.cfg.listen_addr
        if self.listen_port is not None:
            port = self.listen_port
        try:
            self.server = await self.loop.create_server(
                self.state.protocol_factory,
                host,
                port,
                reuse_port=self.workers > 1,
                backlog=4096,
                ssl=self.tls,
                # a client that never answers the TLS close must not hold the drain
                ssl_shutdown_timeout=2.0 if self.tls is not None else None,
            )
        except OSError as err:
            raise ListenError("listen", host, port, err) from None
        self.listen_address = bound_address(self.server)
        if self.worker_id == 0:
            token = os.environ.get(self.cfg.admin.token_env) if self.cfg.admin.token_env else None
            self.admin = AdminApp(self.metrics, token=token)
            install_comparison_api(self.admin, _LiveStore(self))
            install_control_api(self.admin, self.control, self._reload_all)
            ahost, aport = self.cfg.admin.listen_addr
            try:
                admin_server = await self.admin.start(ahost, aport)
            except OSError as err:
                self.server.close()
                raise ListenError("admin.listen", ahost, aport, err) from None
            self.admin_address = bound_address(admin_server)
            self.admin.set_ready(True)
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.drain)):
            self.loop.add_signal_handler(sig, handler)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.control.start_polling()
        self.metrics.start_flushing(self.loop)
        if self.watch and self.config_path is not None:
            self._watcher: asyncio.Task[None] | None = self.loop.create_task(self._watch())
        if self.worker_id == 0:
            print(
                f"shadowlane {__version__} ({build_kind()}): listening on "
                f"{'https' if self.tls is not None else 'http'}://{self.listen_address} "
                f"({self.workers} worker{'s' if self.workers > 1 else ''}), "
                f"admin on http://{self.admin_address} (/metrics, /healthz), "
                f"{len(self.cfg.routes)} route(s)",
                file=sys.stderr,
                flush=True,
            )
        if self.on_ready is not None:
            self.on_ready(self.listen_address, self.admin_address)

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
        while self.state.busy() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.state.connections):
            if conn.busy:
                conn.abort()  # still busy at the deadline: cut, never pass off as complete
            else:
                conn.close()
        self.control.stop()
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
        self.metrics.stop_flushing()  # the last counts, into the shared files with workers
        self.stopped.set()


def _tune_gc() -> None:
    """Objects made at start-up (config, routes, pools, modules) live for the whole process:
    move them out of the collector's sight, and collect the young generation less often. A
    full collection walks every tracked object; with thousands of shadow copies in flight, a
    pause shows directly in the primary's p99."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


async def _serve(
    cfg: Config,
    config_path: str | None,
    worker_id: int,
    workers: int,
    metrics_dir: str | None,
    watch: bool,
    listen_port: int | None,
    on_ready: ReadyHook | None,
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
    )
    await inst.start()
    _tune_gc()
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
) -> int:
    _install_uvloop()
    asyncio.run(
        _serve(cfg, config_path, worker_id, workers, metrics_dir, watch, listen_port, on_ready)
    )
    return 0


def run_workers(
    cfg: Config,
    config_path: str | None,
    workers: int,
    *,
    watch: bool = False,
    ready_file: str | None = None,
) -> int:
    """Serve in this process, or fork `workers` processes sharing the port (SO_REUSEPORT);
    relay signals; reap them. `ready_file` is written once every listener accepts."""
    if workers <= 1:
        try:
            return run(
                cfg,
                config_path,
                watch=watch,
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
    pids: list[int] = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            reservation.close()
            os._exit(_worker(cfg, config_path, i, workers, metrics_dir, watch, port, ready_w))
        pids.append(pid)
    os.close(ready_w)
    readiness = _Readiness(ready_r, workers, ready_file)
    readiness.start()

    def relay(signum: int, _frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, relay)
    status = 0
    remaining = set(pids)
    while remaining:
        try:
            pid, code = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid not in remaining:
            continue
        remaining.discard(pid)
        # a worker that is gone must stop counting in the summed gauges (queue depth, ...)
        mark_process_dead(pid, metrics_dir)
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1
            if not readiness.complete.is_set():
                # a worker that fails before the whole set serves (its admin port is taken,
                # say) fails the start: serving with a hole, or without admin, is worse
                relay(signal.SIGTERM, None)
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
) -> int:
    """One forked worker's life; its exit code. A start-up error is printed here, since the
    parent's CLI never sees a child's exception."""

    def report(listen: str, admin: str | None) -> None:
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


class _Readiness(threading.Thread):
    """The parent's side of the workers' ready reports: once every worker said it listens,
    write the ready file (listen address and worker 0's admin address, the parent's PID)."""

    def __init__(self, fd: int, workers: int, ready_file: str | None) -> None:
        super().__init__(name="shadowlane-readiness", daemon=True)
        self.fd = fd
        self.workers = workers
        self.ready_file = ready_file
        self.complete = threading.Event()

    def run(self) -> None:
        reports: dict[int, dict[str, Any]] = {}
        with os.fdopen(self.fd, "rb") as pipe:
            for line in pipe:  # EOF once every worker wrote its line or died
                report = orjson.loads(line)
                reports[int(report["worker"])] = report
                if len(reports) == self.workers:
                    break
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
