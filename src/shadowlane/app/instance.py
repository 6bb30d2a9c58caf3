"""One worker's running instance: its listeners, the generation it serves, reload and drain.

An `Instance` owns what lives as long as the process: the listener (and its TLS context), the
admin listener, the metrics, the comparator and its store, the access log and runtime control.
The routes, backends and shadow lanes are a `Generation`, which a reload replaces whole (see
`shadowlane.app.generation`); the listener and every client connection stay open across it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

from shadowlane import __version__, build_kind
from shadowlane.admin import AdminApp
from shadowlane.admin.comparisons import install_comparison_api
from shadowlane.admin.control_api import install_control_api
from shadowlane.admin.migrations_api import install_migrations_api
from shadowlane.app.access_log import AccessLogger
from shadowlane.app.generation import Generation, build_generation, records
from shadowlane.app.heap import HeapRelease
from shadowlane.app.loop_probe import probe_loop_lag
from shadowlane.app.tls import build_tls, tls_shape
from shadowlane.compare.analysis import Analysis
from shadowlane.compare.engine import Comparator
from shadowlane.config import Config, ConfigError, LimitsConfig
from shadowlane.control import Control
from shadowlane.importers import ConfigSource
from shadowlane.metrics import Metrics
from shadowlane.migrate import MigrationRuntime, TransitionError
from shadowlane.proxy import Proxy
from shadowlane.record import RecordWriter
from shadowlane.shadow.offload import close_write_workers, write_worker_stats
from shadowlane.store import LedgerCountRow, LedgerRow, Store, open_store
from shadowlane.upgrades import UpgradeCall, Upgrades
from shadowlane.wire.h2_server import LIMIT_CONTROL_FLOOD, LIMIT_RESET_FLOOD, H2Listener
from shadowlane.wire.listener import Listener, bind_sockets
from shadowlane.wire.overload import LEVEL_NAMES, OverloadState
from shadowlane.wire.server import (
    LIMIT_BODY_RATE,
    LIMIT_CONNECTIONS,
    LIMIT_FDS,
    LIMIT_HEADER_TIMEOUT,
    ServerLimits,
    ServerState,
)
from shadowlane.wire.tunnel import TunnelSet

__all__ = ["Instance", "ListenError", "ReadyHook", "bound_address"]


#: the write worker's gauges (shadow/offload.py), in `write_worker_stats` order
WRITE_WORKER_GAUGES = (
    (
        "shadowlane_write_worker_queued_bytes",
        "Bytes handed to the write worker (big _bulk copies to build or check) and not "
        "answered yet; past 64 MiB new big copies are dropped.",
    ),
    (
        "shadowlane_write_worker_held",
        "Big _bulk copies the write worker built whose end it has not heard of yet; past 64 "
        "new big copies are dropped.",
    ),
    (
        "shadowlane_write_worker_starts",
        "Write worker children started since the process started (more than one: one died).",
    ),
    (
        "shadowlane_write_worker_lost",
        "Copies lost with a write worker child that died, since the process started (each is "
        "in the divergence ledger with its whole scope).",
    ),
)


def _write_worker_gauge(i: int) -> list[tuple[tuple[str, ...], float]]:
    return [((), float(write_worker_stats()[i]))]


log = logging.getLogger("shadowlane")

#: compare settings the running comparator and store keep until a restart (the ignore rules
#: are compiled per shadow and do change on reload)
_COMPARATOR_KEYS = (
    "queue",
    "queue_bytes",
    "flush_interval",
    "batch",
    "cpu_share",
    "processes",
    "nice",
    "priority",
    "examples_per_field",
    "retention",
    "thresholds",
)

#: called once every listener of the process accepts connections: (listen, admin or None)
ReadyHook = Callable[[str, str | None], None]


def bound_address(sock: socket.socket) -> str:
    """`host:port` as the socket got it: port 0 in the config becomes the kernel's pick."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenError(OSError):
    """A listener could not bind; the message names the config key and the address."""

    def __init__(self, key: str, host: str, port: int, err: OSError) -> None:
        reason = "address already in use" if err.errno == errno.EADDRINUSE else str(err)
        shown = f"[{host}]" if ":" in host else host
        super().__init__(err.errno, f"{key} {shown}:{port}: {reason}")


