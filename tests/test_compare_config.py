"""The compare keys of the config: defaults, forms of `compare:` on a shadow, and errors that name
the key path like every other config error."""

from __future__ import annotations

import pytest

from shadowlane.config import (
    DEFAULT_IGNORE_HEADERS,
    ConfigError,
    ShadowCompare,
    parse_config,
    summarize,
)

BASE = """
backends:
  v1: {endpoints: [http://127.0.0.1:9001]}
  v1b: {endpoints: [http://127.0.0.1:9011]}
  v2: {endpoints: [http://127.0.0.1:9002]}
routes:
  - name: orders
    backend: v1
    shadows:
      - backend: v2
        compare: %s
"""


def shadow_compare(value: str) -> ShadowCompare | None:
    return parse_config(BASE % value).routes[0].shadows[0].compare_enabled


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


def test_compare_forms() -> None:
    assert shadow_compare("false") is None
    assert shadow_compare("true") == ShadowCompare()
    assert shadow_compare("") == ShadowCompare()  # `compare:` alone: defaults, like other blocks
    full = shadow_compare(
        "{mode: subset, ignore: [body.took, 'body.hits.hits[*]._score', headers.x-trace-id],"
        " unordered: [body.items], secondary: v1b, ignore_headers: [X-Node], max_body: 64KiB}"
    )
    assert full == ShadowCompare(
        mode="subset",
        ignore=["body.took", "body.hits.hits[*]._score", "headers.x-trace-id"],
        unordered=["body.items"],
        secondary="v1b",
        ignore_headers=["x-node"],
        max_body=64 * 1024,
    )


def test_defaults() -> None:
    cfg = parse_config(BASE % "true")
    c = cfg.compare
    assert c.store == "sqlite:///shadowlane.db"
    assert c.ignore == []
    assert c.ignore_headers == list(DEFAULT_IGNORE_HEADERS)
    assert (c.thresholds.relative, c.thresholds.absolute) == (20.0, 0.03)
    assert (c.queue, c.queue_bytes, c.examples_per_field, c.batch) == (256, 64 * 1024**2, 5, 500)
    assert (c.retention, c.flush_interval, c.cpu_share) == (7 * 86400.0, 1.0, 0.1)
    assert (c.priority, c.nice) == ("idle", 0)
    assert cfg.routes[0].compare is None
    assert ShadowCompare().max_body == 1024**2
    for name in ("date", "server", "x-request-id", "content-length", "transfer-encoding"):
        assert name in DEFAULT_IGNORE_HEADERS
    for name in ("etag", "set-cookie", "content-type", "location", "last-modified"):
        assert name not in DEFAULT_IGNORE_HEADERS


def test_global_and_route_blocks() -> None:
    text = BASE % "true" + (
        "    compare: {ignore: [body.meta]}\n"
        "compare:\n"
        "  store: postgresql://u@db:5432/sl\n"
        "  ignore: ['**.ts']\n"
        "  ignore_headers: [date]\n"
        "  thresholds: {relative: 10, absolute: 0.5}\n"
        "  queue: 10\n"
        "  examples_per_field: 0\n"
        "  retention: 1h\n"
        "  flush_interval: 250ms\n"
        "  batch: 50\n"
    )
    cfg = parse_config(text)
    assert cfg.routes[0].compare is not None and cfg.routes[0].compare.ignore == ["body.meta"]
    c = cfg.compare
    assert (c.ignore, c.ignore_headers) == (["**.ts"], ["date"])
    assert (c.thresholds.relative, c.thresholds.absolute) == (10.0, 0.5)
    assert (c.queue, c.examples_per_field, c.retention, c.flush_interval, c.batch) == (
        10,
        0,
        3600.0,
        0.25,
        50,
    )
    assert "compare strict" in summarize(cfg)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("{mode: fuzzy}", "routes[0].shadows[0].compare.mode: must be 'strict', 'subset' or"),
        ("maybe", "routes[0].shadows[0].compare: must be true, false or a mapping"),
        ("{colour: red}", "routes[0].shadows[0].compare.colour: unknown key"),
        ("{secondary: v9}", "routes[0].shadows[0].compare.secondary: unknown backend 'v9'"),
        ("{ignore: [foo.bar]}", "routes[0].shadows[0].compare.ignore[0]: bad field path 'foo.bar'"),
        ("{ignore: ['body..x']}", "routes[0].shadows[0].compare.ignore[0]: bad field path"),
        ("{unordered: ['body.']}", "routes[0].shadows[0].compare.unordered[0]: bad field path"),
        ("{ignore_headers: ['a b']}", "routes[0].shadows[0].compare.ignore_headers: not a header"),
        ("{max_body: lots}", "routes[0].shadows[0].compare.max_body: not a size"),
    ],
)
def test_shadow_compare_errors(value: str, error: str) -> None:
    [line] = errors(BASE % value)
    assert line.startswith(error), line


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("  queue: 0\n", "compare.queue: must be >= 1"),
        ("  queue_bytes: 0\n", "compare.queue_bytes: must be > 0"),
        ("  queue_bytes: lots\n", "compare.queue_bytes: "),
        ("  thresholds: {relative: -1}\n", "compare.thresholds.relative: must be >= 0"),
        ("  retention: 0s\n", "compare.retention: must be > 0"),
        ("  batch: yes\n", "compare.batch: must be an integer"),
        ("  ignore: ['[0]']\n", "compare.ignore[0]: bad field path"),
        ("  cpu_share: 0\n", "compare.cpu_share: must be > 0"),
        ("  priority: low\n", "compare.priority: must be 'idle' or 'normal', got 'low'"),
        ("  store: mysql://x\n", "compare.store: must start with sqlite:/// or postgresql://"),
    ],
)
def test_global_compare_errors(block: str, error: str) -> None:
    [line] = errors(BASE % "true" + "compare:\n" + block)
    assert line.startswith(error), line


def test_route_compare_errors() -> None:
    text = BASE % "true" + "    compare: {ignore: [nope], mode: strict}\n"
    assert errors(text) == [
        "routes[0].compare.ignore[0]: bad field path 'nope': must start with status, headers, "
        "trailers, body, * or **",
        "routes[0].compare.mode: unknown key",
    ]


def test_retention_in_days() -> None:
    cfg = parse_config(BASE % "true" + "compare:\n  retention: 7d\n")
    assert cfg.compare.retention == 7 * 86400.0
    assert "for 7d" in summarize(cfg)
