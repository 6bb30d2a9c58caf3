"""What `shadowlane check` prints on success: one screen that says what the file means.

Kept apart from the models because it is written for people, not code: its wording can change
freely without touching what other layers import. Shadow limits are shown only where they differ
from the defaults, and the defaults are read from the model, so the two cannot drift apart.
"""

from __future__ import annotations

from shadowlane.config.document import Config, LimitsConfig
from shadowlane.config.matching import MatchConfig, ShadowMatch
from shadowlane.config.recording import RecordConfig
from shadowlane.config.routes import RouteConfig
from shadowlane.config.shadows import ShadowConfig
from shadowlane.config.units import format_duration, format_size


def _describe_match(m: MatchConfig | ShadowMatch) -> str:
    parts: list[str] = []
    for key in ("host", "path", "path_prefix", "path_regex"):
        value = getattr(m, key, None)
        if value is not None:
            parts.append(f"{key}={value}")
    if m.methods:
        parts.append("methods=" + ",".join(m.methods))
    if m.headers:
        parts.extend(f"header {k}={v}" for k, v in m.headers.items())
    query = getattr(m, "query", None)
    if query:
        parts.extend(f"query {k}={v}" for k, v in query.items())
    return " ".join(parts) or "everything"


def _describe_record(r: RecordConfig) -> str:
    """`record -> DIR (...)`: what is recorded where; bounds only where they differ."""
    parts = [f"{r.percent:g}%"]
    if r.sample_by:
        parts.append(f"by {r.sample_by}")
    parts.append("with answers" if r.answers else "requests only")
    parts.append("gzip" if r.gzip else "plain")
    defaults = RecordConfig.model_fields
    if r.max_file_size != defaults["max_file_size"].default:
        parts.append(f"files <= {format_size(r.max_file_size)}")
    if r.max_file_age != defaults["max_file_age"].default:
        parts.append(f"files <= {format_duration(r.max_file_age)}")
    if r.max_body != defaults["max_body"].default:
        parts.append(f"body <= {format_size(r.max_body)}")
    if r.queue != defaults["queue"].default:
        parts.append(f"queue {format_size(r.queue)}")
    red = r.redact
    if red:
        what = [f"{len(v)} {k}" for k, v in (("headers", red.headers), ("json", red.json_),
                                             ("query", red.query)) if v]  # fmt: skip
        parts.append("redact " + ", ".join(what))
    return f"record -> {r.dir}  " + ", ".join(parts)


def _describe_shadow(s: ShadowConfig) -> str:
    """One line per shadow; limits are shown only where they differ from the defaults."""
    parts = [f"{s.percent:g}%"]
    if s.sample_by:
        parts.append(f"by {s.sample_by}")
    if s.match is not None:
        parts.append(f"if {_describe_match(s.match)}")
    if s.only_if_primary:
        parts.append(f"after primary {s.only_if_primary}")
    elif s.send != "with_request":
        parts.append(f"send {s.send}")
    if s.ordered_by:
        parts.append(f"ordered by {s.ordered_by}")
    elif s.order is not None:
        keys = s.order.keys if isinstance(s.order.keys, str) else ",".join(s.order.keys)
        scope = f" in scope {s.order.scope}" if s.order.scope else ""
        parts.append(f"ordered by {keys}{scope}" + (" (barrier)" if s.order.barrier else ""))
    if s.ids_from_primary:
        parts.append(f"ids from primary ({s.ids_from_primary})")
    if s.host is not None:
        parts.append(f"host {s.host}")
    elif s.host_suffix != "-shadow":
        parts.append(f"host suffix {s.host_suffix!r}")
    if s.headers.set:
        parts.append("set " + ",".join(s.headers.set))
    if s.headers.remove:
        parts.append("remove " + ",".join(s.headers.remove))
    if s.rewrite_path is not None:
        parts.append(f"rewrite {s.rewrite_path.regex} -> {s.rewrite_path.replacement}")
    defaults = ShadowConfig.model_fields
    if s.timeout != defaults["timeout"].default:
        parts.append(f"timeout {format_duration(s.timeout)}")
    if s.max_in_flight != defaults["max_in_flight"].default:
        parts.append(f"in flight {s.max_in_flight}")
    if s.queue != defaults["queue"].default:
        parts.append(f"queue {s.queue}")
    if s.max_body != defaults["max_body"].default:
        parts.append(f"body <= {format_size(s.max_body)}")
    if s.upgrades != "skip":
        parts.append(f"upgrades {s.upgrades}")
    opts = s.compare_enabled
    if opts is not None:
        how: list[str] = [opts.mode]
        if opts.secondary:
            how.append(f"noise from {opts.secondary}")
        if opts.ignore:
            how.append(f"{len(opts.ignore)} ignore rules")
        if opts.grpc is not None:
            how.append(f"gRPC fields named by {opts.grpc.descriptor_set}")
        parts.append("compare " + ", ".join(how))
    line = f"shadow -> {s.backend}  " + ", ".join(parts)
    if s.record is not None:
        line += f"\n      {_describe_record(s.record)}"
    return line


def _describe_rewrite(route: RouteConfig) -> str:
    """What the route changes in the request it forwards (its shadows start from it)."""
    parts: list[str] = []
    rw = route.rewrite_path
    if rw is not None and rw.prefix is not None:
        matched = (
            route.match.path_prefix if route.match.path_prefix is not None else route.match.path
        )
        parts.append(f"rewrite prefix {matched} -> {rw.prefix}")
    elif rw is not None:
        parts.append(f"rewrite {rw.regex} -> {rw.replacement}")
    if route.host is not None:
        parts.append(f"host {route.host}")
    heads = route.headers
    for verb, names in (("set", heads.set), ("add", heads.add), ("remove", heads.remove)):
        if names:
            parts.append(f"{verb} " + ",".join(names))
    return ", ".join(parts)


