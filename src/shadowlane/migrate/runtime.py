"""The migration runtime of one instance: follow the shared state, drive when holding the lease.

Every instance (worker 0 of it; the other workers get the result through control's state file)
polls the store's document versions every `POLL` seconds. A changed migration document becomes
the migration layer of runtime control (`state.settings`), a changed `control` document (with a
shared store) a person's overrides, so an advance, a rollback or a percent change made anywhere
is in force everywhere within about `POLL` seconds plus a query.

Driving is separate from applying: for each migration, the instance holding its lease (a row
in the store, renewed every evaluation, taken over when it expires) evaluates the gates every
`interval`, writes the result (`gates:NAME`) for `status` anywhere, advances when `auto` and
every gate holds, and moves a flip back to the last good step when the new backend's errors or
p99 fail their gate. Evaluation reads the store off the loop (threads); the request figures are
this instance's metrics, read on the loop.

When the store cannot be reached the instance keeps the state it last applied and serves;
`store_lost` says since when and why, for /healthz and /metrics. It catches up once the store
answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

import shadowlane.migrate.figures as figures
from shadowlane.config import Config, MigrationConfig
from shadowlane.control import Control, RuntimeState
from shadowlane.metrics import Metrics
from shadowlane.migrate.gates import (
    BackendFigures,
    GateResult,
    Measured,
    blocking,
    evaluate,
    rollback_worthy,
    time_gate,
)
from shadowlane.migrate.shared import (
    CONTROL,
    DOC,
    GATES,
    Shared,
    advance_op,
    ensure,
    gates_doc,
    load,
    load_all,
    overrides_without,
    rollback_op,
    transition,
)
from shadowlane.migrate.state import Phase, TransitionError, flip_weight, settings
from shadowlane.store import Store

log = logging.getLogger("shadowlane.migrate")

#: seconds between two polls of the shared state
POLL = 0.5


@dataclass
class _Verified:
    ts: float
    key: tuple[int, int, float]
    equal: bool | None
    detail: str


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _merge(layers: list[RuntimeState]) -> RuntimeState:
    out = RuntimeState()
    for layer in layers:
        out.weights.update(layer.weights)
        out.percent.update(layer.percent)
        out.paused.update(layer.paused)
    return out


def gate_routes(mig: MigrationConfig, stage: int) -> list[str]:
    """The routes whose comparisons a stage's gates judge: its own shadow routes, else every
    route shadowed by an earlier stage."""
    own = mig.stages[stage].shadow
    if own is not None:
        return list(own.routes)
    seen: dict[str, None] = {}
    for s in mig.stages[:stage]:
        if s.shadow is not None:
            seen.update(dict.fromkeys(s.shadow.routes))
    return list(seen)


class MigrationRuntime:
    def __init__(
        self,
        store: Store,
        cfg: Callable[[], Config],
        control: Control,
        metrics: Metrics,
        *,
        share_control: bool,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self._cfg = cfg
        self.control = control
        self.metrics = metrics
        self.share_control = share_control
        self.holder = holder or instance_id()
        self.shared: dict[str, Shared] = {}
        self._versions: dict[str, int] = {}
        self._ensured: Config | None = None
        self._next_eval: dict[str, float] = {}
        self.driving: set[str] = set()
        #: per migration: the window key of the flip step and the answers at its start
        self._step_start: dict[str, tuple[tuple[int, int, float], dict[str, figures.Answers]]] = {}
        self._verified: dict[str, _Verified] = {}
        self._verifying: set[str] = set()
        #: the last evaluation of each migration this instance drove
        self.last_gates: dict[str, dict[str, Any]] = {}
        #: why and since when the store is unreachable (None while it answers)
        self.store_lost: tuple[float, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._push_lock = asyncio.Lock()
        #: set once the shared state was read (or found unreachable) at start
        self.primed = asyncio.Event()
        #: a person's overrides as last followed or pushed: what a local change is diffed with
        self._followed_manual = RuntimeState()
        control.on_reset = self._after_reset
        if share_control:
            control.on_manual_change = self._push_manual

    # ----- life cycle -----
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        metrics = self.metrics
        metrics.set_gauge_provider(
            "shadowlane_migration_stage",
            "The stage each migration is in (0-based index into its stages; the count of "
            "stages once done or reverse shadowing).",
            ("migration",),
            self._stage_samples,
        )
        metrics.set_gauge_provider(
            "shadowlane_migration_weight",
            "The new backend's share (percent) of the primary traffic of each migration's "
            "flip routes.",
            ("migration",),
            self._weight_samples,
        )
        metrics.set_gauge_provider(
            "shadowlane_store_reachable",
            "1 while the shared store answers; 0 while this instance serves on the last state "
            "it read.",
            (),
            lambda: [((), 0.0 if self.store_lost else 1.0)],
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for name in list(self.driving):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.release_lease, DOC + name, self.holder)

    def _stage_samples(self) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for name, doc in self.shared.items():
            done = doc.state.phase in (Phase.REVERSE, Phase.DONE)
            out.append(((name,), float(len(doc.outline.stages) if done else doc.state.stage)))
        return out

    def _weight_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [
            ((name,), float(flip_weight(doc.state, doc.outline)))
            for name, doc in self.shared.items()
        ]

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        await self.prime()
        self.primed.set()
        while True:
            try:
                await self._tick()
                if self.store_lost is not None:
                    log.warning("store reachable again; following the shared state")
                self.store_lost = None
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the store's driver errors are many; all mean "lost"
                if self.store_lost is None:
                    log.error("store unreachable, serving the last state read: %s", err)
                    self.store_lost = (time.time(), str(err) or type(err).__name__)
                    self._versions.clear()  # read everything again once it answers
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)

    async def prime(self) -> None:
        """Before the instance says it is ready: create the migrations' documents and apply
        the shared state, so the first request is served on the fleet's position (a restart
        mid-flip must not send everything to the old backend for a moment). A store that does
        not answer is reported and the instance starts on the file's values."""
        try:
            await self._sync(self._cfg())
        except Exception as err:
            log.error("store unreachable at start, serving the file's values: %s", err)
            self.store_lost = (time.time(), str(err) or type(err).__name__)

    async def _tick(self) -> None:
        cfg = self._cfg()
        await self._sync(cfg)
        for mig in cfg.migrations:
            if time.monotonic() >= self._next_eval.get(mig.name, 0.0):
                self._next_eval[mig.name] = time.monotonic() + mig.interval
                try:
                    await self._drive(mig, cfg)
                except Exception as err:
                    # judged again at the next interval; a lost store shows at the next poll
                    log.error("migration %s: evaluating the gates failed: %s", mig.name, err)

    async def _sync(self, cfg: Config) -> None:
        """Follow the shared state: documents created for the config, changes applied."""
        if self._ensured is not cfg:
            for mig in cfg.migrations:
                await asyncio.to_thread(ensure, self.store, mig, cfg)
            self._ensured = cfg
            self._versions.clear()
        versions = await asyncio.to_thread(self.store.state_versions)
        mig_changed = any(
            self._versions.get(n) != v for n, v in versions.items() if n.startswith(DOC)
        )
        control_changed = self.share_control and versions.get(CONTROL) != self._versions.get(
            CONTROL
        )
        if mig_changed or control_changed:
            rows = await asyncio.to_thread(self.store.read_states)
            self._follow(cfg, {r.name: r for r in rows}, mig_changed, control_changed)
            self._versions = versions

    def _follow(self, cfg: Config, rows: dict[str, Any], mig_changed: bool, ctl: bool) -> None:
        manual: RuntimeState | None = None
        if ctl:
            row = rows.get(CONTROL)
            manual = (
                RuntimeState.from_json(row.data.encode()) if row is not None else RuntimeState()
            )
        if mig_changed:
            moved: list[Shared] = []
            for name, row in rows.items():
                if not name.startswith(DOC):
                    continue
                doc = Shared.from_json(row.data, row.version)
                before = self.shared.get(doc.name)
                if before is not None and before.state != doc.state:
                    moved.append(doc)
                self.shared[doc.name] = doc
            by_name = {m.name: m for m in cfg.migrations}
            layers = [
                settings(doc.state, by_name[name], cfg)
                for name, doc in self.shared.items()
                if name in by_name
            ]
            self.control.set_plan(_merge(layers))
            if moved and manual is None:
                # a transition clears a person's overrides on its routes, here too
                kept = self.control.state
                for doc in moved:
                    kept = overrides_without(kept, doc.routes)
                manual = kept
        if manual is not None:
            self.control.set_manual(manual)
            self._followed_manual = manual.copy()

    def _after_reset(self) -> None:
        """A reload built new routes: the fleet's overrides apply to them again."""
        self._versions.pop(CONTROL, None)
        self.wake()

    def _push_manual(self, state: RuntimeState) -> None:
        """A person changed something here: merge the keys that changed into the fleet's
        document (compare-and-set, so two instances changing different keys at once both
        land; the same key: the later write wins)."""
        changed = _diff(self._followed_manual, state)
        self._followed_manual = state.copy()

        async def push() -> None:
            async with self._push_lock:
                try:
                    await asyncio.to_thread(_merge_into_store, self.store, changed)
                except Exception as err:
                    log.error("store unreachable: a runtime change stays on this instance: %s", err)
                    return
                # the next poll reads the merged document back: others' keys included
                self.wake()

        asyncio.get_running_loop().create_task(push())

    # ----- driving -----
    async def _drive(self, mig: MigrationConfig, cfg: Config) -> None:
        ttl = max(3 * mig.interval, 3.0)
        held = await asyncio.to_thread(self.store.acquire_lease, DOC + mig.name, self.holder, ttl)
        if not held:
            self.driving.discard(mig.name)
            return
        if mig.name not in self.driving:
            log.warning("migration %s: this instance drives it now", mig.name)
            self.driving.add(mig.name)
        doc = await asyncio.to_thread(load, self.store, mig.name)
        if doc is None:
            return
        self.shared[mig.name] = doc
        last = self.last_gates.get(mig.name)
        if doc.state.phase is Phase.DONE and last is not None and last["version"] == doc.version:
            return  # nothing left to judge, and its report is written already
        results = await self._measure(mig, cfg, doc)
        st = doc.state
        now = time.time()
        blocked = blocking(results)
        report = {
            "ts": now,
            "by": self.holder,
            "position": doc.position,
            "version": doc.version,
            "gates": [r.as_json() for r in results],
            "blocking": [r.as_json() for r in blocked],
        }
        self.last_gates[mig.name] = report
        await asyncio.to_thread(
            self.store.write_state, GATES + mig.name, orjson.dumps(report).decode()
        )
        gates_json = [r.as_json() for r in results]
        try:
            if st.phase is Phase.RUNNING:
                worth = rollback_worthy(results) if mig.stages[st.stage].is_flip else []
                if worth:
                    reason = "; ".join(f"{r.gate}: {r.detail}" for r in worth)
                    log.error(
                        "migration %s: %s failed, rolling back: %s", mig.name, doc.position, reason
                    )
                    await asyncio.to_thread(
                        transition,
                        self.store,
                        mig.name,
                        rollback_op(None),
                        actor="auto",
                        action="auto-rollback",
                        reason=reason,
                        gates=gates_json,
                    )
                    self.wake()
                elif mig.auto and not blocked:
                    await asyncio.to_thread(
                        transition,
                        self.store,
                        mig.name,
                        advance_op,
                        actor="auto",
                        action="advance",
                        reason="every gate holds",
                        gates=gates_json,
                    )
                    self._next_eval[mig.name] = 0.0  # judge the new position at once
                    self.wake()
            elif st.phase is Phase.REVERSE and mig.auto and not blocked:
                await asyncio.to_thread(
                    transition,
                    self.store,
                    mig.name,
                    advance_op,
                    actor="auto",
                    action="advance",
                    reason="rollback window over",
                    gates=gates_json,
                )
                self.wake()
        except TransitionError as err:
            log.warning("migration %s: %s", mig.name, err)

    async def _measure(self, mig: MigrationConfig, cfg: Config, doc: Shared) -> list[GateResult]:
        st = doc.state
        now = time.time()
        if st.phase is Phase.DONE:
            return []
        if st.phase is Phase.REVERSE:
            assert mig.reverse_shadow is not None
            return [time_gate("rollback_window", now - st.entered, mig.reverse_shadow.window)]
        stage = mig.stages[st.stage]
        gates = stage.gates
        routes = gate_routes(mig, st.stage)
        counts = await asyncio.to_thread(figures.comparison_counts, self.store, routes, mig.new)
        route_figs = figures.route_figures(counts, st.baseline)
        ledger_open = 0
        if gates.ledger_empty:
            rows = await asyncio.to_thread(self.store.ledger_counts, None, mig.new)
            covered = set(doc.routes)
            ledger_open = sum(r.n for r in rows if r.route in covered)
        old_figs = new_figs = BackendFigures()
        if stage.is_flip:
            flips = mig.flip_routes(cfg)
            answers = self.metrics.primary_figures([mig.old, mig.new], flips)
            key = (st.stage, st.step, st.step_entered)
            started = self._step_start.get(mig.name)
            if started is None or started[0] != key:
                self._step_start[mig.name] = (key, answers)
                started = self._step_start[mig.name]
            old_figs = figures.window(answers[mig.old], started[1].get(mig.old))
            new_figs = figures.window(answers[mig.new], started[1].get(mig.new))
        measured = Measured(
            in_stage=now - st.entered,
            in_step=now - st.step_entered,
            routes=route_figs,
            ledger_open=ledger_open,
            old=old_figs,
            new=new_figs,
        )
        results = evaluate(gates, stage.is_flip, measured)
        if gates.verify_equal:
            results = await self._with_verify(
                mig, cfg, doc, gates, stage.is_flip, measured, results
            )
        return results

    async def _with_verify(
        self,
        mig: MigrationConfig,
        cfg: Config,
        doc: Shared,
        gates: Any,
        is_flip: bool,
        measured: Measured,
        results: list[GateResult],
    ) -> list[GateResult]:
        """verify_equal runs `verify` only when the other gates hold (it reads every document),
        at most once per `verify.interval`, and counts only when run in this stage."""
        st = doc.state
        key = (st.stage, st.step, st.entered)
        cached = self._verified.get(mig.name)
        others_ok = all(r.ok for r in results if r.gate != "verify_equal")
        assert mig.verify is not None
        due = cached is None or cached.key != key or time.time() - cached.ts >= mig.verify.interval
        if others_ok and due and mig.name not in self._verifying:
            self._verifying.add(mig.name)
            try:
                equal, detail = await asyncio.to_thread(_run_verify, mig, cfg)
            finally:
                self._verifying.discard(mig.name)
            cached = _Verified(time.time(), key, equal, detail)
            self._verified[mig.name] = cached
        if cached is None or cached.key != key:
            equal, detail = None, "not run yet (runs once the other gates hold)"
        else:
            equal, detail = cached.equal, cached.detail
        return evaluate(gates, is_flip, replace(measured, verify_equal=equal, verify_detail=detail))

    # ----- for the admin API -----
    async def status(self, name: str | None = None) -> list[dict[str, Any]]:
        try:
            docs = await asyncio.to_thread(load_all, self.store)
            gates = {n: await asyncio.to_thread(gates_doc, self.store, n) for n in docs}
            audit = {
                n: [a.as_json() for a in await asyncio.to_thread(self.store.audit, n, 20)]
                for n in docs
            }
            stale = False
        except Exception:
            docs, gates, audit, stale = dict(self.shared), dict(self.last_gates), {}, True
        cfg = self._cfg()
        out = [
            describe(doc, gates.get(n), audit.get(n, []), _config_of(cfg, n), stale=stale)
            for n, doc in sorted(docs.items())
            if name is None or n == name
        ]
        return out

    async def _gates_now(self, name: str) -> list[dict[str, Any]]:
        """The last evaluation, whoever drives, for the audit record of a person's call."""
        report = await asyncio.to_thread(gates_doc, self.store, name)
        return _gate_list(report or self.last_gates.get(name))

    async def advance(self, name: str, actor: str) -> dict[str, Any]:
        gates = await self._gates_now(name)
        before, after = await asyncio.to_thread(
            transition,
            self.store,
            name,
            advance_op,
            actor=actor,
            action="advance",
            reason="asked by " + actor,
            gates=gates,
        )
        self.wake()
        return {"migration": name, "from": before.position, "to": after.position}

    async def rollback(self, name: str, actor: str, to: str | None) -> dict[str, Any]:
        gates = await self._gates_now(name)
        before, after = await asyncio.to_thread(
            transition,
            self.store,
            name,
            rollback_op(to),
            actor=actor,
            action="rollback",
            reason="asked by " + actor,
            gates=gates,
        )
        self.wake()
        return {"migration": name, "from": before.position, "to": after.position}

    def health(self) -> dict[str, Any] | None:
        if self.store_lost is None:
            return None
        since, why = self.store_lost
        return {
            "store": "unreachable",
            "since": since,
            "error": why,
            "serving": "the last shared state read",
        }


