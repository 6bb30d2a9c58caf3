"""Load generation: wrk for closed-loop throughput, h2load --rps for a fixed offered load.

Each run is bounded in time (the tool's own duration, and a hard subprocess timeout on top),
and its output is parsed into a `RunResult`: requests/s, p50/p99 in milliseconds, and every kind
of error the tool reports (non-2xx/3xx answers, connect/read/write errors, timeouts).
"""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WRK_THREADS = 2


@dataclass(frozen=True)
class Load:
    """What the clients do: closed loop with `connections`, or `rate` requests/s in total."""

    connections: int = 50
    body_bytes: int = 0  # 0: GET; otherwise a POST with a body of this size
    rate: int | None = None  # fixed offered load (h2load --rps), requests/s in total
    path: str = "/"
    #: PUT a small body to a new path per request (`/w/<n>`): writes with disjoint keys
    distinct_writes: bool = False
    #: the clients' protocol: "h1" (wrk, or h2load --h1 at a fixed rate), "h2" (h2load, HTTP/2
    #: with prior knowledge, `streams` concurrent streams per connection) or "grpc" (h2load
    #: POSTing one unary gRPC call: a 5-byte empty message, application/grpc, te: trailers)
    protocol: str = "h1"
    streams: int = 10

    def describe(self) -> str:
        what = f"POST {fmt_size(self.body_bytes)}" if self.body_bytes else "GET"
        if self.distinct_writes:
            what = "PUT 16 B to distinct paths"
        if self.protocol == "h2":
            return f"HTTP/2 {what}, {self.connections} connections x {self.streams} streams"
        if self.protocol == "grpc":
            return f"gRPC unary, {self.connections} connections x {self.streams} streams"
        if self.rate:
            return f"{what}, {self.rate} req/s offered, {self.connections} clients"
        return f"{what}, {self.connections} connections"


@dataclass
class RunResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fmt_size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


# ---------------------------------------------------------------- wrk

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_wrk(output: str) -> RunResult:
    """Parse `wrk --latency` output (percentiles, totals, socket errors, non-2xx)."""
    pct = {
        m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)\s*$", output, re.M)
    }
    rps_m = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total_m = re.search(r"^\s+(\d+) requests in ", output, re.M)
    if not rps_m or not total_m:
        raise ValueError("wrk output without a summary:\n" + output[-2000:])
    errors: dict[str, int] = {}
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                errors[name] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx and int(non2xx.group(1)):
        errors["non2xx"] = int(non2xx.group(1))
    requests = int(total_m.group(1))
    return RunResult(
        rps=float(rps_m.group(1)),
        p50_ms=pct.get("50") if requests else None,  # wrk prints 0.00us when nothing came back
        p99_ms=pct.get("99") if requests else None,
        requests=requests,
        errors=errors,
    )


def post_script(work_dir: Path, body_bytes: int) -> Path:
    """A wrk Lua script sending POSTs with a body of `body_bytes` bytes."""
    path = work_dir / f"post-{body_bytes}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {body_bytes})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return path


def writes_script(work_dir: Path) -> Path:
    """A wrk Lua script PUTting 16 bytes to `/w/<thread>-<n>`: every request its own key."""
    path = work_dir / "distinct-writes.lua"
    path.write_text(
        "local n = 0\n"
        "local id = tostring(math.random(1, 1000000000))\n"
        "request = function()\n"
        "  n = n + 1\n"
        '  return wrk.format("PUT", "/w/" .. id .. "-" .. n, '
        '{["Content-Type"] = "application/octet-stream"}, "0123456789abcdef")\n'
        "end\n"
    )
    return path


def run_wrk(url: str, load: Load, duration: float, work_dir: Path) -> RunResult:
    threads = min(WRK_THREADS, load.connections)
    argv = [
        "wrk",
        "--latency",
        f"-t{threads}",
        f"-c{load.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
    ]
    if load.distinct_writes:
        argv += ["-s", str(writes_script(work_dir))]
    elif load.body_bytes:
        argv += ["-s", str(post_script(work_dir, load.body_bytes))]
    argv.append(url + load.path.lstrip("/"))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return parse_wrk(out.stdout)


