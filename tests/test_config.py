"""Config loading: the full example's types, and the exact error line for each kind of mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shadowlane.config import (
    Config,
    ConfigError,
    Endpoint,
    format_duration,
    format_size,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    summarize,
)

FULL = textwrap.dedent(
    """\
    listen: 127.0.0.1:8080
    admin:
      listen: "[::1]:9901"
      token_env: SHADOWLANE_TOKEN
    limits:
      max_header_size: 32KiB
      header_timeout: 2.5s
      idle_timeout: 1m
      max_body: 10MB
      drain_timeout: 0
    access_log: /var/log/shadowlane.jsonl
    backends:
      orders-v1:
        endpoints: [http://127.0.0.1:9001, http://127.0.0.1:9011]
        timeout: 30s
      orders-v2:
        endpoints: [https://orders-v2.internal]
        connect_timeout: 250ms
        max_connections: 10
        max_idle: 0
        verify: false
    routes:
      - name: orders
        match:
          host: "*.Example.com"
          path_prefix: /orders
          methods: [get, POST]
          headers: {X-Tenant: acme, x-api-version: 2}
          query: {debug: "1"}
        backend: orders-v1
        max_body: 512
        shadows:
          - backend: orders-v2
            percent: 12.5
            sample_by: header:X-User-Id
            match: {methods: [GET], path_prefix: /orders/, headers: {X-Beta: "yes"}}
            host_suffix: ""
            host: backend
            headers: {set: {X-Shadow: "1"}, remove: [Authorization]}
            rewrite_path: {regex: "^/orders/(\\\\d+)", replacement: "/v2/orders/\\\\1"}
            only_if_primary: 2xx
            ordered_by: query:account
            timeout: 1.5s
            max_in_flight: 8
            queue: 0
            max_body: 1MiB
            compare: true
      - name: canary
        match: {path_regex: "^/items/[0-9]+$"}
        backends:
          - {backend: orders-v1, weight: 90}
          - {backend: orders-v2, weight: 10}
    compare:
      store: postgresql://shadow@db/shadowlane
    """
)

MINIMAL = textwrap.dedent(
    """\
    backends:
      a: {endpoints: ["http://127.0.0.1:9001"]}
      b: {endpoints: ["http://127.0.0.1:9002"]}
    routes:
      - name: r
        backend: a
    """
)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    errors: list[str] = info.value.errors
    assert str(info.value) == "\n".join(errors)
    return errors


def one_route(route_yaml: str) -> str:
    """MINIMAL with its route replaced by `route_yaml` (a YAML mapping, indented 4)."""
    head = MINIMAL.split("routes:")[0]
    return head + "routes:\n  - " + textwrap.indent(route_yaml, "    ").lstrip()


def test_full_example_types_and_units() -> None:
    cfg = parse_config(FULL)
    assert isinstance(cfg, Config)
    assert cfg.listen_addr == ("127.0.0.1", 8080)
    assert cfg.admin.listen_addr == ("::1", 9901)
    assert cfg.admin.token_env == "SHADOWLANE_TOKEN"
    lim = cfg.limits
    assert (lim.max_header_size, lim.header_timeout, lim.idle_timeout) == (32768, 2.5, 60.0)
    assert (lim.max_body, lim.drain_timeout) == (10_000_000, 0.0)
    assert cfg.access_log == "/var/log/shadowlane.jsonl"

    v1, v2 = cfg.backends["orders-v1"], cfg.backends["orders-v2"]
    assert v1.endpoints == [
        Endpoint("http", "127.0.0.1", 9001),
        Endpoint("http", "127.0.0.1", 9011),
    ]
    assert [e.url for e in v1.endpoints] == ["http://127.0.0.1:9001", "http://127.0.0.1:9011"]
    assert v1.timeout == 30.0 and v1.connect_timeout == 5.0 and v1.verify is True
    assert v2.endpoints[0] == Endpoint("https", "orders-v2.internal", 443)
    assert (v2.connect_timeout, v2.max_connections, v2.max_idle, v2.verify) == (0.25, 10, 0, False)

    orders, canary = cfg.routes
    m = orders.match
    assert m.host == "*.example.com"
    assert m.methods == ["GET", "POST"]
    assert m.headers == {"x-tenant": "acme", "x-api-version": "2"}
    assert m.query == {"debug": "1"}
    assert orders.backend == "orders-v1" and orders.backends is None
    assert orders.max_body == 512
    (s,) = orders.shadows
    assert s.percent == 12.5
    assert s.sample_by == "header:x-user-id" and s.sample_key == ("header", "x-user-id")
    assert s.match is not None and s.match.headers == {"x-beta": "yes"}
    assert (s.host_suffix, s.host) == ("", "backend")
    assert s.headers.set == {"x-shadow": "1"} and s.headers.remove == ["authorization"]
    assert s.rewrite_path is not None and s.rewrite_path.replacement == "/v2/orders/\\1"
    assert s.only_if_primary == "2xx"
    assert s.send == "after_response"  # implied by only_if_primary
    assert s.ordering is not None and s.ordering.keys == ["query:account"]
    assert s.ordering.scope is None and s.waits_for_primary
    assert (s.timeout, s.max_in_flight, s.queue, s.max_body, s.compare) == (1.5, 8, 0, 2**20, True)

    assert canary.backend is None and canary.backends is not None
    assert [(w.backend, w.weight) for w in canary.backends] == [
        ("orders-v1", 90),
        ("orders-v2", 10),
    ]
    assert canary.backend_names == ["orders-v1", "orders-v2"]
    assert cfg.compare.store == "postgresql://shadow@db/shadowlane"


def test_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.listen == "127.0.0.1:8080" and cfg.admin.listen == "127.0.0.1:9901"
    assert cfg.admin.token_env is None
    lim = cfg.limits
    assert (lim.max_header_size, lim.header_timeout, lim.idle_timeout) == (65536, 10.0, 60.0)
    assert (lim.max_body, lim.drain_timeout) == (2**30, 30.0)
    assert cfg.access_log is False
    b = cfg.backends["a"]
    assert (b.timeout, b.connect_timeout, b.max_connections, b.max_idle) == (30.0, 5.0, 1024, 64)
    assert (b.ca_file, b.verify) == (None, True)
    route = cfg.routes[0]
    assert route.match.model_dump() == dict.fromkeys(
        ("host", "path", "path_prefix", "path_regex", "methods", "headers", "query")
    )
    assert (route.max_body, route.shadows) == (None, [])
    assert cfg.compare.store == "sqlite:///shadowlane.db"


def test_shadow_defaults() -> None:
    cfg = parse_config(one_route("name: r\nbackend: a\nshadows: [{backend: b}]"))
    s = cfg.routes[0].shadows[0]
    assert (s.percent, s.sample_by, s.match, s.host_suffix, s.host) == (
        100.0,
        None,
        None,
        "-shadow",
        None,
    )
    assert (s.headers.set, s.headers.remove, s.rewrite_path) == ({}, [], None)
    assert (s.send, s.only_if_primary, s.ordered_by) == ("with_request", None, None)
    assert (s.timeout, s.max_in_flight, s.queue, s.max_body, s.compare) == (
        5.0,
        64,
        1024,
        2**20,
        False,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("1.5s", 1.5), ("2h", 7200.0), ("1m30s", 90.0),
     (3, 3.0), (0.5, 0.5), ("10", 10.0)],
)  # fmt: skip
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), (512, 512), ("10KiB", 10240), ("1MiB", 2**20), ("1GiB", 2**30), ("1KB", 1000),
     ("2 mb", 2_000_000), ("1.5KiB", 1536)],
)  # fmt: skip
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_format_round_trips() -> None:
    for text in ("250ms", "5s", "2m", "1.5s", "0s"):
        assert format_duration(parse_duration(text)) == text
    for text in ("64KiB", "1MiB", "1GiB", "1KB", "10MB", "513B"):
        assert format_size(parse_size(text)) == text


def test_access_log_forms() -> None:
    assert parse_config("access_log: true\n" + MINIMAL).access_log is True
    assert parse_config("access_log: '-'\n" + MINIMAL).access_log == "-"
    assert errors_of("access_log: 3\n" + MINIMAL) == [
        "access_log: must be true, false, '-' (stdout) or a file path"
    ]


def test_endpoint_forms() -> None:
    cfg = parse_config(MINIMAL.replace('["http://127.0.0.1:9001"]', '"http://[::1]:81/"'))
    (ep,) = cfg.backends["a"].endpoints
    assert (ep.scheme, ep.host, ep.port, ep.url, ep.authority) == (
        "http", "::1", 81, "http://[::1]:81", "[::1]:81"
    )  # fmt: skip


# --- one exact line per error class -----------------------------------------------------------


def test_unknown_key() -> None:
    assert errors_of(one_route("name: r\nbackend: a\nmach: {path: /x}")) == [
        "routes[0].mach: unknown key"
    ]


def test_unknown_top_level_and_nested_key() -> None:
    assert errors_of("lisen: 1\n" + MINIMAL.replace("{endpoints:", "{endpoint: x, endpoints:")) == [
        "lisen: unknown key",
        "backends.a.endpoint: unknown key",
        "backends.b.endpoint: unknown key",
    ]


def test_bad_percent() -> None:
    text = one_route("name: r\nbackend: a\nshadows: [{backend: b}, {backend: b, percent: 150}]")
    assert errors_of(text) == ["routes[0].shadows[1].percent: must be 0..100"]


def test_percent_sign_accepted() -> None:
    text = one_route("name: r\nbackend: a\nshadows: [{backend: b, percent: 2.5%}]")
    assert parse_config(text).routes[0].shadows[0].percent == 2.5


def test_unknown_backend_references() -> None:
    text = MINIMAL.replace(
        "routes:",
        "routes:\n  - {name: x, backends: [{backend: a, weight: 1}, {backend: c, weight: 1}]}\n"
        "  - {name: y, backend: a, shadows: [{backend: zz}]}",
    ).replace("backend: a\n", "backend: orders-v3\n")
    assert errors_of(text) == [
        "routes[0].backends[1].backend: unknown backend 'c' (known: a, b)",
        "routes[1].shadows[0].backend: unknown backend 'zz' (known: a, b)",
        "routes[2].backend: unknown backend 'orders-v3' (known: a, b)",
    ]


def test_bad_duration() -> None:
    assert errors_of("limits: {idle_timeout: 5 sec}\n" + MINIMAL) == [
        "limits.idle_timeout: not a duration: '5 sec' (use e.g. 250ms, 5s, 1m)"
    ]


def test_zero_timeout() -> None:
    assert errors_of(MINIMAL.replace('9002"]}', '9002"], timeout: 0s}')) == [
        "backends.b.timeout: must be > 0"
    ]


def test_bad_size() -> None:
    assert errors_of("limits: {max_body: 10 kilobytes}\n" + MINIMAL) == [
        "limits.max_body: not a size: '10 kilobytes' (use e.g. 512, 64KiB, 1MiB)"
    ]


def test_bad_regex() -> None:
    assert errors_of(one_route("name: r\nbackend: a\nmatch: {path_regex: '/a(b'}")) == [
        "routes[0].match.path_regex: bad regex '/a(b': missing ), unterminated subpattern "
        "at position 2"
    ]


def test_bad_rewrite_regex_and_group() -> None:
    text = one_route(
        "name: r\nbackend: a\nshadows:\n"
        "  - {backend: b, rewrite_path: {regex: '[', replacement: x}}\n"
        "  - {backend: b, rewrite_path: {regex: '^/a', replacement: '/b/\\1'}}\n"
    )
    assert errors_of(text) == [
        "routes[0].shadows[0].rewrite_path.regex: bad regex '[': unterminated character set "
        "at position 0",
        "routes[0].shadows[1].rewrite_path: replacement refers to group 1, regex has no such group",
    ]


def test_duplicate_route_name() -> None:
    text = MINIMAL + "  - {name: other, backend: b}\n  - {name: r, backend: b}\n"
    assert errors_of(text) == ["routes[2].name: duplicate route name 'r' (also routes[0])"]


def test_two_shadows_of_a_route_need_two_target_names() -> None:
    text = one_route("name: r\nbackend: a\nshadows: [{backend: b}, {backend: a}, {backend: b}]")
    assert errors_of(text) == [
        "routes[0].shadows[2].backend: 'b' is already the target of routes[0].shadows[0]; "
        "to send two copies, declare a second backend name with the same endpoints"
    ]


def test_bad_route_name() -> None:
    assert errors_of(one_route("name: 'my route'\nbackend: a")) == [
        "routes[0].name: bad name 'my route': use letters, digits and _ . - only"
    ]


def test_both_backend_and_backends() -> None:
    text = one_route("name: r\nbackend: a\nbackends: [{backend: b, weight: 1}]")
    assert errors_of(text) == ["routes[0]: set either backend or backends, not both"]


def test_neither_backend_nor_backends() -> None:
    assert errors_of(one_route("name: r\nmatch: {path: /x}")) == [
        "routes[0]: needs backend or backends"
    ]


def test_weights_all_zero_and_negative() -> None:
    zero = one_route("name: r\nbackends: [{backend: a, weight: 0}, {backend: b, weight: 0}]")
    assert errors_of(zero) == ["routes[0].backends: weights may not all be 0"]
    negative = one_route("name: r\nbackends: [{backend: a, weight: -1}]")
    assert errors_of(negative) == ["routes[0].backends[0].weight: must be >= 0"]


def test_bad_sample_by() -> None:
    text = one_route("name: r\nbackend: a\nshadows: [{backend: b, sample_by: 'ip'}]")
    assert errors_of(text) == [
        "routes[0].shadows[0].sample_by: must be header:NAME, cookie:NAME, query:NAME or "
        "client_ip, not 'ip'"
    ]


def test_bad_ordered_by_and_send() -> None:
    text = one_route(
        "name: r\nbackend: a\nshadows: [{backend: b, ordered_by: 'cookie:x', send: later}]"
    )
    assert errors_of(text) == [
        "routes[0].shadows[0].ordered_by: must be path, header:NAME or query:NAME, not 'cookie:x'",
        "routes[0].shadows[0].send: must be 'with_request' or 'after_response', got 'later'",
    ]


def test_only_if_primary_contradicting_explicit_send() -> None:
    text = one_route(
        "name: r\nbackend: a\nshadows: [{backend: b, only_if_primary: 2xx, send: with_request}]"
    )
    assert errors_of(text) == [
        "routes[0].shadows[0]: only_if_primary needs send: after_response "
        "(leave send out to imply it)"
    ]


def test_reserved_shadow_headers() -> None:
    text = one_route(
        "name: r\nbackend: a\nshadows: [{backend: b, headers: {set: {Host: x}, "
        "remove: [X-Shadowlane-Shadow]}}]"
    )
    assert errors_of(text) == [
        "routes[0].shadows[0].headers.set: header 'host' cannot be changed here "
        "(use host:/host_suffix:)",
        "routes[0].shadows[0].headers.remove: header 'x-shadowlane-shadow' cannot be changed "
        "here (shadowlane manages it)",
    ]


def test_bad_endpoints() -> None:
    text = MINIMAL.replace(
        '["http://127.0.0.1:9001"]', '[foo, "http://a:1/api", "ftp://b", "http://a:99999"]'
    )
    assert errors_of(text) == [
        "backends.a.endpoints[0]: not a URL: 'foo' (want http://host:port or https://host:port)",
        "backends.a.endpoints[1]: no path allowed in an endpoint: 'http://a:1/api' "
        "(routes keep the path)",
        "backends.a.endpoints[2]: not a URL: 'ftp://b' (want http://host:port or https://host:port)",
        "backends.a.endpoints[3]: not a URL: 'http://a:99999' (port out of range 0-65535)",
    ]


def test_type_errors_are_reworded() -> None:
    text = MINIMAL.replace('9002"]}', '9002"], max_connections: yes, verify: maybe}')
    assert errors_of(text) == [
        "backends.b.max_connections: must be an integer, got true, a boolean; quote it to make "
        "it text",
        "backends.b.verify: must be true or false, got 'maybe'",
    ]


def test_missing_and_empty_sections() -> None:
    assert errors_of("listen: 127.0.0.1:80\n") == ["backends: required", "routes: required"]
    assert errors_of("backends: {}\nroutes: []\n") == [
        "backends: must not be empty",
        "routes: must not be empty",
    ]


def test_listen_errors() -> None:
    assert errors_of("listen: localhost\nadmin: {listen: '::1:80'}\n" + MINIMAL) == [
        "listen: not host:port: 'localhost' (e.g. 127.0.0.1:8080)",
        "admin.listen: IPv6 addresses need brackets: '::1:80' (e.g. [::1]:8080)",
    ]


def test_listen_and_admin_must_differ() -> None:
    text = "listen: 127.0.0.1:7000\nadmin: {listen: 127.0.0.1:7000}\n" + MINIMAL
    assert errors_of(text) == ["admin.listen: same address as listen (127.0.0.1:7000)"]
    # port 0 means "any free port" for each, so two of them do not collide
    text0 = "listen: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\n" + MINIMAL
    assert parse_config(text0).listen_addr == ("127.0.0.1", 0)


def test_bad_store() -> None:
    assert errors_of("compare: {store: 'mysql://x'}\n" + MINIMAL) == [
        "compare.store: must start with sqlite:/// or postgresql://, not 'mysql://x'"
    ]


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("backends:\n  a: {endpoints: [x]\nroutes: []\n", "cfg.yaml")
    (line,) = info.value.errors
    assert line.startswith("cfg.yaml:3:1: ")


def test_yaml_duplicate_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "backends: {}\n", "cfg.yaml")
    assert info.value.errors == ["cfg.yaml:7:1: duplicate key 'backends' (first at line 1)"]


def test_top_level_not_a_mapping() -> None:
    assert errors_of("- a\n- b\n") == ["<config>: top level must be a mapping of keys, got a list"]
    assert errors_of("") == ["<config>: empty config (needs at least backends and routes)"]


def test_multiple_errors_all_reported_in_file_order() -> None:
    text = textwrap.dedent(
        """\
        listen: nope
        limits: {header_timeout: soon}
        backends:
          a: {endpoints: ["http://a"], max_idle: -1}
        routes:
          - name: r
            backend: a
            mach: {}
            shadows: [{backend: a, percent: 101, sample_by: x}]
          - name: s
            backends: [{backend: a}]
        """
    )
    assert errors_of(text) == [
        "listen: not host:port: 'nope' (e.g. 127.0.0.1:8080)",
        "limits.header_timeout: not a duration: 'soon' (use e.g. 250ms, 5s, 1m)",
        "backends.a.max_idle: must be >= 0",
        "routes[0].mach: unknown key",
        "routes[0].shadows[0].percent: must be 0..100",
        "routes[0].shadows[0].sample_by: must be header:NAME, cookie:NAME, query:NAME or "
        "client_ip, not 'x'",
        "routes[1].backends[0].weight: required",
    ]


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "shadowlane.yaml"
    path.write_text(FULL)
    assert load_config(path).routes[1].name == "canary"
    path.write_text("routes: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors[0].startswith(f"{path}:2:1: ")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.errors == [
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    ]


def test_summary_names_everything_that_matters() -> None:
    text = summarize(parse_config(FULL))
    for needle in (
        "127.0.0.1:8080",
        "[::1]:9901 (token from $SHADOWLANE_TOKEN)",
        "/var/log/shadowlane.jsonl",
        "http://127.0.0.1:9001, http://127.0.0.1:9011",
        "https://orders-v2.internal:443",
        "orders: host=*.example.com path_prefix=/orders methods=GET,POST header x-tenant=acme",
        "orders-v1 90 (90%), orders-v2 10 (10%)",
        "shadow -> orders-v2  12.5%, by header:x-user-id",
        "after primary 2xx",
        "timeout 1.5s, in flight 8, queue 0, compare",
        "compare",
        "postgresql://shadow@db/shadowlane",
    ):
        assert needle in text, needle
    assert len(text.splitlines()) <= 25  # one screen


def test_docs_full_example_is_valid() -> None:
    """docs/config.md's example must keep loading as the models change."""
    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    example = doc.split("## Full example", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    cfg = parse_config(example, "docs/config.md")
    assert [r.name for r in cfg.routes] == ["orders-read", "orders-write", "search", "default"]
    assert cfg.routes[1].shadows[0].send == "after_response"


def test_order_and_ids_from_primary() -> None:
    cfg = parse_config(
        one_route(
            """name: r
backend: a
shadows:
  - backend: b
    order: {scope: es-writes, keys: elasticsearch}
    ids_from_primary: elasticsearch
  - backend: a
    order: {keys: [path, "header:X-Account", 'path_regex:^/o/(\\d+)', "json:/ids"], barrier: true}
"""
        )
    )
    es, generic = cfg.routes[0].shadows
    assert es.ordering is not None and es.ordering.scope == "es-writes"
    assert es.ordering.keys == "elasticsearch" and es.ids_from_primary == "elasticsearch"
    assert es.send == "with_request" and es.waits_for_primary
    assert generic.ordering is not None and generic.ordering.barrier
    keys = ["path", "header:x-account", "path_regex:^/o/(\\d+)", "json:/ids"]
    assert generic.ordering.keys == keys


def test_order_errors_name_the_key() -> None:
    route = """name: r
backend: a
shadows:
  - backend: b
    {opts}
"""
    cases = {
        "ordered_by: path\n    order: {keys: [path]}": "routes[0].shadows[0]: set either "
        "ordered_by or order, not both",
        "order: {keys: [cookie:x]}": "routes[0].shadows[0].order.keys",
        "order: {keys: ['path_regex:(']}": "routes[0].shadows[0].order.keys",
        "order: {keys: ['json:ids']}": "routes[0].shadows[0].order.keys",
        "order: {keys: []}": "routes[0].shadows[0].order.keys",
        "order: {keys: opensearch}": "routes[0].shadows[0].order.keys",
        "order: {scope: 'a b', keys: [path]}": "routes[0].shadows[0].order.scope",
        "order: {keys: [path], stray: 1}": "routes[0].shadows[0].order.stray",
        "ids_from_primary: mongodb": "routes[0].shadows[0].ids_from_primary",
        "ids_from_primary: elasticsearch\n    send: with_request": "routes[0].shadows[0]: "
        "ids_from_primary needs the primary's answer",
    }
    for opts, want in cases.items():
        errors = errors_of(one_route(route.replace("{opts}", opts)))
        assert len(errors) >= 1 and errors[0].startswith(want), (opts, errors)


def test_limits_and_overload_keys() -> None:
    cfg = parse_config(
        MINIMAL
        + textwrap.dedent(
            """\
            limits:
              max_connections: 100
              max_requests_per_connection: 10
              min_body_rate: 2KiB
              body_rate_window: 5s
              fd_reserve: 32
              overload:
                rss: {shed_shadows: 512MiB, refuse: 1GiB}
                in_flight: {shed_shadows: 100}
                retry_after: 1500ms
                heap_release: {interval: 250ms, min_free: 4MiB}
            """
        ),
        "cfg.yaml",
    )
    lim = cfg.limits
    assert (lim.max_connections, lim.max_requests_per_connection, lim.fd_reserve) == (100, 10, 32)
    assert (lim.min_body_rate, lim.body_rate_window) == (2048, 5.0)
    ov = lim.overload
    assert (ov.rss.shed_shadows, ov.rss.refuse) == (512 * 1024**2, 1024**3)
    assert (ov.in_flight.shed_shadows, ov.in_flight.refuse, ov.retry_after) == (100, 0, 1.5)
    assert (ov.heap_release.interval, ov.heap_release.min_free) == (0.25, 4 * 1024**2)
    # defaults: slow POSTs are cut, nothing else is capped, the overload manager is off
    default = parse_config(MINIMAL, "cfg.yaml").limits
    assert (default.min_body_rate, default.body_rate_window) == (1024, 30.0)
    assert (default.max_connections, default.max_requests_per_connection) == (0, 0)
    assert default.overload.rss.refuse == 0 and default.overload.in_flight.refuse == 0
    # ... but freed heap is handed back, so an RSS watermark follows what is in use
    assert (default.overload.heap_release.interval, default.overload.heap_release.min_free) == (
        1.0,
        16 * 1024**2,
    )


def test_limits_errors_name_the_key() -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        limits:
          max_connections: -1
          overload:
            rss: {shed_shadows: 2GiB, refuse: 1GiB}
            in_flight: {refuse: 10, shed: 5}
            heap_release: {interval: -1s, min_free: lots}
        """
    )
    errors = errors_of(text)
    assert errors[:3] == [
        "limits.max_connections: must be >= 0",
        "limits.overload.rss: shed_shadows must not be above refuse (shadows are shed first)",
        "limits.overload.in_flight.shed: unknown key",
    ]
    assert [e.split(":")[0] for e in errors[3:]] == [
        "limits.overload.heap_release.interval",
        "limits.overload.heap_release.min_free",
    ], errors