def _diff(before: RuntimeState, after: RuntimeState) -> RuntimeState:
    """The overrides `after` sets differently from `before` (a removed key cannot happen: a
    person's call sets a value, only a transition clears)."""
    return RuntimeState(
        0,
        {r: w for r, w in after.weights.items() if before.weights.get(r) != w},
        {k: v for k, v in after.percent.items() if before.percent.get(k) != v},
        {k: v for k, v in after.paused.items() if before.paused.get(k) != v},
    )


def _merge_into_store(store: Store, changed: RuntimeState, attempts: int = 5) -> int | None:
    for _ in range(attempts):
        rows = [r for r in store.read_states(CONTROL) if r.name == CONTROL]
        current = RuntimeState.from_json(rows[0].data.encode()) if rows else RuntimeState()
        current.weights.update(changed.weights)
        current.percent.update(changed.percent)
        current.paused.update(changed.paused)
        version = store.write_state(
            CONTROL, current.to_json().decode(), expect=rows[0].version if rows else 0
        )
        if version is not None:
            return version
    return None


def _gate_list(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list(report.get("gates", [])) if report else []


def _config_of(cfg: Config, name: str) -> MigrationConfig | None:
    return next((m for m in cfg.migrations if m.name == name), None)


def _run_verify(mig: MigrationConfig, cfg: Config) -> tuple[bool | None, str]:
    from shadowlane.verify import VerifyError, VerifyOptions, verify

    assert mig.verify is not None
    old, new = cfg.backends[mig.old], cfg.backends[mig.new]
    options = VerifyOptions(
        primary=old.endpoints[0].url,
        shadow=new.endpoints[0].url,
        kind=mig.verify.kind,
        indices=tuple(mig.verify.indices),
        timeout=mig.verify.timeout,
        examples=3,
    )
    try:
        result = verify(options)
    except (VerifyError, OSError, ValueError) as err:
        return None, f"verify could not run: {err}"
    j = result.as_json()
    detail = (
        f"{j['compared']} compared: {j['differing']} differing, {j['only_in_primary']} only "
        f"in {mig.old}, {j['only_in_shadow']} only in {mig.new}"
    )
    return result.equal, detail


def describe(
    doc: Shared,
    gates: dict[str, Any] | None,
    audit: list[dict[str, Any]],
    mig: MigrationConfig | None,
    *,
    stale: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """A migration's status as the API, the CLI and the dashboard show it."""
    when = time.time() if now is None else now
    st = doc.state
    entered_at: dict[str, float] = {}
    for a in reversed(audit):  # oldest first: the latest entry into each stage wins
        entered_at[str(a["to"]).split("@")[0]] = float(a["ts"])
    stages = []
    done = st.phase in (Phase.REVERSE, Phase.DONE)
    for i, name in enumerate(doc.outline.stages):
        state = "done" if done or i < st.stage else "current" if i == st.stage else "pending"
        entry: dict[str, Any] = {"name": name, "state": state}
        steps = doc.outline.steps[i]
        if steps is not None:
            entry["weights"] = list(steps)
            if i == st.stage and not done:
                entry["step"] = st.step
        if name in entered_at:
            entry["entered"] = entered_at[name]
        stages.append(entry)
    report = gates if gates is not None and gates.get("position") == doc.position else None
    return {
        "name": doc.name,
        "old": doc.old,
        "new": doc.new,
        "routes": list(doc.routes),
        "auto": mig.auto if mig is not None else None,
        "phase": st.phase.value,
        "stage": doc.stage_name if not done else st.phase.value,
        "stage_index": st.stage,
        "position": doc.position,
        "weight": flip_weight(st, doc.outline),
        "version": doc.version,
        "in_stage_seconds": round(when - st.entered, 3),
        "in_step_seconds": round(when - st.step_entered, 3),
        "stages": stages,
        "gates": report["gates"] if report else [],
        "blocking": report["blocking"] if report else [],
        "gates_at": report["ts"] if report else None,
        "last": doc.last,
        "audit": audit,
        "stale": stale,
    }
