"""Process management for the bench: start servers, wait for them, measure RSS, stop them.

Every process the bench starts goes through a `Supervisor`. Each one gets its own session
(process group whose id is its PID), so stopping it means signalling that group: the process we
started and the children it forked (nginx workers, shadowlane workers), nothing else. PIDs and
start times are also written to a file, so a run that was killed hard can clean up after itself
next time without touching unrelated processes that reuse a PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def listening_socket(backlog: int = 4096) -> socket.socket:
    """A TCP socket listening on a loopback port the kernel picked, for a child to inherit.

    Non-blocking (the flag belongs to the open file, so the child's copy is non-blocking too:
    nginx leaves inherited sockets as it finds them) and inheritable (pass it with `pass_fds`).
    Connections to it queue in the backlog until the child accepts them.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def unused_port_socket() -> socket.socket:
    """A TCP socket bound to a loopback port and not listening: connecting to it is refused.

    Keep it open as long as the port must stay dead, so nothing else can take the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
    except OSError:
        sock.close()
        raise
    return sock


def port_of(address: str) -> int:
    """The port of a "HOST:PORT" string (as in a ready file)."""
    return int(address.rpartition(":")[2])


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): with the PID, an identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses):
    [0] is the state, [1] the parent, [11] and [12] utime and stime; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def descendants(root: int) -> list[int]:
    """`root` and every process below it (found by walking /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        parent = _ppid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `root`'s tree: `proxy` (the proxy, its
    workers) and `compare` (their comparison children, `shadowlane.compare.worker`).

    Read before and after a run, the difference over the requests served is CPU per request:
    unlike req/s on this shared machine it does not move with what the neighbours do, and it
    splits a comparison's cost between the proxy's loop and the child.
    """
    out = {"proxy": 0.0, "compare": 0.0}
    for pid in descendants(root):
        stat = _stat_fields(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if stat is None:
            continue
        seconds = (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS
        out["compare" if b"shadowlane.compare.worker" in cmdline else "proxy"] += seconds
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


@dataclass
class Supervisor:
    """Starts processes, remembers them, and stops them (by process group = their PID)."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def pid_file(self) -> Path:
        return self.log_dir / "pids.json"

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                pass_fds=tuple(pass_fds),
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        self._write_pids()
        return proc

    def _check_alive(self, proc: Proc) -> None:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")

    def wait_ready_file(self, proc: Proc, path: Path, timeout: float = 20.0) -> dict[str, Any]:
        """The JSON object `proc` writes to `path` once it listens (it binds port 0 itself).

        Delete `path` before starting `proc`. Fails with the end of its log (its stdout and
        stderr) if it exits first or nothing readable appears within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "no file"
        while time.monotonic() < deadline:
            self._check_alive(proc)
            try:
                ready = json.loads(path.read_text())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:  # a writer that is not atomic: try again
                last = f"unreadable: {exc}"
            else:
                if isinstance(ready, dict):
                    return ready
                last = f"not a JSON object: {ready!r}"
            time.sleep(0.05)
        raise StartError(
            f"{proc.name} wrote no ready file {path} in {timeout}s ({last}):\n{proc.log_tail()}"
        )

    def wait_http(self, proc: Proc, url: str, timeout: float = 15.0) -> None:
        """Until `proc` answers an HTTP GET on `url` (any status counts as an answer).

        For a server handed a listening socket: connecting succeeds as soon as the socket
        listens, answering only once the server accepts on it.
        """
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(proc)
            try:
                with urllib.request.urlopen(url, timeout=0.5):
                    return
            except urllib.error.HTTPError:
                return  # an answer, whatever the status
            except OSError as exc:  # includes socket timeouts and URLError
                last = str(exc)
            time.sleep(0.05)
        raise StartError(
            f"{proc.name} did not answer {url} in {timeout}s ({last}):\n{proc.log_tail()}"
        )

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM to the group (SIGKILL after `grace` seconds); no-op if already gone."""
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace)
        # Children (workers) may outlive their parent; the group id is still our PID.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(2)
        self._write_pids()

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def _write_pids(self) -> None:
        me = {"owner": os.getpid(), "owner_start": _start_time(os.getpid())}
        entries = [
            {"pid": p.pid, "start": _start_time(p.pid), "name": p.name, **me} for p in self.procs
        ]
        with contextlib.suppress(OSError):
            self.pid_file.write_text(json.dumps(entries))

    def reap_leftovers(self) -> list[str]:
        """Stop what a previous, hard-killed bench run left behind.

        Only processes with the recorded PID *and* start time (not a reused PID), and only if
        the bench run that started them is gone (never another bench run still going).
        """
        try:
            entries = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return []
        reaped = []
        for entry in entries:
            pid, start = int(entry["pid"]), entry.get("start")
            owner = entry.get("owner")
            if owner is not None and _start_time(int(owner)) == entry.get("owner_start"):
                continue  # its bench run is still alive: not ours to stop
            if start is not None and _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                reaped.append(f"{entry.get('name')} (pid {pid})")
        self.pid_file.unlink(missing_ok=True)
        return reaped


class RssSampler:
    """Peak resident memory of a process tree during a measurement.

    Two readings, both summed over the tree: the kernel's VmHWM (peak RSS), reset at `start()`
    through /proc/PID/clear_refs so it covers only this measurement; and VmRSS sampled every
    `interval` seconds (the sum at one instant, which the HWM sum can only exceed).
    """

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_sampled_kib = 0
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False
        self._t0 = 0.0

    def _rss_now(self) -> int:
        return sum(_status_kib(pid, "VmRSS") for pid in descendants(self.root))

    def start(self, reset_peak: bool = True) -> None:
        """Start sampling; `reset_peak=False` keeps the lifetime VmHWM (the memory check)."""
        self._hwm_reset = True
        for pid in descendants(self.root) if reset_peak else []:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self._hwm_reset = False
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss_now()
            self.peak_sampled_kib = max(self.peak_sampled_kib, rss)
            self.timeline.append((round(time.monotonic() - self._t0, 2), rss))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float | None]:
        """Stop sampling; returns MiB figures: peak (HWM sum if available), sampled, and end."""
        hwm_kib = sum(_status_kib(pid, "VmHWM") for pid in descendants(self.root))
        end_kib = self._rss_now()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        sampled = max(self.peak_sampled_kib, end_kib)
        peak = max(hwm_kib, sampled) if self._hwm_reset else sampled
        return {
            "peak_rss_mb": round(peak / 1024, 1),
            "peak_rss_sampled_mb": round(sampled / 1024, 1),
            "end_rss_mb": round(end_kib / 1024, 1),
        }
