"""The listener's TLS: a context built once at start, whose certificate a reload replaces.

The context outlives generations (the listening socket holds it), so a reload loads the new
certificate into the same context: new handshakes get it, established connections keep theirs.
Turning TLS on or off, or changing `client_ca`, changes what the listener is and takes a restart;
`tls_shape` is what a reload compares to tell.
"""

from __future__ import annotations

import ssl

from shadowlane.config import Config, TlsConfig

__all__ = ["build_tls", "tls_shape"]


def build_tls(cfg: TlsConfig, http2: bool = False) -> ssl.SSLContext:
    """The listener's TLS context; with `client_ca`, clients must present a certificate.
    With `http2` (`listen_http2: true`), ALPN offers h2 first, then http/1.1."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if http2:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.load_cert_chain(cfg.cert, cfg.key)
    if cfg.client_ca is not None:
        ctx.load_verify_locations(cfg.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_shape(cfg: Config) -> tuple[bool, str | None, bool]:
    """What only a restart changes: TLS on or off, the client CA, and ALPN's h2."""
    return (
        cfg.tls is not None,
        cfg.tls.client_ca if cfg.tls is not None else None,
        cfg.listen_http2,
    )