# ---------------------------------------------------------------- h2load (fixed rate)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def parse_h2load(output: str, log_file: Path, duration: float) -> RunResult:
    """Totals and errors from h2load's summary; percentiles from its per-request log.

    The log has one line per finished request: start (us since epoch), status, duration (us).
    """
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        status, micros = int(parts[1]), int(parts[2])
        statuses[status] = statuses.get(status, 0) + 1
        latencies.append(micros / 1000)
    latencies.sort()
    errors: dict[str, int] = {}
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
    )
    if not req:
        raise ValueError("h2load output without a summary:\n" + output[-2000:])
    failed, errored, timeout = (int(req.group(i)) for i in (5, 6, 7))
    bad_status = sum(n for code, n in statuses.items() if code >= 400 or code < 100)
    if bad_status:
        errors["non2xx"] = bad_status
    if errored:
        errors["errored"] = errored
    if timeout:
        errors["timeout"] = timeout
    other = failed - bad_status - errored - timeout
    if other > 0:
        errors["failed"] = other
    done = len(latencies)
    unfinished = int(req.group(2)) - int(req.group(3))
    return RunResult(
        rps=round(done / duration, 1),
        p50_ms=round(statistics.median(latencies), 3) if latencies else None,
        p99_ms=round(percentile(latencies, 99), 3) if latencies else None,
        requests=done,
        errors=errors,
        note=f"{unfinished} requests unanswered when the run ended" if unfinished else "",
    )


def run_h2load(url: str, load: Load, duration: float, work_dir: Path) -> RunResult:
    """`load.rate` req/s in total over `load.connections` HTTP/1.1 clients, for `duration` s."""
    assert load.rate
    per_client = load.rate / load.connections
    if per_client != int(per_client):
        raise ValueError("rate must be a multiple of the number of clients")
    log_file = work_dir / "h2load-requests.tsv"
    log_file.unlink(missing_ok=True)
    argv = [
        "h2load",
        "--h1",
        "-t1",
        f"-c{load.connections}",
        f"--rps={int(per_client)}",
        f"-D{max(1, round(duration))}",
        f"--log-file={log_file}",
        "-T5",
        "-N5",
    ]
    if load.body_bytes:
        body = work_dir / f"body-{load.body_bytes}.bin"
        body.write_bytes(b"x" * load.body_bytes)
        argv += ["-d", str(body)]
    argv.append(url + load.path.lstrip("/"))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    if out.returncode != 0 and "requests:" not in out.stdout:
        raise RuntimeError(f"h2load exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return parse_h2load(out.stdout, log_file, duration)


#: the one gRPC call the bench sends: `/shop.Shop/Get` with an empty message (flag 0, length 0)
GRPC_PATH = "/shop.Shop/Get"
GRPC_MESSAGE = b"\x00\x00\x00\x00\x00"


def run_h2load_closed(url: str, load: Load, duration: float, work_dir: Path) -> RunResult:
    """Closed loop over HTTP/2 (prior knowledge): `load.connections` connections, each with
    `load.streams` streams in flight, for `duration` s; plain GETs or one gRPC call."""
    log_file = work_dir / "h2load-requests.tsv"
    log_file.unlink(missing_ok=True)
    argv = [
        "h2load",
        "-t1",
        f"-c{load.connections}",
        f"-m{load.streams}",
        f"-D{max(1, round(duration))}",
        f"--log-file={log_file}",
        "-T5",
        "-N5",
    ]
    path = load.path.lstrip("/")
    if load.protocol == "grpc":
        body = work_dir / "grpc-call.bin"
        body.write_bytes(GRPC_MESSAGE)
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        path = GRPC_PATH.lstrip("/")
    elif load.body_bytes:
        body = work_dir / f"body-{load.body_bytes}.bin"
        body.write_bytes(b"x" * load.body_bytes)
        argv += ["-d", str(body)]
    argv.append(url + path)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    if out.returncode != 0 and "requests:" not in out.stdout:
        raise RuntimeError(f"h2load exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return parse_h2load(out.stdout, log_file, duration)


def run_load(url: str, load: Load, duration: float, work_dir: Path) -> RunResult:
    if load.protocol != "h1":
        return run_h2load_closed(url, load, duration, work_dir)
    if load.rate:
        return run_h2load(url, load, duration, work_dir)
    return run_wrk(url, load, duration, work_dir)
