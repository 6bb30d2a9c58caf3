"""pytest plugin (``-p support.loopback_guard``): this process may only talk to loopback.

Why: third-party test suites we run through the proxy (``requests``' own) contain tests that
reach for the internet — a TCP "tarpit" on a private address, DNS names under google.com. Here
there is no network beyond loopback, and traffic to any other address must never be sent. The
runner deselects the tests it knows about; this guard is the backstop for the ones it does not:
name resolution of a non-local name and connects to non-loopback addresses fail at once, before
any packet leaves, with an error that says why. A test hit by it fails the same way with and
without the proxy, so the comparison of the two runs is unaffected.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

_installed: list[Callable[[], None]] = []

#: every blocked attempt, as "name example.com" / "address 10.0.0.1", for the session summary
blocked: list[str] = []


def is_loopback_host(host: object) -> bool:
    """True for loopback IP literals (127.0.0.0/8, ::1) and the local host names."""
    if host is None:
        return True  # getaddrinfo(None, port): the wildcard/loopback of a local bind
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip("[]").split("%", 1)[0].rstrip(".").lower()
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback or addr.is_unspecified


def _blocked(what: str, host: object) -> str:
    blocked.append(f"{what} {host!r}")
    return f"loopback_guard: {what} {host!r} blocked (tests may only use loopback)"


def install() -> Callable[[], None]:
    """Patch the socket module; returns a function that undoes it. Idempotent."""
    if _installed:
        return _installed[0]
    orig_getaddrinfo = socket.getaddrinfo
    orig_gethostbyname = socket.gethostbyname
    orig_gethostbyname_ex = socket.gethostbyname_ex
    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_loopback_host(host):
            raise socket.gaierror(socket.EAI_NONAME, _blocked("name", host))
        return orig_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host: str) -> str:
        if not is_loopback_host(host):
            raise socket.gaierror(socket.EAI_NONAME, _blocked("name", host))
        return orig_gethostbyname(host)

    def gethostbyname_ex(host: str) -> tuple[str, list[str], list[str]]:
        if not is_loopback_host(host):
            raise socket.gaierror(socket.EAI_NONAME, _blocked("name", host))
        return orig_gethostbyname_ex(host)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback_host(address[0]):
            raise OSError(errno.ENETUNREACH, _blocked("address", address[0]))

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        orig_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return orig_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]

    def uninstall() -> None:
        socket.getaddrinfo = orig_getaddrinfo
        socket.gethostbyname = orig_gethostbyname
        socket.gethostbyname_ex = orig_gethostbyname_ex
        socket.socket.connect = orig_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = orig_connect_ex  # type: ignore[method-assign]
        _installed.clear()

    _installed.append(uninstall)
    return uninstall


def pytest_configure(config: Any) -> None:
    """Install as early as the plugin is configured: before any fixture or test runs."""
    install()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say what was blocked, so a test failing for that reason is easy to recognise."""
    if blocked:
        terminalreporter.section("loopback_guard")
        for entry in sorted(set(blocked)):
            terminalreporter.write_line(f"blocked {entry} x{blocked.count(entry)}")
