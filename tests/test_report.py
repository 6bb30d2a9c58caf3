"""`render_report`: the text table and the JSON document, from a store filled by the comparator."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import orjson
import pytest

from shadowlane.compare import Captured, Comparator, CompareJob, compile_settings
from shadowlane.config import ShadowCompare
from shadowlane.report import render_report
from shadowlane.store import Store, open_store


def _answer(doc: dict[str, object], seconds: float) -> Captured:
    return Captured(
        200, [(b"content-type", b"application/json")], orjson.dumps(doc), False, seconds
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    comp = Comparator(store, None, 1000, flush_interval=0.05).start()
    settings = compile_settings(ShadowCompare(secondary="v1b"))
    for i in range(200):
        # orders: `total` really differs on 1 request in 4; `trace` is random everywhere
        p = {"id": i, "total": 10, "trace": uuid.uuid4().hex}
        c = {"id": i, "total": 11 if i % 4 == 0 else 10, "trace": uuid.uuid4().hex}
        s = {"id": i, "total": 10, "trace": uuid.uuid4().hex}
        comp.submit(
            CompareJob(
                "orders",
                "orders-v2",
                f"r{i}",
                "GET",
                f"/orders/{i}",
                b"",
                _answer(p, 0.010),
                _answer(c, 0.025),
                _answer(s, 0.011),
                settings,
                ts=time.time(),
            )
        )
    for i in range(50):
        same = {"ok": True}
        comp.submit(
            CompareJob(
                "health",
                "orders-v2",
                f"h{i}",
                "GET",
                "/health",
                b"",
                _answer(same, 0.001),
                _answer(same, 0.001),
                None,
                settings,
            )
        )
    assert comp.wait_idle(20)
    comp.stop()
    return store


def test_text_report(store: Store) -> None:
    text = render_report(store, "text")
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:5] == ["route", "target", "compared", "differing", "noise"]
    health = next(line for line in lines if line.startswith("health "))
    assert health.split()[:5] == ["health", "orders-v2", "50", "0%", "0%"]
    orders = next(line for line in lines if line.startswith("orders "))
    # 50 of 200 really differ; the other 150 differ only in the noisy trace field
    assert orders.split()[:5] == ["orders", "orders-v2", "200", "25.0%", "75.0%"]
    # latency p50 and p99, primary beside shadow (bucketed, within ~5%)
    cells = re.findall(r"([\d.]+)ms / ([\d.]+)ms", orders)
    assert len(cells) == 2  # p50, then p99
    for primary_ms, shadow_ms in cells:
        assert float(primary_ms) == pytest.approx(10, rel=0.05)
        assert float(shadow_ms) == pytest.approx(25, rel=0.05)
    assert "orders -> orders-v2: 1 field(s) really differ" in text
    field_line = next(line for line in lines if line.strip().startswith("body.total"))
    assert field_line.split() == ["body.total", "25.0%", "0%", "50"]
    assert "(1 more field(s) differ within their noise, not reported)" in text
    assert "health -> orders-v2: 0 field(s) really differ" in text
    assert "body.trace" not in text


def test_json_report(store: Store) -> None:
    doc = orjson.loads(render_report(store, "json"))
    rows = {(r["route"], r["target"]): r for r in doc["comparisons"]}
    orders = rows[("orders", "orders-v2")]
    assert (orders["compared"], orders["differing"], orders["noise"]) == (200, 50, 150)
    assert orders["top_fields"] == [{"field": "body.total", "raw_rate": 0.25, "noise_rate": 0.0}]
    fields = {f["field"]: f for f in orders["fields"]}
    assert fields["body.trace"]["reported"] is False
    assert fields["body.trace"]["raw"] == 200 and fields["body.trace"]["noise"] == 200
    assert orders["latency"]["shadow_p50"] == pytest.approx(0.025, rel=0.05)
    assert rows[("health", "orders-v2")]["matched"] == 50


def test_empty_store_and_bad_format(tmp_path: Path) -> None:
    with open_store("sqlite:///:memory:") as store:
        assert render_report(store) == (
            "no comparisons recorded yet\n\ndivergence ledger: no divergences\n"
        )
        assert orjson.loads(render_report(store, "json")) == {
            "comparisons": [],
            "ledger": {"open": 0, "targets": []},
        }
        with pytest.raises(ValueError, match="unknown report format"):
            render_report(store, "yaml")


def test_report_judges_by_the_configs_thresholds(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-c FILE` applies its `compare.thresholds`; `--store URL` has no config, so the defaults."""
    from shadowlane.cli import main

    url = f"sqlite:///{tmp_path}/r.db"
    config = tmp_path / "c.yaml"
    config.write_text(
        "backends:\n"
        "  v1: {endpoints: [http://127.0.0.1:9001]}\n"
        "  v2: {endpoints: [http://127.0.0.1:9002]}\n"
        "routes:\n"
        "  - {name: orders, backend: v1, shadows: [{backend: v2, compare: true}]}\n"
        f"compare: {{store: '{url}', thresholds: {{absolute: 30}}}}\n"
    )
    assert main(["report", "--store", url]) == 0
    assert "orders -> orders-v2: 1 field(s) really differ" in capsys.readouterr().out
    # body.total differs on 25% of requests: below an absolute threshold of 30%
    assert main(["report", "-c", str(config)]) == 0
    text = capsys.readouterr().out
    assert "orders -> orders-v2: 0 field(s) really differ" in text
    assert "(2 more field(s) differ within their noise, not reported)" in text
    assert main(["report", "-c", str(config), "--format", "json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    orders = next(r for r in doc["comparisons"] if r["route"] == "orders")
    assert orders["top_fields"] == []