def _fd_ceiling(reserve: int) -> int:
    """The descriptor number past which an accepted connection is closed at once: the soft
    RLIMIT_NOFILE less `reserve` (0: no check)."""
    if not reserve:
        return 0
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(soft - reserve, 1)


def _apply_limits(limits: ServerLimits, overload: OverloadState, cfg: LimitsConfig) -> None:
    """Write a config's limits into the listener's objects, in place (start and reload):
    every open connection reads them from there."""
    limits.max_header_size = cfg.max_header_size
    limits.header_timeout = cfg.header_timeout
    limits.idle_timeout = cfg.idle_timeout
    limits.max_connections = cfg.max_connections
    limits.max_fd = _fd_ceiling(cfg.fd_reserve)
    limits.max_requests_per_connection = cfg.max_requests_per_connection
    limits.min_body_rate = cfg.min_body_rate
    limits.body_rate_window = cfg.body_rate_window
    ov = cfg.overload
    overload.configure(
        ov.rss.shed_shadows,
        ov.rss.refuse,
        ov.in_flight.shed_shadows,
        ov.in_flight.refuse,
        math.ceil(ov.retry_after),
    )


def _kept_until_restart(old: Config, new: Config) -> list[str]:
    """The keys a reload cannot apply (they are what the process listens on, logs to or
    stores in) and that differ: the reload keeps their old values and says so."""
    old_cmp, new_cmp = old.compare, new.compare
    return [
        key
        for key, before, after in (
            ("listen", old.listen, new.listen),
            ("admin", old.admin, new.admin),
            ("access_log", old.access_log, new.access_log),
            ("tls (on/off, client_ca, listen_http2)", tls_shape(old), tls_shape(new)),
            ("compare.store", old_cmp.store, new_cmp.store),
            *((f"compare.{k}", getattr(old_cmp, k), getattr(new_cmp, k)) for k in _COMPARATOR_KEYS),
        )
        if before != after
    ]


def _keeps_tunnel(cfg: Config, call: UpgradeCall) -> bool:
    """A tunnel survives a reload when the new config still routes it the same way: its
    route is there, still allows its protocol, and its backend still lists its endpoint."""
    route = next((rc for rc in cfg.routes if rc.name == call.route), None)
    if route is None or not all(p in route.upgrades for p in call.protocols):
        return False
    if call.backend.name not in route.backend_names:
        return False
    backend = cfg.backends.get(call.backend.name)
    return backend is not None and any(
        ep.authority == call.endpoint.label for ep in backend.endpoints
    )


class _LiveStore:
    """The comparison API's view of whichever store the instance has now (a reload may open
    the first one), analysed with the thresholds it was opened with; empty answers while there
    is none."""

    def __init__(self, inst: Instance) -> None:
        self._inst = inst

    def summary(self) -> list[dict[str, Any]]:
        analysis = self._inst.analysis
        return analysis.summary() if analysis is not None else []

    def fields(self, route: str, target: str) -> list[dict[str, Any]]:
        analysis = self._inst.analysis
        return analysis.fields(route, target) if analysis is not None else []

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        store = self._inst.store
        return store.examples(route, target, field, limit) if store is not None else []

    # the divergence ledger: the store's rows as they are (an empty ledger without a store)

    def ledger(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        reason: str | None = None,
        include_resolved: bool = False,
        limit: int = 100,
    ) -> list[LedgerRow]:
        store = self._inst.store
        if store is None:
            return []
        return store.ledger(route, target, scope, reason, include_resolved, limit)

    def ledger_counts(
        self,
        route: str | None = None,
        target: str | None = None,
        include_resolved: bool = False,
        *,
        scope: str | None = None,
    ) -> list[LedgerCountRow]:
        store = self._inst.store
        if store is None:
            return []
        return store.ledger_counts(route, target, include_resolved, scope=scope)

    def suspect_keys(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        *,
        limit: int | None = None,
    ) -> list[str]:
        store = self._inst.store
        return [] if store is None else store.suspect_keys(route, target, scope, limit=limit)


