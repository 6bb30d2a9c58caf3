"""Migration plans without a proxy: the config section's errors, the gates as pure functions, the
state machine's transitions and what a state means for the routes, the figures' arithmetic,
and the shared state in both real stores (SQLite file and a private PostgreSQL): versions with
compare-and-set, leases, the audit log, and a schema 2 store upgraded in place.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowlane.config import Config, ConfigError
from shadowlane.config import parse_config as parse_text
from shadowlane.migrate import (
    BackendFigures,
    Measured,
    MigrationState,
    Outline,
    Phase,
    RouteFigures,
    TransitionError,
    advance,
    evaluate,
    position,
    resume,
    rollback,
    rollback_worthy,
    settings,
    transition,
)
from shadowlane.migrate.figures import p99, route_figures, window
from shadowlane.migrate.shared import advance_op, ensure, load, rollback_op
from shadowlane.store import AuditRecord, open_store
from test_ledger_store import V1_SCHEMA, RawDb
from test_store import PgCluster, pg_cluster, pg_url  # noqa: F401  (fixtures)


def base(**migration: Any) -> dict[str, Any]:
    mig = {
        "name": "m",
        "old": "v1",
        "new": "v2",
        "stages": [
            {"name": "reads", "shadow": {"routes": ["search"], "percent": 10}},
            {"name": "flip", "weights": [1, 10, 50, 100]},
        ],
        **migration,
    }
    return {
        "backends": {
            "v1": {"endpoints": ["http://127.0.0.1:1"]},
            "v2": {"endpoints": ["http://127.0.0.1:2"]},
        },
        "routes": [
            {
                "name": "search",
                "match": {"path_prefix": "/s"},
                "backends": [{"backend": "v1", "weight": 100}, {"backend": "v2", "weight": 0}],
                "shadows": [
                    {"backend": "v2", "percent": 0, "compare": True},
                    {"backend": "v1", "percent": 0},
                ],
            },
            {"name": "writes", "match": {"path_prefix": "/w"}, "backend": "v1"},
        ],
        "migrations": [mig],
    }


def parse_config(doc: dict[str, Any]) -> Config:
    return parse_text(yaml.safe_dump(doc))


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    return err.value.errors


# -- config --------------------------------------------------------------------------------------


def test_a_full_migration_parses_with_rates_as_percentages() -> None:
    doc = base(
        auto=True,
        reverse_shadow={"window": "30m"},
        verify={"kind": "opensearch", "indices": ["logs-*"]},
    )
    doc["migrations"][0]["stages"][0]["gates"] = {
        "min_time": "10m",
        "min_compared": 1000,
        "max_diff_rate": "0.5%",
        "never_differ": ["body.hits.total.value"],
        "ledger_empty": True,
        "verify_equal": True,
    }
    doc["migrations"][0]["stages"][1]["gates"] = {
        "step_time": "5m",
        "max_error_rate": 0.1,
        "max_p99_ratio": 1.2,
    }
    cfg = parse_config(doc)
    mig = cfg.migrations[0]
    assert mig.stages[0].gates.max_diff_rate == 0.5 and mig.stages[0].gates.min_time == 600
    assert mig.stages[1].gates.max_error_rate == 0.1 and mig.stages[1].is_flip
    assert mig.covered_routes(cfg) == ["search"] and mig.flip_routes(cfg) == ["search"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["migrations"][0].update(new="nope"),
            "migrations[0].new: unknown backend 'nope'",
        ),
        (
            lambda d: d["migrations"][0]["stages"][0]["shadow"].update(routes=["writes"]),
            "migrations[0].stages[0].shadow.routes[0]: route 'writes' has no shadow to 'v2'",
        ),
        (
            lambda d: d["migrations"][0]["stages"][0]["shadow"].update(routes=["gone"]),
            "migrations[0].stages[0].shadow.routes[0]: unknown route 'gone'",
        ),
        (
            lambda d: d["migrations"][0]["stages"][1].update(weights=[10, 5]),
            "migrations[0].stages[1].weights: steps must rise strictly",
        ),
        (
            lambda d: d["migrations"][0]["stages"][1].update(weights=[0, 100]),
            "migrations[0].stages[1].weights: each step must be 1..100",
        ),
        (
            lambda d: d["migrations"][0]["stages"][0].update(gates={"verify_equal": True}),
            "migrations[0].stages[0].gates.verify_equal: needs migrations[0].verify",
        ),
        (
            lambda d: d["migrations"][0]["stages"][0].update(gates={"max_diff_rate": "150%"}),
            "migrations[0].stages[0].gates.max_diff_rate: must be 0..100",
        ),
        (
            lambda d: d["migrations"][0]["stages"][0].update(gates={"min_tme": "1s"}),
            "migrations[0].stages[0].gates.min_tme: unknown key",
        ),
        (
            lambda d: d["migrations"][0]["stages"][0].update(weights=[1]),
            "migrations[0].stages[0]: a stage sets shadow or weights, not both",
        ),
        (
            lambda d: d["migrations"][0]["stages"][1].update(name="reads"),
            "migrations[0]: stage name 'reads' used twice",
        ),
        (
            lambda d: (
                d["routes"][0].update(shadows=[{"backend": "v2", "percent": 0}]),
                d["migrations"][0].update(reverse_shadow={"window": "1m"}),
            ),
            "migrations[0].reverse_shadow: route 'search' has no shadow to 'v1'",
        ),
        (
            lambda d: (
                d["routes"][0].update(backend="v1", backends=None) or d["routes"][0].pop("backends")
            ),
            "migrations[0].stages[1].weights: no route of the migration lists both 'v1' and 'v2'",
        ),
    ],
)
def test_bad_migrations_name_the_key_path(change: Any, expected: str) -> None:
    doc = base()
    change(doc)
    found = errors(doc)
    assert any(line.startswith(expected) for line in found), found


# -- gates ---------------------------------------------------------------------------------------


def gates(**kw: Any) -> Any:
    doc = base()
    doc["migrations"][0]["stages"][1]["gates"] = kw
    return parse_config(doc).migrations[0].stages[1].gates


def test_diff_rate_waits_for_enough_comparisons_then_fails_naming_route_and_field() -> None:
    g = gates(min_compared=100, max_diff_rate="1%", never_differ=["body.total"])
    few = evaluate(g, False, Measured(routes={"search": RouteFigures(10, 5, {"body.score": 5})}))
    assert {r.gate: r.verdict for r in few} == {
        "min_compared": "wait",
        "max_diff_rate": "wait",
        "never_differ": "pass",
    }
    many = evaluate(g, False, Measured(routes={"search": RouteFigures(200, 4, {"body.score": 4})}))
    diff = next(r for r in many if r.gate == "max_diff_rate")
    assert (diff.verdict, diff.value, diff.threshold, diff.route, diff.field) == (
        "fail",
        2.0,
        1.0,
        "search",
        "body.score",
    )
    assert "4 of 200 differ on search" in diff.detail
    low = evaluate(g, False, Measured(routes={"search": RouteFigures(200, 1, {"body.total": 1})}))
    assert {r.gate: r.verdict for r in low} == {
        "min_compared": "pass",
        "max_diff_rate": "pass",
        "never_differ": "fail",
    }
    assert next(r for r in low if r.gate == "never_differ").field == "body.total"


def test_flip_gates_judge_the_new_backend_against_the_old_one() -> None:
    g = gates(step_time="10s", max_error_rate="1%", max_p99_ratio=1.5, min_requests=20)
    old = BackendFigures(100, 0, 0.010)
    early = evaluate(g, True, Measured(in_step=3, old=old, new=BackendFigures(5, 1, 0.5)))
    assert {r.gate: r.verdict for r in early} == {
        "step_time": "wait",
        "max_error_rate": "wait",
        "max_p99_ratio": "wait",
    }
    assert rollback_worthy(early) == []
    bad = evaluate(g, True, Measured(in_step=3, old=old, new=BackendFigures(40, 2, 0.010)))
    assert [r.gate for r in rollback_worthy(bad)] == ["max_error_rate"]
    slow = evaluate(g, True, Measured(in_step=12, old=old, new=BackendFigures(40, 0, 0.025)))
    ratio = next(r for r in slow if r.gate == "max_p99_ratio")
    assert (ratio.verdict, ratio.value) == ("fail", 2.5)
    good = evaluate(g, True, Measured(in_step=12, old=old, new=BackendFigures(40, 0, 0.010)))
    assert all(r.ok for r in good)
    # everything on the new backend: no old figures to hold it against
    alone = evaluate(
        g, True, Measured(in_step=12, old=BackendFigures(), new=BackendFigures(40, 0, 1.0))
    )
    assert next(r for r in alone if r.gate == "max_p99_ratio").ok


def test_figures_windows_and_p99() -> None:
    assert p99({0.01: 98.0, 0.1: 99.0, 1.0: 100.0, float("inf"): 100.0}) == 0.1
    assert p99({0.01: 0.0, float("inf"): 0.0}) is None
    start = ({"200": 100.0, "500": 1.0}, {0.01: 90.0, 0.1: 101.0, float("inf"): 101.0})
    now = ({"200": 150.0, "500": 11.0}, {0.01: 90.0, 0.1: 161.0, float("inf"): 161.0})
    assert window(now, start) == BackendFigures(60, 10, 0.1)
    figs = route_figures({"r": [30, 6, {"a": 5, "b": 1}]}, {"r": [10, 1, {"a": 1, "b": 1}]})
    assert figs == {"r": RouteFigures(20, 5, {"a": 4})}
    # the store was cleared: counted from zero
    assert route_figures({"r": [3, 1, {}]}, {"r": [10, 1, {}]})["r"].compared == 3


# -- state machine -------------------------------------------------------------------------------

PLAN = Outline(("tpl", "reads", "flip"), (None, None, (1, 50, 100)), reverse=True)


def walk(st: MigrationState, n: int) -> list[str]:
    out = []
    for i in range(n):
        st = advance(st, PLAN, float(i), {})
        out.append(position(st, PLAN))
    return out


def test_advance_goes_through_steps_then_reverse_then_done() -> None:
    st = MigrationState()
    assert walk(st, 6) == ["reads", "flip@1%", "flip@50%", "flip@100%", "reverse", "done"]
    done = MigrationState(2, 2, Phase.DONE)
    with pytest.raises(TransitionError, match="done"):
        advance(done, PLAN, 0.0, {})


def test_rollback_one_step_to_a_stage_and_before_the_first_step() -> None:
    at50 = MigrationState(2, 1, Phase.RUNNING, 5.0, 5.0, {"x": 1})
    back = rollback(at50, PLAN, 9.0, {})
    assert (position(back, PLAN), back.phase, back.entered, back.step_entered) == (
        "flip@1%",
        Phase.HALTED,
        5.0,
        9.0,
    )
    before = rollback(back, PLAN, 10.0, {})
    assert position(before, PLAN) == "flip@0%"
    assert position(rollback(before, PLAN, 11.0, {}), PLAN) == "reads"
    assert position(rollback(at50, PLAN, 9.0, {"b": 2}, to="tpl"), PLAN) == "tpl"
    with pytest.raises(TransitionError, match="not before"):
        rollback(MigrationState(1), PLAN, 0.0, {}, to="flip")
    with pytest.raises(TransitionError, match="no stage 'x'"):
        rollback(at50, PLAN, 0.0, {}, to="x")
    with pytest.raises(TransitionError, match="first stage"):
        rollback(MigrationState(), PLAN, 0.0, {})
    rev = MigrationState(2, 2, Phase.REVERSE)
    assert position(rollback(rev, PLAN, 0.0, {}), PLAN) == "flip@100%"
    halted = rollback(at50, PLAN, 9.0, {})
    assert resume(halted, 12.0).phase is Phase.RUNNING
    with pytest.raises(TransitionError):
        resume(at50, 1.0)


def test_settings_say_what_each_position_means_for_the_routes() -> None:
    doc = base(reverse_shadow={"window": "1m"})
    cfg = parse_config(doc)
    mig = cfg.migrations[0]
    first = settings(MigrationState(0), mig, cfg)
    assert first.percent == {"search/v2": 10.0, "search/v1": 0.0} and first.weights == {}
    assert first.paused == {"search/v2": False, "search/v1": True}
    at10 = settings(MigrationState(1, 1), mig, cfg)
    assert at10.weights == {"search": {"v1": 90, "v2": 10}} and at10.paused["search/v2"] is False
    at100 = settings(MigrationState(1, 3), mig, cfg)
    assert at100.weights == {"search": {"v1": 0, "v2": 100}} and at100.paused["search/v2"] is True
    rev = settings(MigrationState(1, 3, Phase.REVERSE), mig, cfg)
    assert rev.percent["search/v1"] == 100.0 and rev.paused["search/v1"] is False
    done = settings(MigrationState(1, 3, Phase.DONE), mig, cfg)
    assert done.paused["search/v1"] is True and done.weights == at100.weights


# -- shared state in both stores -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    found: str = request.getfixturevalue("pg_url")
    return found


def test_state_documents_compare_and_set(url: str) -> None:
    with open_store(url) as store:
        assert store.write_state("a", "1", expect=0) == 1
        assert store.write_state("a", "x", expect=0) is None  # exists already
        assert store.write_state("a", "2", expect=1) == 2
        assert store.write_state("a", "stale", expect=1) is None
        assert store.write_state("a", "3") == 3
        assert [(r.name, r.version, r.data) for r in store.read_states("a")] == [("a", 3, "3")]
        assert store.state_versions() == {"a": 3}


def test_concurrent_compare_and_set_lets_exactly_one_win(url: str) -> None:
    with open_store(url) as first, open_store(url) as second:
        first.write_state("doc", "0", expect=0)
        results: list[int | None] = []
        barrier = threading.Barrier(8)

        def one(store: Any, i: int) -> None:
            barrier.wait()
            results.append(store.write_state("doc", str(i), expect=1))

        threads = [
            threading.Thread(target=one, args=(first if i % 2 else second, i)) for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results, key=lambda v: v or 0) == [None] * 7 + [2]


def test_leases_are_held_renewed_and_taken_over_after_expiry(url: str) -> None:
    with open_store(url) as store:
        assert store.acquire_lease("m", "a", 5.0, now=100.0)
        assert not store.acquire_lease("m", "b", 5.0, now=103.0)
        assert store.acquire_lease("m", "a", 5.0, now=104.0)  # renewed to 109
        assert not store.acquire_lease("m", "b", 5.0, now=108.0)
        assert store.acquire_lease("m", "b", 5.0, now=110.0)
        store.release_lease("m", "a")  # not a's any more: nothing happens
        assert not store.acquire_lease("m", "a", 5.0, now=111.0)
        store.release_lease("m", "b")
        assert store.acquire_lease("m", "a", 5.0, now=111.0)


def test_transitions_are_audited_and_keep_baselines(url: str) -> None:
    cfg = parse_config(base())
    mig = cfg.migrations[0]
    with open_store(url) as store:
        doc = ensure(store, mig, cfg, now=1.0)
        assert doc.position == "reads" and ensure(store, mig, cfg).version == doc.version
        before, after = transition(
            store, "m", advance_op, actor="cli:ann", action="advance", now=2.0
        )
        assert (before.position, after.position) == ("reads", "flip@1%")
        _, back = transition(
            store,
            "m",
            rollback_op("reads"),
            actor="auto",
            action="rollback",
            now=3.0,
            gates=[{"gate": "x"}],
        )
        assert back.state.phase is Phase.HALTED
        audit = store.audit("m")
        assert [(a.from_stage, a.to_stage, a.actor, a.action) for a in audit] == [
            ("flip@1%", "reads", "auto", "rollback"),
            ("reads", "flip@1%", "cli:ann", "advance"),
            ("", "reads", "config", "start"),
        ]
        assert audit[0].gates == ({"gate": "x"},)
        loaded = load(store, "m")
        assert loaded is not None and loaded.state.baseline == {"search": [0, 0, {}]}
        with pytest.raises(TransitionError, match="no migration"):
            transition(store, "nope", advance_op, actor="a", action="advance")
        store.append_audit(AuditRecord(9.0, "other", "a", "b", "auto", "advance"))
        assert len(store.audit()) == 4 and len(store.audit("other")) == 1


def test_a_schema_2_store_gains_the_shared_state_in_place(tmp_path: Path) -> None:
    raw = RawDb(f"sqlite:///{tmp_path}/v2.db")
    raw.run(V1_SCHEMA, version="2")
    with open_store(raw.url) as store:
        assert store.write_state("x", "{}", expect=0) == 1
        assert store.totals()[0].compared == 7  # what was there stays
    assert raw.query("SELECT value FROM shadowlane_meta WHERE key = 'schema'") == [("3",)]


def test_a_changed_plan_keeps_the_position_when_its_stage_still_exists(tmp_path: Path) -> None:
    doc = base()
    cfg = parse_config(doc)
    with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        ensure(store, cfg.migrations[0], cfg, now=1.0)
        transition(store, "m", advance_op, actor="a", action="advance", now=2.0)
        transition(store, "m", advance_op, actor="a", action="advance", now=3.0)
        assert load(store, "m").position == "flip@10%"  # type: ignore[union-attr]
        # a step added at the end: same stage, same step index
        doc["migrations"][0]["stages"][1]["weights"] = [1, 10, 50, 90, 100]
        cfg2 = parse_config(doc)
        kept = ensure(store, cfg2.migrations[0], cfg2)
        assert kept.position == "flip@10%" and kept.state.phase is Phase.RUNNING
        assert kept.outline.steps[1] == (1, 10, 50, 90, 100)
        # the stage renamed: it starts over, halted, for a person to look at
        doc["migrations"][0]["stages"][1]["name"] = "cutover"
        cfg3 = parse_config(doc)
        again = ensure(store, cfg3.migrations[0], cfg3)
        assert again.position == "reads" and again.state.phase is Phase.HALTED


def test_check_summarizes_the_migrations() -> None:
    from shadowlane.config import summarize

    text = summarize(parse_config(base(auto=True, reverse_shadow={"window": "30m"})))
    assert "migrations (1)" in text and "m: v1 -> v2 (auto, every 5s)" in text
    assert "reads: shadow search at 10%" in text and "flip: flip 1% 10% 50% 100%" in text
    assert "then reverse shadowing for 30m" in text


def _cli(*args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "shadowlane", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_moves_a_migration_on_the_store_alone(tmp_path: Path) -> None:
    cfg = parse_config(base())
    url = f"sqlite:///{tmp_path}/s.db"
    with open_store(url) as store:
        ensure(store, cfg.migrations[0], cfg)
    done = _cli("advance", "m", "--store", url, "--by", "ann")
    assert (done.returncode, done.stdout.split("(")[0].strip()) == (0, "m: reads -> flip@1%")
    done = _cli("advance", "m", "--store", url, "--format", "json")
    assert done.returncode == 0 and '"to":"flip@10%"' in done.stdout
    done = _cli("rollback", "m", "--to", "reads", "--store", url)
    assert done.returncode == 0 and "flip@10% -> reads" in done.stdout
    refused = _cli("rollback", "m", "--store", url)
    assert refused.returncode == 1 and "first stage" in refused.stderr
    assert _cli("advance", "nope", "--store", url).returncode == 1
    status = _cli("status", "m", "--store", url, "--format", "json")
    import json

    st = json.loads(status.stdout)
    assert (st["position"], st["phase"]) == ("reads", "halted")
    audit = st["audit"]
    assert [a["action"] for a in audit] == ["rollback", "advance", "advance", "start"]
    assert audit[2]["actor"] == "cli:ann" and all(a["actor"].startswith("cli:") for a in audit[:3])
    assert _cli("status", "--store", "nope://x").returncode == 2