def _describe_downstream(lim: LimitsConfig) -> str:
    """The connection and overload limits on one line; "off" where they are off."""
    rate = (
        f"body >= {format_size(lim.min_body_rate)}/s per {format_duration(lim.body_rate_window)}"
        if lim.min_body_rate
        else "no body rate"
    )
    conns = f"<= {lim.max_connections} conns" if lim.max_connections else "conns uncapped"
    reqs = (
        f"<= {lim.max_requests_per_connection} req/conn"
        if lim.max_requests_per_connection
        else "req/conn uncapped"
    )
    ov = lim.overload
    marks = [
        f"{what} {which} {shown(value)}"
        for what, wm, shown in (
            ("rss", ov.rss, format_size),
            ("in-flight", ov.in_flight, str),
        )
        for which, value in (("shed", wm.shed_shadows), ("refuse", wm.refuse))
        if value
    ]
    overload = "overload " + (", ".join(marks) if marks else "off")
    return f"{conns}, {reqs}, {rate}, {overload}"


def summarize(cfg: Config) -> str:
    """What `shadowlane check` prints on success: enough to confirm the file says what you meant."""
    lim = cfg.limits
    admin = cfg.admin.listen + (
        f" (token from ${cfg.admin.token_env})" if cfg.admin.token_env else ""
    )
    if cfg.access_log is False:
        access = "off"
    elif cfg.access_log is True or cfg.access_log == "-":
        access = "stdout (JSON lines)"
    else:
        access = f"{cfg.access_log} (JSON lines)"
    lines = [
        f"listen      {cfg.listen}"
        + (
            f" (HTTP/1.1 and HTTP/2: {'h2 by ALPN' if cfg.tls else 'h2c prior knowledge'}, "
            f"{lim.max_concurrent_streams} streams/connection)"
            if cfg.listen_http2
            else ""
        ),
        f"admin       {admin}",
        f"limits      headers <= {format_size(lim.max_header_size)} in "
        f"{format_duration(lim.header_timeout)}, idle {format_duration(lim.idle_timeout)}, "
        f"body <= {format_size(lim.max_body)}, drain {format_duration(lim.drain_timeout)}",
        f"            {_describe_downstream(lim)}",
        f"access log  {access}",
        f"compare     {cfg.compare.store} (queue {cfg.compare.queue}, examples "
        f"{cfg.compare.examples_per_field}/field for {format_duration(cfg.compare.retention)})",
        f"backends ({len(cfg.backends)})",
    ]
    width = max(len(n) for n in cfg.backends)
    for name, b in cfg.backends.items():
        eps = ", ".join(e.url for e in b.endpoints)
        proto = "" if b.protocol == "http1" else f"{b.protocol}, "
        lines.append(
            f"  {name:<{width}}  {eps}  ({proto}timeout {format_duration(b.timeout)}, "
            f"max {b.max_connections} conns/endpoint)"
        )
    lines.append(f"routes ({len(cfg.routes)}, first match wins)")
    for route in cfg.routes:
        lines.append(f"  {route.name}: {_describe_match(route.match)}")
        if route.backends is not None:
            total = sum(w.weight for w in route.backends)
            legs = ", ".join(
                f"{w.backend} {w.weight} ({100 * w.weight / total:.0f}%)" for w in route.backends
            )
            lines.append(f"    -> {legs}")
        else:
            lines.append(f"    -> {route.backend}")
        if route.max_body is not None:
            lines.append(f"    body <= {format_size(route.max_body)}")
        if route.rewrites:
            lines.append(f"    sends {_describe_rewrite(route)}")
        if route.record is not None:
            lines.append(f"    {_describe_record(route.record)}")
        idle = route.tunnel_idle_timeout
        if (
            route.upgrades != ["websocket"]
            or idle != RouteConfig.model_fields["tunnel_idle_timeout"].default
        ):
            tunnels = ", ".join(route.upgrades) if route.upgrades else "off (served plain)"
            if route.upgrades:
                tunnels += f", idle {format_duration(idle)}"
            lines.append(f"    upgrades {tunnels}")
        lines.extend(f"    {_describe_shadow(s)}" for s in route.shadows)
    if cfg.migrations:
        lines.append(f"migrations ({len(cfg.migrations)})")
    for mig in cfg.migrations:
        how = "auto" if mig.auto else "manual"
        lines.append(
            f"  {mig.name}: {mig.old} -> {mig.new} ({how}, every {format_duration(mig.interval)})"
        )
        for stage in mig.stages:
            if stage.weights is not None:
                what = "flip " + " ".join(f"{w}%" for w in stage.weights)
            elif stage.shadow is not None:
                what = f"shadow {', '.join(stage.shadow.routes)} at {stage.shadow.percent:g}%"
            else:
                what = "hold"
            gates = [
                k
                for k, v in stage.gates.model_dump().items()
                if v not in (None, False, 0, 0.0, []) and k != "min_requests"
            ]
            lines.append(f"    {stage.name}: {what}; gates: {', '.join(gates) or 'none'}")
        if mig.reverse_shadow is not None:
            lines.append(
                f"    then reverse shadowing for {format_duration(mig.reverse_shadow.window)}"
            )
    return "\n".join(lines)
