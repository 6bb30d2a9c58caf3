"""The per-request ticket's outcome accounting, in process, with real lanes and sockets.

What is promised (docs/shadowing.md, docs/metrics.md): a lane a request was not sampled into
counts `sampled_out`; every lane it was sampled into ends with exactly one outcome on the
ticket (`sent`, `dropped`, `skipped_body` or `skipped_status`), whatever order the proxy's
moments come in; a request that is itself a copy counts `skipped_loop` on every lane. The
dispatcher, lanes and pools are the real ones; the shadow target is a support.backend server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, get_args

import pytest

import shadowlane.metrics
from inproc import run, until
from shadowlane.app import build_backend
from shadowlane.compare.model import CompareJob
from shadowlane.config import parse_config
from shadowlane.metrics import Metrics
from shadowlane.routing import RouteTable
from shadowlane.shadow.breaker import FAILURES
from shadowlane.shadow.dispatcher import RouteShadows, ShadowDispatcher
from shadowlane.shadow.join import Room, Submit
from shadowlane.shadow.outcomes import SHADOW_OUTCOMES, Outcome
from shadowlane.shadow.ticket import ShadowTicket
from shadowlane.wire.headers import upstream_request_headers
from shadowlane.wire.messages import Headers, Request, body_of
from support.backend import RecordingBackend

ROUTE = "orders"
COMPARED = r'shadowlane_comparisons_total\{result="(.*?)",route="(.*?)",target="(.*?)"\} (\S+)'
SAMPLE = r'shadowlane_shadow_requests_total\{outcome="(.*?)",route="(.*?)",target="(.*?)"\} (\S+)'


@pytest.fixture(scope="module")
def target() -> Iterator[RecordingBackend]:
    with RecordingBackend() as b:
        yield b
    assert b.errors == []


class Setup:
    """A dispatcher with one route whose shadows are `shadows` (targets a, b, c... all on the
    `target` server); call inside the loop."""

    def __init__(
        self,
        target: RecordingBackend,
        shadows: list[dict[str, Any]],
        compare_submit: Submit | None = None,
        compare_room: Room | None = None,
    ) -> None:
        names = [s["backend"] for s in shadows]
        doc = {
            "listen": "127.0.0.1:0",
            "backends": {n: {"endpoints": [target.url]} for n in ["primary", *names]},
            "routes": [{"name": ROUTE, "backend": "primary", "shadows": shadows}],
        }
        cfg = parse_config(json.dumps(doc))
        self.metrics = Metrics()
        self.dispatcher = ShadowDispatcher(
            self.metrics, cfg, build_backend, compare_submit, compare_room=compare_room
        )
        plan = self.dispatcher.plan(RouteTable(cfg.routes).routes[0])
        assert plan is not None
        self.shadows: RouteShadows = plan

    def begin(
        self, method: str = "GET", path: str = "/o/1", extra: Headers | None = None
    ) -> ShadowTicket | None:
        req = Request(
            method, path.encode(), "1.1", [(b"host", b"a.test"), *(extra or [])],
            "a.test", "10.0.0.1", True,
        )  # fmt: skip
        headers, rid = upstream_request_headers(req.headers, b"10.0.0.1", b"http", b"a.test")
        req.request_id = rid.decode()
        return self.dispatcher.begin(self.shadows, req, headers, req)

    def counts(self) -> dict[str, dict[str, float]]:
        """target -> outcome -> count, from the metrics as scraped."""
        text, _ = self.metrics.render()
        out: dict[str, dict[str, float]] = {}
        for outcome, route, tgt, value in re.findall(SAMPLE, text.decode()):
            if route == ROUTE and float(value):
                out.setdefault(tgt, {})[outcome] = float(value)
        return out

    def comparisons(self, tgt: str) -> dict[str, float]:
        """result -> count of `tgt`'s comparisons, from the metrics as scraped."""
        text, _ = self.metrics.render()
        return {
            result: float(value)
            for result, route, t, value in re.findall(COMPARED, text.decode())
            if route == ROUTE and t == tgt and float(value)
        }

    def sampled(self, ticket: ShadowTicket) -> set[str]:
        return {p.lane.target for p in ticket._sampled}


def shadow(name: str, **kw: Any) -> dict[str, Any]:
    return {"backend": name, **kw}


def test_the_vocabulary_is_one_list() -> None:
    assert get_args(Outcome) == SHADOW_OUTCOMES
    assert shadowlane.metrics.SHADOW_OUTCOMES is SHADOW_OUTCOMES
    assert SHADOW_OUTCOMES[:7] == (  # the DESIGN.md contract
        "sampled_out", "sent", "ok", "error", "timeout", "dropped", "skipped_body",
    )  # fmt: skip


