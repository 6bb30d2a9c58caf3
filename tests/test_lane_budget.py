"""Body bytes pinned by shadow copies are bounded per lane and per process: past the process's
budget a copy is dropped (counted) even when its own lane has room, and the bytes come back
when the copies end. Real lanes and pools on a loop, against a real server that never answers."""

from __future__ import annotations

from inproc import endpoint, head, lane_to, run, until
from shadowlane.metrics import Metrics
from shadowlane.shadow.lane import MAX_LANE_BYTES, PROCESS_PINNED, ShadowCopy
from shadowlane.wire.messages import body_of
from support.backend import HungServer
from support.metrics import Scrape

MiB = 1 << 20


def test_copies_past_the_process_budget_are_dropped_and_the_bytes_come_back() -> None:
    body = b"x" * (8 * MiB)
    ended: list[object] = []
    saved = PROCESS_PINNED.limit
    start = PROCESS_PINNED.bytes
    metrics = Metrics()

    async def main() -> list[bool]:
        with HungServer() as hung:
            a = lane_to(endpoint(hung.port), metrics=metrics, target="a", timeout=1.0)
            b = lane_to(endpoint(hung.port), metrics=metrics, target="b", timeout=1.0)

            def copy(lane: object) -> ShadowCopy:
                return ShadowCopy(
                    lane,  # type: ignore[arg-type]
                    "POST",
                    head("POST", "/up", len(body)),
                    body_of(body),
                    lambda _c, r: ended.append(r),
                )

            PROCESS_PINNED.limit = start + 24 * MiB  # three bodies, over both lanes
            taken = [a.submit(copy(a)), a.submit(copy(a)), b.submit(copy(b)), b.submit(copy(b))]
            assert b.bytes == 8 * MiB < MAX_LANE_BYTES  # lane b had room: the process had not
            assert PROCESS_PINNED.bytes == start + 24 * MiB
            await until(lambda: len(ended) == 3, 10, "the three copies to time out")
            await until(lambda: PROCESS_PINNED.bytes == start, 5, "their bytes to come back")
            return taken

    try:
        taken = run(main)
    finally:
        PROCESS_PINNED.limit = saved
    assert taken == [True, True, True, False]
    text = Scrape(metrics.render()[0].decode())
    assert text.sum("shadowlane_shadow_requests_total", target="b", outcome="dropped") == 1
    assert text.sum("shadowlane_shadow_requests_total", target="a", outcome="dropped") == 0
