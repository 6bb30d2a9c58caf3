"""`shadowlane demo`: everything on embedded defaults, in one process and one event loop.

What runs (all on 127.0.0.1):

- three demo backends (see `backends`): `v1`, `v1b` (a second v1, the noise `secondary`) and
  `v2`, which differs from v1 in a few fields and in one endpoint;
- the proxy, built from a `Config` made here (`demo_config`): route `orders` (`/orders`) and
  route `catalog` (everything else) go to v1 and are shadowed to v2 with comparison, v1b
  measuring noise; comparisons go to a SQLite store in a temporary directory;
- the admin server with the dashboard, on `admin_port`;
- a traffic generator (see `traffic`): a few requests per second through the proxy.

It prints what to open and runs until Ctrl-C (or SIGTERM), or for `duration` seconds, or until
`requests` requests were sent and compared; then it prints a short summary and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

import orjson

from shadowlane.admin import AdminApp, AdminRequest
from shadowlane.config import Config, ConfigError, parse_config
from shadowlane.demo.backends import DemoBackend, start_backend
from shadowlane.demo.traffic import TrafficStats, run_traffic

__all__ = ["add_demo_arguments", "demo_config", "main", "run_demo", "run_demo_from_args"]

HOST = "127.0.0.1"
#: noise fields every demo answer carries; the comparison must not report them
NOISE_FIELDS = ("body.request_uuid", "body.generated_at", "body.took")
#: what v2 really changed; the comparison must report these
V2_DIFFERENCES: dict[str, tuple[str, ...]] = {
    "orders": (
        "body.customer_name",
        "body.customer",
        "body.total",
        "body.currency",
        "headers.x-api-version",
        "status",
        "body.status",
        "body.links.self",
    ),
    # v2 serves the catalog unchanged (its new order is compared as a set): only noise.
    "catalog": (),
}


def demo_config(
    listen_port: int,
    admin_port: int,
    v1: int,
    v1b: int,
    v2: int,
    store: str,
) -> Config:
    """The demo's proxy config (the same as a YAML file would give; see docs/dashboard.md)."""
    compare: dict[str, Any] = {"secondary": "v1b"}
    data: dict[str, Any] = {
        "listen": f"{HOST}:{listen_port}",
        "admin": {"listen": f"{HOST}:{admin_port}"},
        "backends": {
            "v1": {"endpoints": [f"http://{HOST}:{v1}"], "timeout": "5s"},
            "v1b": {"endpoints": [f"http://{HOST}:{v1b}"], "timeout": "5s"},
            "v2": {"endpoints": [f"http://{HOST}:{v2}"], "timeout": "5s"},
        },
        "routes": [
            {
                "name": "orders",
                "match": {"path_prefix": "/orders"},
                "backend": "v1",
                "shadows": [{"backend": "v2", "compare": compare}],
            },
            {
                "name": "catalog",
                "match": {"path_prefix": "/"},
                "backend": "v1",
                # v2 lists the catalog in another order: compared as a set, that is no change.
                "shadows": [{"backend": "v2", "compare": {**compare, "unordered": ["body.items"]}}],
            },
        ],
        "compare": {"store": store},
    }
    return parse_config(orjson.dumps(data).decode(), "<demo config>")


async def _admin_get(admin: AdminApp, path: str) -> Any:
    """GET an admin API path in-process (no socket): the admin app's own dispatch."""
    response = await admin.handle(AdminRequest(method="GET", path=path))
    if response.status != 200:
        return None
    return orjson.loads(response.body)


def _print_banner(out: TextIO, listen: str, admin: str, store: str, rate: float) -> None:
    proxy = f"http://{listen}"
    dash = f"http://{admin}"
    print(
        f"""
shadowlane demo: v1 answers, v2 is shadowed and compared, a second v1 measures noise.

  dashboard   {dash}/
  proxy       {proxy}   (routes: /orders -> orders, everything else -> catalog)
  try         curl -s {proxy}/orders/7
              curl -s {dash}/api/comparisons/summary
  traffic     about {rate:g} requests/s through the proxy
  store       {store}

Ctrl-C stops it.
""",
        file=out,
        flush=True,
    )


def _print_summary(out: TextIO, summary: list[dict[str, Any]] | None, stats: TrafficStats) -> None:
    print(
        f"\ntraffic: {stats.sent} sent, {stats.answered} answered, {stats.errors} failed",
        file=out,
    )
    for entry in summary or []:
        top = ", ".join(
            f["field"] if isinstance(f, dict) else str(f) for f in entry.get("top_fields") or []
        )
        print(
            f"{entry['route']} -> {entry['target']}: {entry['compared']} compared, "
            f"{100 * entry.get('diff_rate', 0):.1f}% differing, "
            f"{100 * entry.get('noise_rate', 0):.1f}% noise only"
            + (f"; reported: {top}" if top else ""),
            file=out,
        )
    out.flush()


async def _watch_summary(admin: AdminApp | None, latest: list[Any]) -> None:
    """Keep `latest[0]` the newest comparison summary (for the exit message)."""
    while admin is not None:
        summary = await _admin_get(admin, "/api/comparisons/summary")
        if summary is not None:
            latest[:] = [summary]
        await asyncio.sleep(1.0)


