"""`record:` in the config: keys, defaults, errors naming the key, and `check`'s summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowlane.config import ConfigError, parse_config, summarize

BASE = """
backends: {b: {endpoints: ["http://127.0.0.1:1"]}, c: {endpoints: ["http://127.0.0.1:2"]}}
routes:
  - name: r
    backend: b
    record: %s
    shadows: [{backend: c, record: %s}]
"""


def load(route: str, shadow: str = "{dir: /tmp/x}") -> object:
    return parse_config(BASE % (route, shadow))


def errors(route: str, shadow: str = "{dir: /tmp/x}") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(route, shadow)
    return info.value.errors


def test_defaults_and_keys(tmp_path: Path) -> None:
    cfg = parse_config(BASE % (f"{{dir: {tmp_path}}}", "{dir: /tmp/y, answers: true}"))
    rec = cfg.routes[0].record
    assert rec is not None
    assert (rec.answers, rec.percent, rec.sample_by, rec.gzip) == (False, 100.0, None, False)
    assert (rec.max_file_size, rec.max_file_age) == (256 * 1024**2, 3600.0)
    assert (rec.max_body, rec.queue) == (1024**2, 64 * 1024**2)
    assert not rec.redact and rec.redact.secret_env is None
    shadow_rec = cfg.routes[0].shadows[0].record
    assert shadow_rec is not None and shadow_rec.answers
    full = parse_config(BASE % (
        "{dir: /tmp/x, percent: 12.5%, sample_by: header:X-User, max_file_size: 1MiB, "
        "max_file_age: 10m, gzip: false, max_body: 4KiB, queue: 1MiB, redact: {headers: "
        "[Authorization], json: [body.password, '**.token'], query: [key], secret_env: SEC}}",
        "{dir: /tmp/x}"))  # fmt: skip
    r = full.routes[0].record
    assert r is not None
    assert (r.percent, r.sample_by, r.sample_key) == (12.5, "header:x-user", ("header", "x-user"))
    assert r.redact.headers == ["authorization"] and r.redact.json_ == ["body.password", "**.token"]
    assert r.redact.query == ["key"] and r.redact.secret_env == "SEC"
    text = summarize(full)
    assert "record -> /tmp/x  12.5%, by header:x-user, requests only, plain" in text
    assert "redact 1 headers, 2 json, 1 query" in text
    assert "      record -> /tmp/x  100%, requests only, plain" in text  # the shadow's


def test_errors_name_the_key(tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert errors("{dir: /tmp/x, percent: 120}") == ["routes[0].record.percent: must be 0..100"]
    assert errors("{dir: /tmp/x, bogus: 1}") == ["routes[0].record.bogus: unknown key"]
    assert errors("{answers: true}") == ["routes[0].record.dir: required"]
    assert errors("") == ["routes[0].record.dir: required"]  # `record:` alone: needs dir
    assert errors(f"{{dir: {a_file}}}") == [f"routes[0].record.dir: not a directory: {a_file}"]
    assert errors("{dir: /tmp/x, sample_by: user}")[0].startswith(
        "routes[0].record.sample_by: must be header:NAME"
    )
    assert errors("{dir: /tmp/x, queue: 0}") == ["routes[0].record.queue: must be > 0"]
    assert errors("{dir: /tmp/x, redact: {json: [headers.x]}}")[0].startswith(
        "routes[0].record.redact.json[0]: bad redaction path 'headers.x'"
    )
    assert errors("{dir: /tmp/x, redact: {headers: ['bad name']}}") == [
        "routes[0].record.redact.headers: not a header name: 'bad name'"
    ]
    assert errors("{dir: /tmp/x, redact: {secret_env: 1x}}") == [
        "routes[0].record.redact.secret_env: not an environment variable name: '1x'"
    ]
    assert errors("{dir: /tmp/x}", "{dir: /tmp/x, max_file_age: 0}") == [
        "routes[0].shadows[0].record.max_file_age: must be > 0"
    ]
