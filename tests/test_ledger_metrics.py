"""The ledger's metrics as Prometheus reads them: `shadowlane_divergences_total{route,target,
reason}` and `shadowlane_ledger_dropped_total{route,target}`, through the rendered text."""

from __future__ import annotations

import threading

import pytest

from shadowlane.metrics import DIVERGENCE_REASONS, Metrics
from test_metrics import find, samples, value

DIV = "shadowlane_divergences_total"
DROPPED = "shadowlane_ledger_dropped_total"


def test_divergences_are_counted_per_reason() -> None:
    m = Metrics()
    m.divergence("es-bulk", "es8", "dropped")
    m.divergence("es-bulk", "es8", "dropped", n=4)
    m.divergence("es-bulk", "es8", "bulk_item")
    m.divergence("es-index", "es8", "timeout")
    s = samples(m)
    assert value(s, DIV, route="es-bulk", target="es8", reason="dropped") == 5
    assert value(s, DIV, route="es-bulk", target="es8", reason="bulk_item") == 1
    assert value(s, DIV, route="es-index", target="es8", reason="timeout") == 1
    # the first count of a pair declares every reason of it, at zero until it happens
    for reason in DIVERGENCE_REASONS:
        assert len(find(s, DIV, route="es-index", target="es8", reason=reason)) == 1
    assert value(s, DIV, route="es-index", target="es8", reason="error") == 0
    assert value(s, DROPPED, route="es-index", target="es8") == 0
    # counts accumulate across renders (a flush hands them over once)
    m.divergence("es-bulk", "es8", "dropped")
    assert value(samples(m), DIV, route="es-bulk", target="es8", reason="dropped") == 6


def test_declare_ordered_creates_zero_series() -> None:
    m = Metrics()
    m.declare_ordered("r", "t")
    s = samples(m)
    assert {x.labels["reason"] for x in s if x.name == DIV} == set(DIVERGENCE_REASONS)
    assert all(x.value == 0 for x in s if x.name == DIV)
    assert value(s, DROPPED, route="r", target="t") == 0
    # only ordered pairs get these series: a plain shadow does not
    m.declare_shadow("r", "plain")
    assert find(samples(m), DROPPED, route="r", target="plain") == []


def test_unknown_reason_is_rejected() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="unknown divergence reason 'lost'"):
        m.divergence("r", "t", "lost")  # type: ignore[arg-type]
    assert find(samples(m), DIV, route="r", target="t", reason="lost") == []


def test_the_contract_reasons() -> None:
    assert DIVERGENCE_REASONS == (
        "dropped",
        "skipped_body",
        "error",
        "timeout",
        "status_mismatch",
        "bulk_item",
        "primary_unusable",
        "primary_incomplete",
        "answer_unusable",
    )


def test_counting_from_threads_while_flushing_loses_nothing() -> None:
    """The comparator's thread counts ledger drops while the loop flushes: no count is lost."""
    m = Metrics()
    per_thread, threads = 5000, 4
    stop = threading.Event()

    def count(i: int) -> None:
        for _ in range(per_thread):
            m.ledger_dropped("r", f"t{i % 2}")
            m.divergence("r", f"t{i % 2}", "timeout")

    def flush() -> None:
        while not stop.is_set():
            m.flush()

    flusher = threading.Thread(target=flush)
    flusher.start()
    workers = [threading.Thread(target=count, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    stop.set()
    flusher.join(10)
    s = samples(m)
    for target in ("t0", "t1"):
        assert value(s, DROPPED, route="r", target=target) == per_thread * threads / 2
        assert value(s, DIV, route="r", target=target, reason="timeout") == per_thread * 2
