"""The `shadowlane` command as a user runs it: exit codes, what goes to stdout and stderr.

Every invocation is a real subprocess (the console script or `python -m shadowlane`), bounded by
a timeout, so a command that hangs instead of failing fails the test.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from shadowlane import build_kind

SCRIPT = str(Path(sys.executable).with_name("shadowlane"))
MODULE = [sys.executable, "-m", "shadowlane"]
TIMEOUT = 20.0


def run(*args: str, cmd: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(cmd or [SCRIPT]), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def assert_clean_failure(res: subprocess.CompletedProcess[str]) -> list[str]:
    """Exit 2, nothing on stdout, no traceback; the stderr lines."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "", res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.splitlines()


GOOD = """
listen: 127.0.0.1:18080
admin:
  listen: 127.0.0.1:19901
backends:
  orders-v1:
    endpoints: [http://127.0.0.1:9001, http://127.0.0.1:9011]
    timeout: 250ms
  orders-v2:
    endpoints: http://127.0.0.1:9002
routes:
  - name: orders
    match:
      path_prefix: /orders
      methods: [get, POST]
    backend: orders-v1
    shadows:
      - backend: orders-v2
        percent: 10
  - name: canary
    match: {host: "*.example.com"}
    backends:
      - {backend: orders-v1, weight: 90}
      - {backend: orders-v2, weight: 10}
"""


def test_check_good_config_prints_summary(tmp_path: Path) -> None:
    res = run("check", "-c", write(tmp_path, GOOD))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    out = res.stdout
    lines = out.splitlines()
    assert 5 <= len(lines) <= 40, "the summary should fit one screen"
    for expected in (
        "127.0.0.1:18080",
        "127.0.0.1:19901",
        "orders-v1",
        "http://127.0.0.1:9001, http://127.0.0.1:9011",
        "http://127.0.0.1:9002",
        "250ms",
        "orders:",
        "path_prefix=/orders",
        "methods=GET,POST",
        "shadow -> orders-v2",
        "10%",
        "canary:",
        "host=*.example.com",
        "orders-v1 90 (90%)",
        "orders-v2 10 (10%)",
    ):
        assert expected in out, f"{expected!r} missing from the summary:\n{out}"
    assert out.index("orders:") < out.index("canary:"), "routes listed out of config order"


def test_check_reports_every_problem_one_line_each_with_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        listen: nope
        backends:
          b1:
            endpoints: [foo]
            timeout: soon
        routes:
          - name: r1
            mach: {}
            backend: b1
            shadows:
              - backend: b1
                percent: 150
        """,
    )
    lines = assert_clean_failure(run("check", "-c", path))
    prefixes = [
        "listen: ",
        "backends.b1.endpoints[0]: ",
        "backends.b1.timeout: ",
        "routes[0].mach: ",
        "routes[0].shadows[0].percent: ",
    ]
    assert len(lines) == len(prefixes), lines
    for line, prefix in zip(lines, prefixes, strict=True):
        assert line.startswith(prefix), (prefix, line)
    assert lines[3] == "routes[0].mach: unknown key"
    assert lines[4] == "routes[0].shadows[0].percent: must be 0..100"
    assert "'nope'" in lines[0] and "'foo'" in lines[1] and "'soon'" in lines[2]


def test_unknown_backend_references(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        backends:
          b1: {endpoints: [http://127.0.0.1:9001]}
        routes:
          - name: r1
            backend: nope
            shadows: [{backend: ghost}]
          - name: r2
            backends: [{backend: b1, weight: 1}, {backend: b9, weight: 1}]
        """,
    )
    lines = assert_clean_failure(run("check", "-c", path))
    assert lines == [
        "routes[0].backend: unknown backend 'nope' (known: b1)",
        "routes[0].shadows[0].backend: unknown backend 'ghost' (known: b1)",
        "routes[1].backends[1].backend: unknown backend 'b9' (known: b1)",
    ]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "backends:\n  b1: {endpoints: [http://a:1}\n")
    (line,) = assert_clean_failure(run("check", "-c", path))
    assert line.startswith(f"{path}:2:"), line


def test_empty_config_is_one_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    (line,) = assert_clean_failure(run("check", "-c", path))
    assert line.startswith(path) and "empty" in line, line


@pytest.mark.parametrize("command", ["check", "run"])
def test_missing_file_is_a_clear_error(tmp_path: Path, command: str) -> None:
    path = str(tmp_path / "does-not-exist.yaml")
    (line,) = assert_clean_failure(run(command, "-c", path))
    assert line.startswith(path), line
    assert "No such file" in line, line


def test_run_with_bad_config_exits_2_with_the_errors(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    path = write(
        tmp_path,
        """
        listen: 127.0.0.1:0
        backends:
          b1: {endpoints: [http://127.0.0.1:9001], timeout: -1s}
        routes:
          - {name: r1, backend: b9}
          - {name: "bad name", backend: b1}
        """,
    )
    lines = assert_clean_failure(run("run", "-c", path, "--ready-file", str(ready)))
    assert len(lines) == 2, lines
    assert lines[0].startswith("backends.b1.timeout: "), lines
    assert lines[1].startswith("routes[1].name: "), lines
    # it never listened
    assert not ready.exists()
    assert not any("listening on" in line for line in lines)


def test_run_workers_must_be_positive(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    lines = assert_clean_failure(run("run", "-c", path, "--workers", "0"))
    assert any("--workers" in line for line in lines), lines


def test_run_with_listen_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    """Not a config error, but the same courtesy: a one-line reason naming the address, no
    traceback, a non-zero exit."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = write(
            tmp_path,
            f"""
            listen: 127.0.0.1:{port}
            admin: {{listen: 127.0.0.1:0}}
            backends:
              b1: {{endpoints: [http://127.0.0.1:9001]}}
            routes:
              - {{name: r1, backend: b1}}
            """,
        )
        res = run("run", "-c", path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert f"127.0.0.1:{port}" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2, res.stderr


def test_version_from_module_and_script() -> None:
    expected = f"shadowlane {version('shadowlane')} ({build_kind()})"
    for cmd in (MODULE, [SCRIPT]):
        res = run("--version", cmd=cmd)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == expected


def test_no_command_prints_usage_and_exits_2() -> None:
    res = run(cmd=MODULE)
    assert res.returncode == 2
    assert "usage: shadowlane" in res.stderr
    assert "run" in res.stderr and "check" in res.stderr
