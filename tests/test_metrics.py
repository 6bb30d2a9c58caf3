"""Metrics as Prometheus sees them: every assertion reads the rendered text through the parser."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from shadowlane import __version__
from shadowlane.metrics import (
    BUCKETS,
    COMPARISON_RESULTS,
    NO_ROUTE,
    SHADOW_OUTCOMES,
    Metrics,
    mark_process_dead,
    reset_multiprocess_dir,
)


def samples(metrics: Metrics) -> list[Sample]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def find(all_samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    """Samples named `name` whose labels are exactly `labels` (not a superset)."""
    return [s for s in all_samples if s.name == name and s.labels == labels]


def value(all_samples: list[Sample], name: str, **labels: str) -> float:
    found = find(all_samples, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value


def buckets(all_samples: list[Sample], name: str, **labels: str) -> dict[str, float]:
    """le -> cumulative count of one histogram series."""
    out = {}
    for s in all_samples:
        if (
            s.name == name + "_bucket"
            and {k: v for k, v in s.labels.items() if k != "le"} == labels
        ):
            out[s.labels["le"]] = s.value
    return out


def test_request_counter_and_histogram_exact_labels_and_values() -> None:
    m = Metrics()
    m.observe_request("orders", "orders-v1", 200, 0.003)
    m.observe_request("orders", "orders-v1", 200, 0.2)
    m.observe_request("orders", "orders-v1", 502, 1.5)
    m.observe_request(NO_ROUTE, NO_ROUTE, 404, 0.0001)
    s = samples(m)

    assert (
        value(s, "shadowlane_requests_total", route="orders", backend="orders-v1", code="200") == 2
    )
    assert (
        value(s, "shadowlane_requests_total", route="orders", backend="orders-v1", code="502") == 1
    )
    assert value(s, "shadowlane_requests_total", route="", backend="", code="404") == 1
    assert len([x for x in s if x.name == "shadowlane_requests_total"]) == 3

    h = "shadowlane_request_duration_seconds"
    assert value(s, h + "_count", route="orders", backend="orders-v1") == 3
    assert value(s, h + "_sum", route="orders", backend="orders-v1") == pytest.approx(1.703)
    b = buckets(s, h, route="orders", backend="orders-v1")
    assert b["0.0025"] == 0
    assert b["0.005"] == 1
    assert b["0.25"] == 2
    assert b["1.0"] == 2
    assert b["2.5"] == 3
    assert b["+Inf"] == 3
    assert value(s, h + "_count", route="", backend="") == 1
    assert buckets(s, h, route="", backend="")["0.0005"] == 1


def test_primary_and_shadow_histograms_share_buckets() -> None:
    m = Metrics()
    m.observe_request("r", "b", 200, 0.01)
    m.observe_shadow("r", "t", 0.01)
    s = samples(m)
    primary = buckets(s, "shadowlane_request_duration_seconds", route="r", backend="b")
    shadow = buckets(s, "shadowlane_shadow_duration_seconds", route="r", target="t")
    assert list(primary) == list(shadow)
    assert primary == shadow
    expected = [*(float(b) for b in BUCKETS), float("inf")]
    assert [float(le) for le in primary] == expected
    assert BUCKETS[0] == 0.0005
    assert BUCKETS[-1] == 30.0
    assert 14 <= len(BUCKETS) <= 17


def test_shadow_outcomes_and_comparisons() -> None:
    m = Metrics()
    m.shadow_outcome("orders", "orders-v2", "sent")
    m.shadow_outcome("orders", "orders-v2", "ok")
    m.shadow_outcome("orders", "orders-v2", "dropped", n=5)
    m.shadow_outcome("orders", "orders-v3", "timeout")
    m.comparison("orders", "orders-v2", "diff")
    m.comparison("orders", "orders-v2", "diff")
    m.comparison("orders", "orders-v2", "match")
    m.observe_shadow("orders", "orders-v2", 0.04)
    s = samples(m)

    sr = "shadowlane_shadow_requests_total"
    assert value(s, sr, route="orders", target="orders-v2", outcome="sent") == 1
    assert value(s, sr, route="orders", target="orders-v2", outcome="ok") == 1
    assert value(s, sr, route="orders", target="orders-v2", outcome="dropped") == 5
    assert value(s, sr, route="orders", target="orders-v3", outcome="timeout") == 1
    # Every outcome of a seen pair exists (at zero), so rate() and ratios work from the start.
    for outcome in SHADOW_OUTCOMES:
        find_one = find(s, sr, route="orders", target="orders-v3", outcome=outcome)
        assert len(find_one) == 1
    assert value(s, sr, route="orders", target="orders-v3", outcome="error") == 0

    c = "shadowlane_comparisons_total"
    assert value(s, c, route="orders", target="orders-v2", result="diff") == 2
    assert value(s, c, route="orders", target="orders-v2", result="match") == 1
    assert {x.labels["result"] for x in s if x.name == c} == set(COMPARISON_RESULTS)

    assert (
        value(s, "shadowlane_shadow_duration_seconds_count", route="orders", target="orders-v2")
        == 1
    )


def test_unknown_outcome_or_result_is_rejected() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="unknown shadow outcome"):
        m.shadow_outcome("r", "t", "succeeded")
    with pytest.raises(ValueError, match="unknown comparison result"):
        m.comparison("r", "t", "same")


def test_declare_shadow_creates_zero_series() -> None:
    m = Metrics()
    m.declare_shadow("r", "t")
    s = samples(m)
    for outcome in SHADOW_OUTCOMES:
        assert (
            value(s, "shadowlane_shadow_requests_total", route="r", target="t", outcome=outcome)
            == 0
        )
    for result in COMPARISON_RESULTS:
        assert value(s, "shadowlane_comparisons_total", route="r", target="t", result=result) == 0


def test_build_info() -> None:
    s = samples(Metrics())
    assert value(s, "shadowlane_build_info", version=__version__) == 1


def test_gauge_provider_is_evaluated_at_scrape_time() -> None:
    m = Metrics()
    depth = {"orders-v2": 0}
    calls = []

    def provider() -> list[tuple[tuple[str, ...], float]]:
        calls.append(1)
        return [((target,), float(n)) for target, n in depth.items()]

    m.set_gauge_provider("shadowlane_shadow_queue_depth", "Queued copies.", ("target",), provider)
    assert calls == []  # registering does not evaluate it
    assert value(samples(m), "shadowlane_shadow_queue_depth", target="orders-v2") == 0
    depth["orders-v2"] = 7
    depth["orders-v3"] = 1
    s = samples(m)
    assert value(s, "shadowlane_shadow_queue_depth", target="orders-v2") == 7
    assert value(s, "shadowlane_shadow_queue_depth", target="orders-v3") == 1
    assert len(calls) == 2


def test_gauge_provider_replace_remove_and_failure() -> None:
    m = Metrics()
    m.set_gauge_provider("shadowlane_pool_connections", "d", ("backend",), lambda: [(("a",), 1)])
    m.set_gauge_provider("shadowlane_pool_connections", "d", ("backend",), lambda: [(("b",), 2)])
    s = samples(m)
    assert find(s, "shadowlane_pool_connections", backend="a") == []
    assert value(s, "shadowlane_pool_connections", backend="b") == 2

    def broken() -> list[tuple[tuple[str, ...], float]]:
        raise RuntimeError("boom")

    m.set_gauge_provider("shadowlane_broken", "d", (), broken)
    m.observe_request("r", "b", 200, 0.001)
    s = samples(m)  # a failing provider is left out; the rest of the scrape still works
    assert [x for x in s if x.name == "shadowlane_broken"] == []
    assert value(s, "shadowlane_requests_total", route="r", backend="b", code="200") == 1

    m.remove_gauge_provider("shadowlane_pool_connections")
    assert [x for x in samples(m) if x.name == "shadowlane_pool_connections"] == []
    # The name is free again after removal; a clash with a built-in name is refused.
    m.set_gauge_provider("shadowlane_pool_connections", "d", (), lambda: [((), 3)])
    assert value(samples(m), "shadowlane_pool_connections") == 3
    with pytest.raises(ValueError):
        m.set_gauge_provider("shadowlane_build_info", "d", (), lambda: [])


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("r", "b", 200, 0.001)
    assert find(samples(b), "shadowlane_requests_total", route="r", backend="b", code="200") == []


_WORKER = textwrap.dedent(
    """
    import sys
    from shadowlane.metrics import Metrics
    m = Metrics(multiprocess_dir=sys.argv[1])
    n = int(sys.argv[2])
    for _ in range(n):
        m.observe_request("orders", "orders-v1", 200, 0.003)
    m.shadow_outcome("orders", "orders-v2", "ok", n)
    if sys.argv[3] == "render":
        sys.stdout.write(m.render()[0].decode())
    else:
        m.flush()  # what a worker's drain does; counts not flushed stay in the process
    """
)


def test_multiprocess_render_sums_over_processes(tmp_path: Path) -> None:
    # Separate interpreters: multiprocess mode is a per-process switch and must not leak into the
    # other tests of this process.
    mp = tmp_path / "mp"
    reset_multiprocess_dir(str(mp))
    (mp / "counter_999999.db").write_bytes(b"stale")
    reset_multiprocess_dir(str(mp))
    assert list(mp.iterdir()) == []

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}

    def run(n: int, mode: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER, str(mp), str(n), mode],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=True,
        )
        return proc.stdout

    run(3, "quiet")
    run(4, "quiet")
    text = run(5, "render")
    s = [x for fam in text_string_to_metric_families(text) for x in fam.samples]
    assert (
        value(s, "shadowlane_requests_total", route="orders", backend="orders-v1", code="200") == 12
    )
    assert (
        value(s, "shadowlane_request_duration_seconds_count", route="orders", backend="orders-v1")
        == 12
    )
    sr = "shadowlane_shadow_requests_total"
    assert value(s, sr, route="orders", target="orders-v2", outcome="ok") == 12
    # Build info is reported once by the rendering process, not summed over workers.
    assert value(s, "shadowlane_build_info", version=__version__) == 1


_GAUGE_WORKER = textwrap.dedent(
    """
    import sys
    from shadowlane.metrics import Metrics
    m = Metrics(multiprocess_dir=sys.argv[1])
    state = {"a": float(sys.argv[2]), "b": 2.0}
    m.set_gauge_provider(
        "shadowlane_shadow_queued", "q", ("route", "target"),
        lambda: [(("r", t), v) for t, v in state.items()],
    )
    m.flush()
    del state["b"]  # the lane went away (a reload): its series must drop back to 0
    if sys.argv[3] == "render":
        sys.stdout.write(m.render()[0].decode())
    else:
        m.flush()
    """
)


def test_multiprocess_gauges_sum_over_workers_and_forget_gone_series(tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    reset_multiprocess_dir(str(mp))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}

    def run(a: float, mode: str) -> tuple[int, str]:
        with subprocess.Popen(
            [sys.executable, "-c", _GAUGE_WORKER, str(mp), str(a), mode],
            stdout=subprocess.PIPE, text=True, env=env,
        ) as proc:  # fmt: skip
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            return proc.pid, out

    def queued(text: str) -> tuple[float, float]:
        s = [x for fam in text_string_to_metric_families(text) for x in fam.samples]
        name = "shadowlane_shadow_queued"
        return value(s, name, route="r", target="a"), value(s, name, route="r", target="b")

    first, _ = run(3, "quiet")  # another worker's figures, in the shared files
    second, text = run(4, "render")
    assert queued(text) == (7, 0)  # summed; the series that went away is back to 0
    for pid in (first, second):
        mark_process_dead(pid, str(mp))  # what the supervisor does when a worker exits
    assert queued(run(4, "render")[1]) == (4, 0)


def test_multiprocess_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        Metrics(multiprocess_dir=str(tmp_path / "missing"))


def test_contract_outcomes_and_results_are_present() -> None:
    # DESIGN.md names these; more may be added, none may go.
    contract = ("sampled_out", "sent", "ok", "error", "timeout", "dropped", "skipped_body")
    assert SHADOW_OUTCOMES[: len(contract)] == contract
    assert COMPARISON_RESULTS == ("match", "diff", "noise", "dropped")
    m = Metrics()
    for outcome in SHADOW_OUTCOMES:
        m.shadow_outcome("r", "t", outcome)
    s = samples(m)
    for outcome in SHADOW_OUTCOMES:
        assert (
            value(s, "shadowlane_shadow_requests_total", route="r", target="t", outcome=outcome)
            == 1
        )