class _LiveMigrations:
    """The migrations API's view of the instance's runtime: none without migrations."""

    def __init__(self, inst: Instance) -> None:
        self._inst = inst

    async def status(self, name: str | None = None) -> list[dict[str, Any]]:
        runtime = self._inst.migrations
        return [] if runtime is None else await runtime.status(name)

    async def advance(self, name: str, actor: str) -> dict[str, Any]:
        runtime = self._inst.migrations
        if runtime is None:
            raise TransitionError("no migrations here")
        return await runtime.advance(name, actor)

    async def rollback(self, name: str, actor: str, to: str | None) -> dict[str, Any]:
        runtime = self._inst.migrations
        if runtime is None:
            raise TransitionError("no migrations here")
        return await runtime.rollback(name, actor, to)


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
        admin_port: int | None = None,
        restarted: bool = False,
        source: ConfigSource | None = None,
    ):
        self.watch = watch
        #: how a reload reads the config (peers' documents and --services included)
        self.source = (
            source if source is not None or config_path is None else ConfigSource(config_path)
        )
        # with --workers and `listen: ...:0`, the parent resolved the port for all of them
        self.listen_port = listen_port
        #: a restarted worker 0 binds the admin port its predecessor had (`admin.listen: :0`)
        self.admin_port = admin_port
        #: a worker the parent restarted: it serves even if the store is unreachable now
        self.restarted = restarted
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
        self.analysis: Analysis | None = None
        self.comparator: Comparator | None = None
        self._ensure_comparator(cfg)
        #: the thread that writes every recording of this process (made when one records)
        self.record_writer: RecordWriter | None = None
        self._ensure_writer(cfg)
        self.access_log = AccessLogger(cfg.access_log) if cfg.access_log else None
        #: what serves now; a reload replaces it in one assignment
        self.generation = self._build(cfg)
        self.tls = build_tls(cfg.tls, cfg.listen_http2) if cfg.tls is not None else None
        gen = self.generation
        self.overload = OverloadState()
        hr = cfg.limits.overload.heap_release
        #: gives freed heap pages back, so RSS (and the overload watermarks) follow what is used
        self.heap = HeapRelease(self.loop, hr.interval, hr.min_free)
        self.proxy = Proxy(
            gen.routes,
            gen.runtimes,
            gen.backends,
            self.metrics,
            gen.proxy_shadow,
            self.access_log,
            proto=b"https" if self.tls is not None else b"http",
            overload=self.overload,
        )
        #: the open tunnels (upgraded connections): they outlive a reload's generation
        self.tunnels = TunnelSet()
        self.upgrades = Upgrades(
            self.proxy,
            self.metrics,
            self.tunnels,
            self.access_log.tunnel if self.access_log is not None else None,
        )
        self.proxy.on_upgrade = self.upgrades.handle
        self.metrics.set_gauge_provider(
            "shadowlane_tunnels_active",
            "Tunnels (upgraded connections, WebSocket) open now, per route.",
            ("route",),
            self.upgrades.gauge,
        )
        state_path = os.path.join(metrics_dir, "runtime.json") if metrics_dir else None
        self.control = Control(self._live, state_path, writer=worker_id == 0)
        limits = ServerLimits()
        _apply_limits(limits, self.overload, cfg.limits)
        self.state = ServerState(
            self.proxy, limits, overload=self.overload, on_limit=self.metrics.limit_hit
        )
        #: with `listen_http2`, each new connection is sniffed once (ALPN or the preface) and
        #: handed to HTTP/2 or to `self.state`'s HTTP/1.1; without it, nothing changes
        self.h2: H2Listener | None = (
            H2Listener(self.proxy, self.state.limits, self.state, cfg.limits.max_concurrent_streams)
            if cfg.listen_http2
            else None
        )
        self._declare_limit_metrics()
        self.server: Listener | None = None
        self.admin: AdminApp | None = None
        self.stopped = asyncio.Event()
        self._draining = False
        #: follows (and may drive) the fleet's migrations and shared control; worker 0 only
        self.migrations: MigrationRuntime | None = None
        #: the loop-lag probe's task, from start() while `admin.loop_lag_probe` > 0
        self._lag_probe: asyncio.Task[None] | None = None

    def _declare_limit_metrics(self) -> None:
        metrics = self.metrics
        metrics.declare_limits(
            (
                LIMIT_CONNECTIONS,
                LIMIT_FDS,
                LIMIT_HEADER_TIMEOUT,
                LIMIT_BODY_RATE,
                "overload",
                LIMIT_RESET_FLOOD,
                LIMIT_CONTROL_FLOOD,
            )
        )
        state, overload = self.state, self.overload
        metrics.set_gauge_provider(
            "shadowlane_downstream_connections",
            "Client connections open now.",
            (),
            lambda: [((), float(len(state.connections)))],
        )
        metrics.set_gauge_provider(
            "shadowlane_loop_turn_holds",
            "Client connections held until the event loop's ready queue ran (reading past "
            "the turn budget) since the process started.",
            (),
            lambda: [((), float(state.holds))],
        )
        stats = self.heap.stats
        for i, (name, doc) in enumerate(WRITE_WORKER_GAUGES):
            metrics.set_gauge_provider(name, doc, (), functools.partial(_write_worker_gauge, i))
        metrics.set_gauge_provider(
            "shadowlane_heap_releases",
            "Times freed heap memory was handed back to the system (malloc_trim) since the "
            "process started.",
            (),
            lambda: [((), float(stats.releases))],
        )
        metrics.set_gauge_provider(
            "shadowlane_heap_released_bytes",
            "Resident memory those releases gave back, in bytes, since the process started.",
            (),
            lambda: [((), float(stats.released_bytes))],
        )
        heap = self.heap
        metrics.set_gauge_provider(
            "shadowlane_heap_allocated_bytes",
            "Bytes the C allocator has handed out and not had back (glibc's mallinfo2): "
            "resident memory above this is libraries, stacks, Python's arenas and freed "
            "heap not handed back yet.",
            (),
            lambda: [((), float(heap.allocated()))],
        )
        metrics.set_gauge_provider(
            "shadowlane_heap_release_seconds",
            "Time those releases took (on their own thread), since the process started.",
            (),
            lambda: [((), stats.seconds)],
        )
        metrics.set_gauge_provider(
            "shadowlane_overload_level",
            "The overload manager's level: 0 normal, 1 shedding shadow work, 2 refusing new "
            "requests (503).",
            (),
            lambda: [((), float(overload.level))],
        )
        metrics.set_gauge_provider(
            "shadowlane_overload_state",
            "1 for the overload manager's current level, by name.",
            ("level",),
            lambda: [((name,), float(i == overload.level)) for i, name in enumerate(LEVEL_NAMES)],
        )

    @property
    def cfg(self) -> Config:
        """The config serving now (the last one a reload accepted)."""
        return self.generation.cfg

    # ----- the parts a reload replaces -----
    def _ensure_comparator(self, cfg: Config) -> None:
        """Open the store and start a comparator once a shadow compares, or keeps a ledger
        (ordered writes, ids from the primary): the ledger's entries are written by the
        comparator's thread, off the loop, whether or not anything is compared."""
        if self.comparator is not None:
            return
        # migrations keep their state, the audit log and their leases in the store
        if cfg.migrations or any(
            sc.compare_enabled or sc.keeps_ledger for rc in cfg.routes for sc in rc.shadows
        ):
            self.store = open_store(cfg.compare.store, cfg.compare, wait_for_server=self.restarted)
            self.analysis = Analysis(self.store, cfg.compare.thresholds)
            self.comparator = Comparator.from_config(self.store, self.metrics, cfg.compare)
            comparator = self.comparator
            self.metrics.set_gauge_provider(
                "shadowlane_compare_queued",
                "Comparisons waiting for the comparison worker.",
                (),
                lambda: [((), float(comparator.queued))],
            )
            self.metrics.set_gauge_provider(
                "shadowlane_compare_queued_bytes",
                "Captured body bytes the waiting comparisons hold (bounded by "
                "compare.queue_bytes).",
                (),
                lambda: [((), float(comparator.queued_bytes))],
            )
            self.metrics.set_gauge_provider(
                "shadowlane_compare_store_pending_batches",
                "Comparison batches waiting to be written: the store failed the last write "
                "(they are retried at each flush, up to a bound).",
                (),
                lambda: [((), float(comparator.pending_batches))],
            )
            self.metrics.set_gauge_provider(
                "shadowlane_compare_store_lost",
                "Comparisons decided but never stored since start (their batch waited for the "
                "store past the bound).",
                (),
                lambda: [((), float(comparator.stats["store_lost"]))],
            )
            self.metrics.set_gauge_provider(
                "shadowlane_ledger_queued",
                "Divergence ledger entries waiting for the comparison worker to store them.",
                (),
                lambda: [((), float(comparator.ledger_queued))],
            )
            self.metrics.set_gauge_provider(
                "shadowlane_compare_children",
                "Comparison child processes running (compare.processes when all is well).",
                (),
                lambda: [((), float(comparator.children_alive))],
            )
            self.metrics.set_gauge_provider(
                "shadowlane_compare_child_restarts",
                "Comparison children that died with a job (dropped) and were started again, "
                "since this process started.",
                (),
                lambda: [((), float(comparator.stats["restarts"]))],
            )

    def _ensure_migrations(self, cfg: Config) -> None:
        """Follow the shared state once there are migrations, or a store shared by a fleet
        (PostgreSQL: runtime control is the fleet's then). SQLite without migrations keeps
        control local, as before."""
        store = self.store
        if self.migrations is not None or store is None or self.admin is None:
            return
        shared = store.kind == "postgresql"
        if not (cfg.migrations or shared):
            return
        self.migrations = MigrationRuntime(
            store, lambda: self.cfg, self.control, self.metrics, share_control=shared
        )
        self.migrations.start()
        self.admin.set_health_detail(self.migrations.health)

    def _ensure_writer(self, cfg: Config) -> None:
        if self.record_writer is None and records(cfg):
            self.record_writer = RecordWriter(self.metrics)

    def _build(self, cfg: Config) -> Generation:
        comparator = self.comparator
        if comparator is None:
            return build_generation(cfg, self.metrics, None, self.record_writer)
        return build_generation(
            cfg,
            self.metrics,
            comparator.submit,
            self.record_writer,
            record_divergence=comparator.record_divergence,
            compare_room=comparator.has_room,
        )

    def _live(self) -> Generation:
        return self.generation

    def reload(self) -> list[str]:
        """Swap in the config file's current content; on any problem keep serving the old one.

        In-flight requests finish on the objects they started with; keep-alive connections
        stay (the listener is untouched). Returns the problems (empty when reloaded).
        """
        if self.source is None:
            return ["no config file to reload"]
        try:
            cfg, notes = self.source.load_with_notes()
        except ConfigError as err:
            problems = err.errors
        except OSError as err:
            problems = [f"{self.config_path}: {err.strerror or err}"]
        else:
            problems = []
            for note in notes:
                log.warning("reload: %s", note)
        if problems:
            for line in problems:
                log.error("reload refused, still serving the previous config: %s", line)
            return problems
        for key in _kept_until_restart(self.cfg, cfg):
            log.warning("reload: %s changed; that takes a restart (keeping the old value)", key)
        try:
            had_comparator = self.comparator is not None
            self._ensure_comparator(cfg)
            if not had_comparator and self.comparator is not None:
                self.comparator.start(_running_loop())  # compare turned on by this reload
            self._ensure_writer(cfg)
            if self.record_writer is not None:
                self.record_writer.start()  # no-op when it runs already
            gen = self._build(cfg)
            if self.tls is not None and cfg.tls is not None:
                self.tls.load_cert_chain(cfg.tls.cert, cfg.tls.key)  # new handshakes only
        except (OSError, ValueError, ssl.SSLError) as err:
            log.error("reload refused, still serving the previous config: %s", err)
            return [str(err)]
        old, self.generation = self.generation, gen
        gen.serve_on(self.proxy)
        # in place: every open connection reads the limits from there
        _apply_limits(self.state.limits, self.overload, cfg.limits)
        hr = cfg.limits.overload.heap_release
        self.heap.configure(hr.interval, hr.min_free)
        if self.h2 is not None:  # for connections accepted from now on
            self.h2.max_streams = cfg.limits.max_concurrent_streams
        self.control.reset()
        if self.admin is not None:
            self._ensure_migrations(cfg)
        old.retire(self.loop)
        grace = cfg.limits.tunnel_drain_timeout
        closing = self.upgrades.retire(lambda call: _keeps_tunnel(cfg, call), grace)
        if closing:
            log.warning(
                "reload: %d tunnel(s) lost their route or backend; closing them in %gs",
                closing,
                grace,
            )
        log.warning("reloaded %s: %d route(s)", self.config_path, len(cfg.routes))
        return []

    async def _watch(self) -> None:
        """--watch: reload when the file (or a file of the directory) changes, checked every
        second; a mounted ConfigMap's `..data` swap changes the inodes, which count too."""
        assert self.source is not None
        last = self.source.fingerprint()
        while not self._draining:
            await asyncio.sleep(1.0)
            now = self.source.fingerprint()
            if now != last:
                last = now
                self.reload()

    def _reload_all(self) -> list[str]:
        """The admin API's reload: with workers, ask the parent to SIGHUP them all."""
        if self.workers > 1:
            # check the file here first, so the caller hears about a bad one; then every
            # worker reloads it (the parent relays SIGHUP to all)
            if self.source is None:
                return ["no config file to reload"]
            try:
                self.source.load()
            except ConfigError as err:
                return err.errors
            except OSError as err:
                return [f"{self.config_path}: {err.strerror or err}"]
            os.kill(os.getppid(), signal.SIGHUP)
            return []
        return self.reload()

    async def start(self) -> None:
        if self.comparator is not None:
            self.comparator.start(asyncio.get_running_loop())
        if self.record_writer is not None:
            self.record_writer.start()
        cfg = self.cfg
        host, port = cfg.listen_addr
        if self.listen_port is not None:
            port = self.listen_port
        try:
            socks = bind_sockets(host, port, reuse_port=self.workers > 1, backlog=4096)
        except OSError as err:
            raise ListenError("listen", host, port, err) from None
        self.server = Listener(
            self.loop,
            socks,
            self.state.protocol_factory if self.h2 is None else self.h2.protocol_factory,
            tls=self.tls,
            # a client that never answers the TLS close must not hold the drain
            tls_shutdown_timeout=2.0 if self.tls is not None else None,
            on_exhausted=lambda: self.state.limit_hit(LIMIT_FDS),
        )
        self.server.start()
        self.listen_address = bound_address(socks[0])
        self.state.start_sweeping()
        if self.worker_id == 0:
            token = os.environ.get(cfg.admin.token_env) if cfg.admin.token_env else None
            self.admin = AdminApp(self.metrics, token=token)
            live = _LiveStore(self)
            install_comparison_api(self.admin, live, ledger=live)
            install_control_api(self.admin, self.control, self._reload_all)
            install_migrations_api(self.admin, _LiveMigrations(self), TransitionError)
            self._ensure_migrations(cfg)
            if self.migrations is not None:
                # serve the first request on the fleet's position, not the file's
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.migrations.primed.wait(), 15.0)
            ahost, aport = cfg.admin.listen_addr
            if self.admin_port is not None:
                aport = self.admin_port
            try:
                admin_server = await self.admin.start(ahost, aport)
            except OSError as err:
                self.server.close()
                raise ListenError("admin.listen", ahost, aport, err) from None
            self.admin_address = bound_address(admin_server.sockets[0])
            self.admin.set_ready(True)
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.drain)):
            self.loop.add_signal_handler(sig, handler)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.control.start_polling()
        self.metrics.start_flushing(self.loop)
        self.heap.start()
        if cfg.admin.loop_lag_probe > 0:
            self._lag_probe = self.loop.create_task(
                probe_loop_lag(cfg.admin.loop_lag_probe, self.metrics.observe_loop_lag)
            )
        if self.watch and self.source is not None:
            self._watcher: asyncio.Task[None] | None = self.loop.create_task(self._watch())
        if self.worker_id == 0:
            print(
                f"shadowlane {__version__} ({build_kind()}): listening on "
                f"{'https' if self.tls is not None else 'http'}://{self.listen_address} "
                f"({self.workers} worker{'s' if self.workers > 1 else ''}), "
                f"admin on http://{self.admin_address} (/metrics, /healthz), "
                f"{len(cfg.routes)} route(s)",
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
        h2 = self.h2
        if h2 is not None:
            h2.start_drain()  # GOAWAY: the streams taken finish, no new ones
        now = self.loop.time()
        deadline = now + self.cfg.limits.drain_timeout
        # tunnels run on for their own grace (they never end by themselves), counted from now
        tunnels_deadline = now + self.cfg.limits.tunnel_drain_timeout
        while (self.state.busy() or (h2 is not None and h2.busy())) and (
            self.loop.time() < deadline
        ):
            await asyncio.sleep(0.02)
        for conn in list(self.state.connections):
            if conn.busy:
                conn.abort()  # still busy at the deadline: cut, never pass off as complete
            else:
                conn.close()
        if h2 is not None:
            for h2conn in list(h2.connections):
                if h2conn.busy:
                    h2conn.abort()
                else:
                    h2conn.close()
            h2.close()
        await self.tunnels.drain(tunnels_deadline)
        self.control.stop()
        self.heap.stop()
        if self._lag_probe is not None:
            self._lag_probe.cancel()
        if self.migrations is not None:
            await self.migrations.stop()  # hands its leases over at once
        await self.generation.shadow.drain(min(5.0, self.cfg.limits.drain_timeout))
        close_write_workers()
        if self.record_writer is not None:
            # write what is queued and close the files, off the loop (bounded: a disk that
            # takes no writes costs what is queued, not the exit)
            await asyncio.to_thread(self.record_writer.stop, 5.0)
        if self.comparator is not None:
            # compare what is queued and flush the store, off the loop
            await asyncio.to_thread(self.comparator.stop, 10.0)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        self.state.close()
        for backend in self.generation.backends.values():
            backend.close()
        if self.admin is not None:
            await self.admin.close()
        if self.access_log is not None:
            self.access_log.close()
        self.metrics.stop_flushing()  # the last counts, into the shared files with workers
        self.stopped.set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running in this thread, if any: a reload runs on the worker's loop (signal
    handler, admin API), where the comparator's children are fed from it."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