def test_sampling_decides_once_and_unsampled_lanes_count_sampled_out(
    target: RecordingBackend,
) -> None:
    async def main() -> None:
        s = Setup(
            target,
            [shadow("a"), shadow("b", percent=0), shadow("c", match={"methods": ["POST"]})],
        )
        ticket = s.begin()
        assert ticket is not None and s.sampled(ticket) == {"a"}
        # c's match did not hold: not counted for c at all
        assert s.counts() == {"b": {"sampled_out": 1}}
        assert ticket.capture is None  # nothing compares
        nobody = Setup(target, [shadow("b", percent=0)])
        assert nobody.begin() is None
        assert nobody.counts() == {"b": {"sampled_out": 1}}

    run(main)


def test_a_copy_is_never_copied_again(target: RecordingBackend) -> None:
    async def main() -> None:
        s = Setup(target, [shadow("a"), shadow("b")])
        assert s.begin(extra=[(b"x-shadowlane-shadow", b"other")]) is None
        assert s.counts() == {"a": {"skipped_loop": 1}, "b": {"skipped_loop": 1}}

    run(main)


def test_with_request_copy_goes_when_the_body_is_complete(target: RecordingBackend) -> None:
    async def main() -> None:
        s = Setup(target, [shadow("a")])
        ticket = s.begin(path="/with-request")
        assert ticket is not None
        ticket.request_done(body_of(b""))
        assert ticket.outcomes == {"a": "sent"}
        ticket.request_done(body_of(b""))  # once per request
        ticket.response_done(502, body_of(b""), False)  # the primary's fate changes nothing
        assert ticket.outcomes == {"a": "sent"}
        await until(lambda: s.counts().get("a") == {"sent": 1, "ok": 1}, what="copy answered")
        assert [r.path for r in target.requests].count("/with-request") == 1

    run(main)


def test_a_comparison_is_admitted_before_anything_is_captured(target: RecordingBackend) -> None:
    """While the comparator is full, a compared request is still copied, but nothing of
    either answer is captured and its comparison is counted `dropped` at once; with room
    again, the next one is captured and handed over. The comparator here is its queue: a
    list the ticket hands jobs to, and a flag for whether it has room."""

    async def main() -> None:
        jobs: list[CompareJob] = []
        room = [False]

        def submit(job: CompareJob) -> bool:
            jobs.append(job)
            return True

        s = Setup(target, [shadow("a", compare=True), shadow("b")], submit, lambda: room[0])
        full = s.begin(path="/full")
        assert full is not None and full.capture is None
        full.request_done(body_of(b""))
        full.response_done(200, body_of(b""), False)
        assert full.outcomes == {"a": "sent", "b": "sent"}
        both = {"a": {"sent": 1, "ok": 1}, "b": {"sent": 1, "ok": 1}}
        await until(lambda: s.counts() == both, what="both copies answered")
        comparisons = s.comparisons("a")
        assert comparisons.get("dropped") == 1, comparisons
        assert jobs == []

        room[0] = True
        ticket = s.begin(path="/room")
        assert ticket is not None and ticket.capture is not None
        ticket.request_done(body_of(b""))
        ticket.capture.head(200, [(b"content-type", b"text/plain")])
        ticket.capture.body(b"primary")
        ticket.capture.finish(0.001)
        ticket.response_done(200, body_of(b""), False)
        await until(lambda: len(jobs) == 1, what="the admitted comparison handed over")
        assert jobs[0].primary.body == b"primary"
        assert jobs[0].candidate.status == 200 and jobs[0].candidate.body != b""
        assert s.comparisons("a").get("dropped") == 1

    run(main)


def test_with_request_copy_without_a_complete_body_is_skipped(target: RecordingBackend) -> None:
    async def main() -> None:
        s = Setup(target, [shadow("a"), shadow("b", max_body=4)])
        # the body outgrew what is kept: complete, but not at hand
        t1 = s.begin()
        assert t1 is not None
        t1.request_done(None)
        assert t1.outcomes == {"a": "skipped_body", "b": "skipped_body"}
        # the primary failed (or the client left) before the body was complete
        t2 = s.begin()
        assert t2 is not None
        t2.response_done(499, None, False)
        assert t2.outcomes == {"a": "skipped_body", "b": "skipped_body"}
        # bigger than one shadow's max_body
        t3 = s.begin(method="POST")
        assert t3 is not None
        t3.request_done(body_of(b"12345"))
        assert t3.outcomes == {"a": "sent", "b": "skipped_body"}
        assert s.counts()["b"] == {"skipped_body": 3}

    run(main)


