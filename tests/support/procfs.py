"""What a process holds, read from /proc: for tests that check which worker owns a socket, or
how many connections are open.

Every read of /proc/net/tcp is here, so its one trap is handled once: the file is no snapshot
(see :func:`established_from`). Counts are of distinct inodes or ports, never of rows.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from .wait import wait_until

if TYPE_CHECKING:
    from .proxy import ProxyProcess

#: 127.0.0.1 as /proc/net/tcp writes it (the address in host byte order, little-endian)
LOOPBACK = "0100007F"
#: the TCP state column of /proc/net/tcp
ESTABLISHED = "01"
LISTEN = "0A"


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses):
    [0] is the state, [1] the parent, [11] and [12] utime and stime, [16] the nice value.
    OSError once the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` has open (to match against /proc/net/tcp rows)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_sockets(port: int, *, listening: bool, reads: int = 1) -> set[str]:
    """Inodes of IPv4 TCP sockets listening on `port`, or ESTABLISHED with `port` as remote.

    A socket that is bound but does not listen is in neither set: the kernel lists only
    listening and connected sockets in /proc/net/tcp. The rows are kept by inode, so a row the
    read repeats counts once; one it skips (see :func:`established_from`) is missing. For
    sockets that stay put while the test looks (listeners, pooled connections), ``reads > 1``
    takes the union of that many reads, so a row one read skipped shows in another.
    """
    out = set()
    for _ in range(reads):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            state, local, remote, inode = fields[3], fields[1], fields[2], fields[9]
            if listening and state == LISTEN and int(local.split(":")[1], 16) == port:
                out.add(inode)
            if not listening and state == ESTABLISHED and int(remote.split(":")[1], 16) == port:
                out.add(inode)
    return out


def connected_to(pids: Collection[int], port: int, reads: int = 3) -> dict[int, bool]:
    """Which of the processes `pids` hold an ESTABLISHED connection to `port` (a pooled
    upstream connection proves a worker served that backend). A socket counts only if the
    process holds its inode when asked; `reads` as in :func:`tcp_sockets`."""
    upstream = tcp_sockets(port, listening=False, reads=reads)
    return {pid: bool(socket_inodes(pid) & upstream) for pid in pids}


def workers_listening(proxy: ProxyProcess, n: int = 2, timeout: float = 5.0) -> list[int]:
    """Wait until `proxy` has `n` worker processes, each with its own listener (SO_REUSEPORT)
    on the proxy's port; return their pids.

    The ready file is written once every worker accepts, but the quicker worker can take the
    first requests before the kernel spreads connections over both; tests that need both
    workers to serve wait for this first.
    """

    def n_workers() -> list[int]:
        pids = proxy.worker_pids()
        return pids if len(pids) == n else []

    pids = wait_until(n_workers, timeout, f"{n} worker processes")
    wait_until(
        lambda: all(socket_inodes(pid) & tcp_sockets(proxy.port, listening=True) for pid in pids),
        timeout,
        f"all {n} workers to listen",
    )
    return list(pids)


def established_from(ports: Collection[int], remote_port: int, table: str | None = None) -> int:
    """How many connections from 127.0.0.1:`ports` to 127.0.0.1:`remote_port` are ESTABLISHED
    on their connecting side, in `table` (by default one read of /proc/net/tcp).

    /proc/net/tcp is no snapshot. The kernel hands it out a page (about 27 rows) per read() and
    resumes the next read by position in its hash table; when sockets come and go in between
    (anybody's: on a shared machine TIME_WAIT rows expire all the time) rows are repeated or
    skipped, and a socket closed after the read passed it shows next to one opened later.
    Counting matching rows of a busy table can report twice the connections that ever existed
    at once. So each connection (its local port) counts once, and only the `ports` asked about.
    """
    if table is None:
        table = Path("/proc/net/tcp").read_text()
    wanted = set(ports)
    seen = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != ESTABLISHED or remote != f"{LOOPBACK}:{remote_port:04X}":
            continue
        addr, port = local.split(":")
        if addr == LOOPBACK and int(port, 16) in wanted:
            seen.add(int(port, 16))
    return len(seen)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of `pid`, in bytes, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out
