"""What a process holds, read from /proc: for tests that check which worker owns a socket, or
how many connections are open."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

#: 127.0.0.1 as /proc/net/tcp writes it (the address in host byte order, little-endian)
LOOPBACK = "0100007F"
#: the TCP state column of /proc/net/tcp
ESTABLISHED = "01"


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


def tcp_sockets(port: int, *, listening: bool) -> set[str]:
    """Inodes of IPv4 TCP sockets listening on `port`, or ESTABLISHED with `port` as remote.

    A socket that is bound but does not listen is in neither set: the kernel lists only
    listening and connected sockets in /proc/net/tcp.
    """
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if listening and fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            out.add(fields[9])
        if not listening and fields[3] == "01" and int(fields[2].split(":")[1], 16) == port:
            out.add(fields[9])
    return out


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
