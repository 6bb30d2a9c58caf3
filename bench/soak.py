"""Soak and chaos: mixed load through shadowlane while its shadow misbehaves, bounded in time.

    python bench/soak.py --duration 600 --workers 2 --kill-worker-at 300 --postgres
    python bench/soak.py --duration 60 --json out/soak.json      # the CI-sized run

What runs (everything on 127.0.0.1, ports picked by the kernel):

* a primary backend (uvloop + httptools, one process) that answers every request with the
  length of the body it read, so each client checks it got *its* answer;
* a chaos shadow that cycles every `--phase` seconds through ok, slow (0.5 s), hung (never
  answers), resetting (RST after the head) and dead (its listener closed: refused);
* `shadowlane run` (`--workers N`) with one route to the primary, shadowed at 100% to the chaos
  backend with `compare: true`, the store SQLite or (`--postgres`) a private PostgreSQL
  cluster that is stopped at 40% of the run and started again at 60%;
* `--connections` clients (asyncio), each a loop bounded by the run's end: 70% keep-alive
  connections, 30% a new connection per request, a quarter of requests POSTs with bodies up to
  64 KiB, paced to `--rate` requests/s in total.

Sampled every `--sample` seconds: the RSS and open descriptors of the proxy's processes (the
parent and every worker). Reported (stdout, and `--json FILE`): requests and client errors,
the RSS slope after warm-up (least squares, MB/min, over the summed RSS), descriptors after
warm-up (min, max), shadow outcomes and comparisons from /metrics, and the events (worker
killed and restarted, PostgreSQL stopped and started, store rows before and after). Exit 1
when a check fails: client errors outside the killed worker's own connections, RSS slope
over `--max-slope`, descriptors growing by more than `--max-fd-growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import uvloop

HOST = "127.0.0.1"
PHASES = ("ok", "slow", "hung", "reset", "dead")
#: connections opened this long after a worker's SIGKILL may still land on its listener
KILL_GRACE = 1.0


# -- backends (run as `soak.py backend ...` in their own process) -------------------------------


class _Backend(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.size = 0
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server.mode == "reset":
            self._reset()

    def _reset(self) -> None:
        t = self.transport
        if t is None:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        t.abort()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.size = 0

    def on_body(self, body: bytes) -> None:
        self.size += len(body)

    def on_message_complete(self) -> None:
        mode = self.server.mode
        if mode == "hung":
            return
        if mode == "reset":
            self._reset()
            return
        keep = self.parser.should_keep_alive()
        body = b"ok %d\n" % self.size
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n" % len(body)
        out = head + (b"\r\n" if keep else b"connection: close\r\n\r\n") + body
        if mode == "slow":
            self.loop.call_later(0.5, self._send, out, keep)
        else:
            self._send(out, keep)

    def _send(self, out: bytes, keep: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(out)
        if not keep:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class _Server:
    def __init__(self, mode: str) -> None:
        self.mode = mode


async def _serve_backend(kind: str, phase: float, ready: Path) -> None:
    loop = asyncio.get_running_loop()
    state = _Server("ok")
    server = await loop.create_server(lambda: _Backend(state), HOST, 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, ready)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kind == "primary":
        await stop.wait()
        server.close()
        return
    i = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), phase)
        i += 1
        mode = PHASES[i % len(PHASES)]
        if mode == "dead":
            server.close()
        elif state.mode == "dead":
            # the same port again (SO_REUSEADDR); nothing else binds loopback ports we hold
            # in TIME_WAIT meanwhile, but if one did, stay dead for this phase
            try:
                server = await loop.create_server(lambda: _Backend(state), HOST, port, backlog=4096)
            except OSError:
                mode = "dead"
        state.mode = mode
        print(f"chaos: {mode}", file=sys.stderr, flush=True)
    server.close()


# -- the proxy and its processes ----------------------------------------------------------------


def _wait_file(path: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            with contextlib.suppress(ValueError):
                return json.loads(path.read_text())
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"no {path} after {timeout}s")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 1 and int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def _rss_fds(pids: list[int]) -> tuple[int, int]:
    rss = fds = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss, fds


def _metrics(admin: str) -> str:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _sum_metric(text: str, name: str, **labels: str) -> dict[str, float]:
    """`label value -> sum` for the one label not given, over the samples of `name`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + " "):  # no labels
            out[""] = out.get("", 0.0) + float(line.split()[1])
            continue
        if not line.startswith(name + "{"):
            continue
        lab, _, value = line[len(name) + 1 :].rpartition("} ")
        parts = dict(p.split("=", 1) for p in lab.split(",") if "=" in p)
        parts = {k: v.strip('"') for k, v in parts.items()}
        if any(parts.get(k) != v for k, v in labels.items()):
            continue
        rest = [v for k, v in parts.items() if k not in labels]
        key = rest[0] if rest else ""
        out[key] = out.get(key, 0.0) + float(value)
    return out