async def _settle(admin: AdminApp | None, answered: int, timeout: float) -> None:
    """After the last request, wait (bounded) until its comparison shows in the store."""
    if admin is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = await _admin_get(admin, "/api/comparisons/summary") or []
        if sum(int(e.get("compared", 0)) for e in summary) >= answered:
            return
        await asyncio.sleep(0.2)


async def _demo(
    listen_port: int,
    admin_port: int,
    duration: float | None,
    requests: int | None,
    quiet: bool,
    rate: float,
    store: str | None,
    out: TextIO,
    ready_file: str | None,
) -> int:
    from shadowlane.app import Instance, remove_ready_file, write_ready_file

    backends = [
        DemoBackend("v1", "v1", latency=(0.002, 0.006)),
        DemoBackend("v1b", "v1", latency=(0.002, 0.006)),
        DemoBackend("v2", "v2", latency=(0.004, 0.012)),
    ]
    started = [await start_backend(b, HOST, 0) for b in backends]
    ports = {b.name: port for b, (_, _, port) in zip(backends, started, strict=True)}
    tmpdir: str | None = None
    if store is None:
        tmpdir = tempfile.mkdtemp(prefix="shadowlane-demo-")
        store = f"sqlite:///{tmpdir}/comparisons.db"
    stats = TrafficStats()
    traffic: asyncio.Task[TrafficStats] | None = None
    inst: Any = None
    try:
        try:
            cfg = demo_config(
                listen_port, admin_port, ports["v1"], ports["v1b"], ports["v2"], store
            )
        except ConfigError as err:  # a bad --store URL
            for line in err.errors:
                print(f"demo: {line}", file=sys.stderr)
            return 2
        inst = Instance(cfg, None)
        try:
            await inst.start()
        except OSError as err:
            print(
                f"demo: cannot listen ({err.strerror or err}); is port {listen_port} or "
                f"{admin_port} taken? Pick others with --port / --admin-port.",
                file=sys.stderr,
            )
            return 1
        listen, admin = inst.listen_address, inst.admin_address
        if not quiet:
            _print_banner(out, listen, admin, store, rate)
        if ready_file is not None:
            write_ready_file(ready_file, listen, admin, os.getpid())
        bound_port = int(listen.rpartition(":")[2])
        traffic = asyncio.create_task(
            run_traffic(HOST, bound_port, rate=rate, requests=requests, stats=stats)
        )
        # Ctrl-C drains the instance (admin included) before we get to ask: keep the latest.
        latest: list[Any] = []
        watcher = asyncio.create_task(_watch_summary(inst.admin, latest))
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(inst.stopped.wait())]
        if duration is not None:
            waits.append(asyncio.ensure_future(asyncio.sleep(duration)))
        if requests is not None:
            waits.append(traffic)
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            if w is not traffic:
                w.cancel()
        if traffic in done and not inst.stopped.is_set():
            await _settle(inst.admin, stats.answered, timeout=5.0)
        watcher.cancel()
        summary = latest[0] if latest else None
        if not inst.stopped.is_set() and inst.admin is not None:
            summary = await _admin_get(inst.admin, "/api/comparisons/summary")
        if not quiet:
            _print_summary(out, summary, stats)
        return 0
    finally:
        if traffic is not None and not traffic.done():
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        if inst is not None:
            inst.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await inst.stopped.wait()
        for server, state, _ in started:
            server.close()
            state.start_drain()
            state.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        remove_ready_file(ready_file)


def run_demo(
    listen_port: int = 8080,
    admin_port: int = 9901,
    duration: float | None = None,
    requests: int | None = None,
    quiet: bool = False,
    *,
    rate: float = 5.0,
    store: str | None = None,
    out: TextIO | None = None,
    ready_file: str | None = None,
) -> int:
    """Run the demo until Ctrl-C/SIGTERM, `duration` seconds, or `requests` sent; exit code.

    Port 0 picks a free port (the banner and `ready_file`, as for `run --ready-file`, say
    which). `store` is a store URL (default: SQLite in a temporary directory,
    removed at exit). `rate` is the generated traffic in requests per second.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(
        _demo(
            listen_port,
            admin_port,
            duration,
            requests,
            quiet,
            rate,
            store,
            out if out is not None else sys.stdout,
            ready_file,
        )
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The `demo` subcommand's options (for cli.py: `add_demo_arguments(sub.add_parser(...))`)."""
    parser.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    parser.add_argument(
        "--admin-port", type=int, default=9901, help="dashboard and admin API port (default 9901)"
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--requests", type=int, default=None, help="stop after N requests")
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s (default 5)")
    parser.add_argument(
        "--store", default=None, help="store URL (default: SQLite in a temporary directory)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        default=None,
        help="once serving, write the bound addresses as JSON to PATH (as `run --ready-file`)",
    )


def run_demo_from_args(args: argparse.Namespace) -> int:
    """Run the demo with the options `add_demo_arguments` defined."""
    return run_demo(
        args.port,
        args.admin_port,
        args.duration,
        args.requests,
        args.quiet,
        rate=args.rate,
        store=args.store,
        ready_file=args.ready_file,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m shadowlane.demo [options]`: the same as `shadowlane demo`."""
    parser = argparse.ArgumentParser(
        prog="shadowlane demo", description="Run shadowlane on built-in demo backends."
    )
    add_demo_arguments(parser)
    return run_demo_from_args(parser.parse_args(argv))
