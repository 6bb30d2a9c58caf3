"""A backend as a pool of endpoint pools: what the proxy, each shadow lane and replay send to.

One place turns a `backends:` entry into connections (TLS as configured, bounds per endpoint),
so the primary, the shadows and `shadowlane replay` reach a backend the same way.
"""

from __future__ import annotations

import ssl

from shadowlane.config import BackendConfig
from shadowlane.wire.h2_upstream import H2EndpointPool
from shadowlane.wire.upstream import (
    POOL_PURGE_DELAY,
    SHADOW_POOL_PURGE_DELAY,
    BackendPool,
    EndpointPool,
)


def build_backend(
    name: str,
    cfg: BackendConfig,
    connections: int | None = None,
    purge_delay: float = POOL_PURGE_DELAY,
) -> BackendPool:
    """A backend's pool, one endpoint pool per URL (round robin). Shadow lanes call it too:
    each lane gets its own pool, so a slow shadow cannot take the primary's connections.
    `connections` replaces the backend's own bounds (replay sizes its pools by --concurrency);
    `purge_delay` is how fast connections past `max_idle` fade (`build_shadow_backend`)."""
    endpoints: list[EndpointPool] = []
    for ep in cfg.endpoints:
        ctx: ssl.SSLContext | None = None
        if ep.scheme == "https":
            ctx = ssl.create_default_context(cafile=cfg.ca_file)
            if not cfg.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        if cfg.protocol != "http1":
            endpoints.append(
                H2EndpointPool(
                    ep.host,
                    ep.port,
                    connect_timeout=cfg.connect_timeout,
                    max_connections=cfg.max_connections if connections is None else connections,
                    ssl_context=ctx,
                    server_hostname=ep.host if ctx else None,
                )
            )
            continue
        endpoints.append(
            EndpointPool(
                ep.host,
                ep.port,
                connect_timeout=cfg.connect_timeout,
                max_connections=cfg.max_connections if connections is None else connections,
                max_idle=cfg.max_idle if connections is None else connections,
                ssl_context=ctx,
                server_hostname=ep.host if ctx else None,
                purge_delay=purge_delay,
            )
        )
    return BackendPool(name, endpoints, cfg.timeout)


def build_shadow_backend(name: str, cfg: BackendConfig) -> BackendPool:
    """A shadow lane's pool: the backend's, with `SHADOW_POOL_PURGE_DELAY`."""
    return build_backend(name, cfg, purge_delay=SHADOW_POOL_PURGE_DELAY)