class PgCluster:
    """A private PostgreSQL (initdb + pg_ctl in a temp dir, Unix socket only), as the tests'
    (tests/test_store.py) but with stop and start kept apart for the chaos."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        initdb = found[-1] if found else Path(shutil.which("initdb") or "initdb")
        self.bindir = initdb.parent
        self.root = Path(tempfile.mkdtemp(prefix="shadowlane-soak-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        opts = f"-p 5432 -k {self.root} -c listen_addresses='' -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.root}&port=5432"

    def count(self) -> int | None:
        """Comparisons the store holds (its aggregate rows' sum), None when it cannot say."""
        try:
            import psycopg

            with psycopg.connect(self.url, connect_timeout=3) as conn:
                row = conn.execute(
                    "SELECT coalesce(sum(compared), 0) FROM shadowlane_totals"
                ).fetchone()
                return int(row[0]) if row else 0
        except Exception:
            return None

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# -- the clients --------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: errors on connections open when a worker was killed, or opened in the second after
    #: (the kernel queues those on the dying worker's listener until its exit closes it)
    kill_window_errors: int = 0
    #: seconds into the run of each error outside that window, to tell what caused it
    error_times: list[float] = field(default_factory=list)

    def error(self, kind: str, in_kill_window: bool, at: float = 0.0) -> None:
        if in_kill_window:
            self.kill_window_errors += 1
        else:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if len(self.error_times) < 100:
                self.error_times.append(round(at, 1))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    body = await reader.readexactly(length)
    return status, body, close


class Clients:
    def __init__(self, port: int, n: int, rate: float, end: float, seed: int) -> None:
        self.port = port
        self.n = n
        self.interval = n / rate
        self.end = end
        self.rng = random.Random(seed)
        self.tally = Tally()
        #: monotonic time of the last worker kill; connections opened before it may fail
        self.killed_at = -1.0
        self.t0 = time.monotonic()

    def _request(self) -> tuple[bytes, int]:
        rng = self.rng
        if rng.random() < 0.25:
            size = rng.choice([0, 10, 1000, 16_384, 65_536])
            return (
                b"POST /soak/%d HTTP/1.1\r\nHost: soak\r\ncontent-length: %d\r\n\r\n"
                % (rng.randrange(1 << 30), size)
                + b"x" * size,
                size,
            )
        return b"GET /soak/%d HTTP/1.1\r\nHost: soak\r\n\r\n" % rng.randrange(1 << 30), 0

    async def _one(self, keep_alive: bool) -> None:
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        opened = 0.0
        next_at = loop.time() + self.rng.random() * self.interval
        while time.monotonic() < self.end:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self.interval
            try:
                if writer is None:
                    opened = time.monotonic()
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, self.port), 5
                    )
                data, size = self._request()
                if not keep_alive:
                    data = data.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
                writer.write(data)
                status, body, close = await asyncio.wait_for(_read_response(reader), 10)
                if status != 200 or body != b"ok %d\n" % size:
                    self.tally.error(f"status {status}", False)
                else:
                    self.tally.requests += 1
                if close or not keep_alive:
                    writer.close()
                    writer = None
            # RuntimeError: uvloop's write on a transport the peer already closed (a connection
            # of the killed worker) raises it, not an OSError; it is a client error like the rest
            except (
                OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, RuntimeError
            ) as err:  # fmt: skip
                in_window = self.killed_at >= 0 and opened <= self.killed_at + KILL_GRACE
                self.tally.error(type(err).__name__, in_window, time.monotonic() - self.t0)
                if writer is not None:
                    writer.close()
                writer = None
        if writer is not None:
            writer.close()

    async def run(self) -> None:
        await asyncio.gather(*(self._one(i % 10 < 7) for i in range(self.n)))


# -- the run ------------------------------------------------------------------------------------


