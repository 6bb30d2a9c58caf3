"""What a process holds, read from /proc: for tests that check which worker owns a socket."""

from __future__ import annotations

import os
from pathlib import Path


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