def test_copies_of_an_upload_answered_early_wait_for_the_rest(target: RecordingBackend) -> None:
    async def main() -> None:
        s = Setup(target, [shadow("a"), shadow("b", send="after_response")])
        ticket = s.begin(method="POST", path="/late")
        assert ticket is not None
        ticket.response_done(401, None, True)
        # b waits for nothing: after_response copies never wait for a late body
        assert ticket.outcomes == {"b": "skipped_body"}
        ticket.late_body(body_of(b"the whole body"))
        assert ticket.outcomes == {"a": "sent", "b": "skipped_body"}
        ticket.late_body(None)  # decided already: nothing changes
        assert ticket.outcomes == {"a": "sent", "b": "skipped_body"}
        await until(lambda: any(r.path == "/late" for r in target.requests), what="the copy")
        assert next(r for r in target.requests if r.path == "/late").body == b"the whole body"

        lost = s.begin(method="POST")
        assert lost is not None
        lost.response_done(200, None, True)
        lost.late_body(None)  # the client left before the rest came
        assert lost.outcomes == {"a": "skipped_body", "b": "skipped_body"}

    run(main)


def test_after_response_copies_go_only_after_the_answer(target: RecordingBackend) -> None:
    async def main() -> None:
        s = Setup(
            target,
            [shadow("a", send="after_response"), shadow("b", only_if_primary="2xx")],
        )
        ok = s.begin()
        assert ok is not None
        ok.request_done(body_of(b""))
        assert ok.outcomes == {}  # nothing goes before the primary answered
        ok.response_done(201, body_of(b""), False)
        assert ok.outcomes == {"a": "sent", "b": "sent"}

        refused = s.begin()
        assert refused is not None
        refused.request_done(body_of(b""))
        refused.response_done(500, body_of(b""), False)
        assert refused.outcomes == {"a": "sent", "b": "skipped_status"}

        gone = s.begin()
        assert gone is not None
        gone.response_done(499, body_of(b""), False)
        assert gone.outcomes == {"a": "skipped_status", "b": "skipped_status"}
        assert s.counts()["b"]["skipped_status"] == 2

    run(main)


def test_a_full_lane_or_an_open_circuit_drops_without_connecting(
    target: RecordingBackend,
) -> None:
    async def main() -> None:
        s = Setup(target, [shadow("a", max_in_flight=1, queue=0)])
        lane = s.shadows.lanes[0].lane
        first = s.begin(path="/delay/0.5")
        second = s.begin(path="/full")
        assert first is not None and second is not None
        first.request_done(body_of(b""))
        second.request_done(body_of(b""))
        assert (first.outcomes, second.outcomes) == ({"a": "sent"}, {"a": "dropped"})
        await until(lambda: not lane.in_flight, what="the first copy answered")
        for _ in range(FAILURES):
            lane.breaker.failed()
        connections = target.connections_accepted
        shed = s.begin(path="/shed")
        assert shed is not None
        shed.request_done(body_of(b""))
        assert shed.outcomes == {"a": "dropped"}
        assert target.connections_accepted == connections
        assert s.counts()["a"]["dropped"] == 2

    run(main)


@pytest.mark.parametrize(
    "moments",
    [
        ["request", "response"],
        ["response", "request"],
        ["response_late", "late"],
        ["response_late", "late_lost"],
        ["response_no_body"],
        ["request_unkept", "response"],
    ],
)
def test_every_sampled_lane_ends_with_exactly_one_outcome(
    target: RecordingBackend, moments: list[str]
) -> None:
    async def main() -> None:
        s = Setup(
            target,
            [
                shadow("a"),
                shadow("b", send="after_response"),
                shadow("c", only_if_primary="2xx"),
                shadow("d", ordered_by="path"),
                shadow("e", max_body=1),
            ],
        )
        ticket = s.begin(method="PUT", path="/moments")
        assert ticket is not None
        for moment in moments:
            if moment == "request":
                ticket.request_done(body_of(b"body"))
            elif moment == "request_unkept":
                ticket.request_done(None)
            elif moment == "response":
                ticket.response_done(200, body_of(b"body"), False)
            elif moment == "response_late":
                ticket.response_done(200, None, True)
            elif moment == "response_no_body":
                ticket.response_done(200, None, False)
            elif moment == "late":
                ticket.late_body(body_of(b"body"))
            elif moment == "late_lost":
                ticket.late_body(None)
        assert set(ticket.outcomes) == {"a", "b", "c", "d", "e"}
        ticket_level: set[Outcome] = {"sent", "dropped", "skipped_body", "skipped_status"}
        assert set(ticket.outcomes.values()) <= ticket_level
        # skipped outcomes are counted once each, by the ticket
        counts = s.counts()
        for tgt, outcome in ticket.outcomes.items():
            if outcome.startswith("skipped"):
                assert counts[tgt][outcome] == 1

    run(main)