def _slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    num = sum((t - mt) * (r - mr) for t, r in samples)
    den = sum((t - mt) ** 2 for t, _ in samples) or 1.0
    return num / den * 60 / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=None, help="seconds (default: 20%%)")
    ap.add_argument("--connections", type=int, default=240)
    ap.add_argument("--rate", type=float, default=800.0, help="requests/s over all clients")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--phase", type=float, default=10.0, help="seconds per chaos phase")
    ap.add_argument("--sample", type=float, default=2.0)
    ap.add_argument("--kill-worker-at", type=float, default=None, help="seconds into the run")
    ap.add_argument("--postgres", action="store_true", help="store in PostgreSQL, stop/start it")
    ap.add_argument("--max-slope", type=float, default=1.0, help="MB/min after warm-up")
    ap.add_argument("--max-fd-growth", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="shadowlane-soak-"))
    procs: list[subprocess.Popen[bytes]] = []
    pg: PgCluster | None = None
    here = Path(__file__).resolve()
    events: list[dict[str, Any]] = []
    t_start = time.monotonic()

    def event(what: str, **kw: Any) -> None:
        events.append({"t": round(time.monotonic() - t_start, 1), "event": what, **kw})
        print(f"[{events[-1]['t']:7.1f}s] {what} {kw if kw else ''}", file=sys.stderr, flush=True)

    try:
        ports = {}
        for kind in ("primary", "chaos"):
            ready = tmp / f"{kind}.json"
            p = subprocess.Popen(
                [
                    sys.executable,
                    str(here),
                    "backend",
                    kind,
                    "--phase",
                    str(args.phase),
                    "--ready-file",
                    str(ready),
                ],
                stderr=open(tmp / f"{kind}.log", "wb"),  # noqa: SIM115 - lives with the process
            )
            procs.append(p)
            ports[kind] = _wait_file(ready, 10, p)["port"]
        if args.postgres:
            pg = PgCluster()
            pg.init()
            store = pg.url
        else:
            store = f"sqlite:///{tmp / 'soak.db'}"
        cfg = {
            "listen": f"{HOST}:0",
            "admin": {"listen": f"{HOST}:0"},
            "limits": {"max_connections": 4096},
            "backends": {
                "primary": {"endpoints": [f"http://{HOST}:{ports['primary']}"], "timeout": "5s"},
                "chaos": {
                    "endpoints": [f"http://{HOST}:{ports['chaos']}"],
                    "timeout": "1s",
                    "connect_timeout": "500ms",
                },
            },
            "routes": [
                {
                    "name": "soak",
                    "match": {"path_prefix": "/"},
                    "backend": "primary",
                    "shadows": [{"backend": "chaos", "percent": 100, "compare": True}],
                }
            ],
            "compare": {"store": store},
        }
        (tmp / "config.json").write_text(json.dumps(cfg))
        ready = tmp / "proxy.json"
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shadowlane",
                "run",
                "-c",
                str(tmp / "config.json"),
                "--ready-file",
                str(ready),
                "--workers",
                str(args.workers),
            ],
            stderr=open(tmp / "proxy.log", "wb"),  # noqa: SIM115 - lives with the process
            start_new_session=True,
        )
        procs.append(proxy)
        info = _wait_file(ready, 30, proxy)
        port = int(info["listen"].rpartition(":")[2])
        admin = info["admin"]
        event("proxy ready", workers=args.workers, store=store.split(":", 1)[0])

        warmup = args.warmup if args.warmup is not None else args.duration * 0.2
        end = time.monotonic() + args.duration
        clients = Clients(port, args.connections, args.rate, end, args.seed)
        samples: list[dict[str, float]] = []
        pg_counts: dict[str, int | None] = {}

        async def control() -> None:
            t0 = time.monotonic()
            killed = False
            pg_stopped = pg_started = False
            while time.monotonic() < end:
                await asyncio.sleep(args.sample)
                now = time.monotonic() - t0
                pids = [proxy.pid, *_children(proxy.pid)]
                rss, fds = _rss_fds(pids)
                samples.append(
                    {"t": now, "rss": rss, "fds": fds, "requests": clients.tally.requests}
                )
                if args.kill_worker_at is not None and not killed and now >= args.kill_worker_at:
                    killed = True
                    workers = _children(proxy.pid)
                    if workers:
                        clients.killed_at = time.monotonic()
                        os.kill(workers[-1], signal.SIGKILL)
                        event("worker killed", pid=workers[-1])
                        asyncio.get_running_loop().create_task(watch_restart(workers))
                if pg is not None and not pg_stopped and now >= args.duration * 0.4:
                    pg_stopped = True
                    pg_counts["before_stop"] = await asyncio.to_thread(pg.count)
                    await asyncio.to_thread(pg.stop)
                    event("postgresql stopped", rows=pg_counts["before_stop"])
                if pg is not None and pg_stopped and not pg_started and now >= args.duration * 0.6:
                    pg_started = True
                    await asyncio.to_thread(pg.start)
                    pg_counts["at_restart"] = await asyncio.to_thread(pg.count)
                    event("postgresql started", rows=pg_counts["at_restart"])

        async def watch_restart(before: list[int]) -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                now = _children(proxy.pid)
                new = [p for p in now if p not in before]
                if new and len(now) == len(before):
                    event("worker restarted", pid=new[0])
                    return
                await asyncio.sleep(0.1)
            event("worker NOT restarted")

        async def everything() -> None:
            await asyncio.gather(clients.run(), control())

        uvloop.run(everything())
        event("load done", requests=clients.tally.requests)
        # let the store catch up (flush interval 1 s), then read the counts
        time.sleep(3)
        text = _metrics(admin)
        if pg is not None:
            pg_counts["end"] = pg.count()
        after = [s for s in samples if s["t"] >= warmup]
        slope = _slope_mb_per_min([(s["t"], int(s["rss"])) for s in after])
        fds_after = [int(s["fds"]) for s in after]
        # descriptors follow the chaos phases (a hung shadow holds its connections), so "flat"
        # is: the second half's peak is not above the first half's by more than the margin
        half = len(fds_after) // 2
        fd_growth = max(fds_after[half:]) - max(fds_after[:half]) if half else 0
        tally = clients.tally
        result: dict[str, Any] = {
            "duration_s": args.duration,
            "warmup_s": warmup,
            "workers": args.workers,
            "connections": args.connections,
            "offered_rate": args.rate,
            "requests": tally.requests,
            "achieved_rps": round(tally.requests / args.duration, 1),
            "client_errors": tally.errors,
            "kill_window_errors": tally.kill_window_errors,
            "client_error_times_s": tally.error_times,
            "rss_mb_start": round(after[0]["rss"] / 1e6, 1) if after else None,
            "rss_mb_end": round(after[-1]["rss"] / 1e6, 1) if after else None,
            "rss_mb_max": round(max(s["rss"] for s in samples) / 1e6, 1) if samples else None,
            "rss_slope_mb_per_min": round(slope, 3),
            "fds_min": min(fds_after) if fds_after else None,
            "fds_max": max(fds_after) if fds_after else None,
            "fds_peak_growth_second_half": fd_growth,
            "shadow_outcomes": _sum_metric(text, "shadowlane_shadow_requests_total"),
            "comparisons": _sum_metric(text, "shadowlane_comparisons_total"),
            "store_lost": sum(_sum_metric(text, "shadowlane_compare_store_lost").values()),
            "limited": _sum_metric(text, "shadowlane_downstream_limited_total"),
            "postgres_rows": pg_counts or None,
            "events": events,
            "samples": samples,
        }
        checks = {
            "zero client errors": not tally.errors,
            f"rss slope <= {args.max_slope} MB/min": slope <= args.max_slope,
            f"fds grow <= {args.max_fd_growth}": bool(fds_after)
            and fd_growth <= args.max_fd_growth,
        }
        if args.kill_worker_at is not None:
            checks["killed worker restarted"] = any(
                e["event"] == "worker restarted" for e in events
            )
        if pg is not None:
            end_rows, restart_rows = pg_counts.get("end"), pg_counts.get("at_restart")
            checks["store caught up after restart"] = (
                end_rows is not None and restart_rows is not None and end_rows > restart_rows
            )
        checks["proxy alive at the end"] = proxy.poll() is None
        result["checks"] = checks
        printable = {k: v for k, v in result.items() if k != "samples"}
        print(json.dumps(printable, indent=2))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
            print((tmp / "proxy.log").read_text()[-4000:], file=sys.stderr)
        return 1 if failed else 0
    finally:
        # the proxy first (SIGTERM to its own process group: the parent and its workers),
        # then the backends; each by the PID we started it with
        for p in reversed(procs):
            if p.poll() is not None:
                continue
            group = p.args[1:3] == ["-m", "shadowlane"]  # type: ignore[index]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM) if group else p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL) if group else p.kill()
                p.wait(5)
        if pg is not None:
            pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def backend_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["primary", "chaos"])
    ap.add_argument("--phase", type=float, default=10.0)
    ap.add_argument("--ready-file", type=Path, required=True)
    args = ap.parse_args(argv)
    uvloop.run(_serve_backend(args.kind, args.phase, args.ready_file))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "backend":
        backend_main(sys.argv[2:])
    else:
        sys.exit(main())
