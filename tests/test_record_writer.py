"""The record writer in process: rotation, gzip, the index, seeking by time, redaction rules.

The writer is a thread with a deque in front; these tests drive it with real `Recorder`s (the
loop's half) and real files in a temp dir, and read what it wrote with the replay side's
readers. Nothing of the writer is replaced; timing knobs (block interval, file age) are set
small so that a test takes well under a second.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from shadowlane.compare.model import Captured
from shadowlane.compare.redact import Redaction, Unredactable
from shadowlane.config import RecordConfig
from shadowlane.metrics import Metrics
from shadowlane.record import (
    REQUEST,
    RESPONSE,
    Recorder,
    RecordWriter,
    iter_file,
    iter_file_from,
    iter_since,
    read_index,
    recording_files,
)
from shadowlane.record.redact import redact_body, redact_head
from support.wait import wait_until


def head(i: int, body: bytes = b"") -> bytes:
    """A request head as the proxy sends it upstream (what a route's recording takes)."""
    method = b"POST" if body else b"GET"
    framing = b"content-length: %d\r\n" % len(body) if body else b""
    return b"%s /r/%d HTTP/1.1\r\nhost: h\r\nx-n: %d\r\n%s\r\n" % (method, i, i, framing)


def record(
    rec: Recorder,
    i: int,
    ts: int,
    body: bytes = b"",
    answer: Captured | None = None,
    latency: int = 0,
) -> None:
    rec.request(head(i, body), f"rid-{i}", ts, body, answer, latency)


def make(tmp_path: Path, writer: RecordWriter, metrics: Metrics, **cfg: object) -> Recorder:
    rcfg = RecordConfig.model_validate({"dir": str(tmp_path / "rec"), **cfg})
    rec = Recorder("r1", "", max_body=rcfg.max_body, queue_limit=rcfg.queue,
                   answers=rcfg.answers, metrics=metrics)  # fmt: skip
    writer.add(rec, rcfg, None)
    return rec


def files(tmp_path: Path) -> list[str]:
    return recording_files([str(tmp_path / "rec")])


def test_rotation_by_size_keeps_every_record_in_order(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = RecordWriter(metrics, index_records=5).start()
    rec = make(tmp_path, writer, metrics, max_file_size="2KiB", gzip=False)
    ts0 = time.time_ns()
    for i in range(60):
        record(rec, i, ts0 + i, b"b" * 100)
    assert writer.wait_idle(10)
    assert writer.stop(10)
    names = files(tmp_path)
    assert len(names) >= 3, names
    for name in names:
        assert os.path.getsize(name) <= 2048 + 400  # rotated right after passing the size
    got = [p for n in names for p in iter_file(n)]
    assert [p.ts_ns - ts0 for p in got] == list(range(60))
    assert writer.stats()[("r1", "")]["written"] == 60


def test_rotation_by_age(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = RecordWriter(metrics, index_interval=0.05).start()
    rec = make(tmp_path, writer, metrics, max_file_age="200ms")
    sent = 0

    def more_files() -> bool:
        nonlocal sent
        record(rec, sent, time.time_ns())
        sent += 1
        return len(files(tmp_path)) >= 3

    wait_until(more_files, 5, "a third file after two 200 ms ages", interval=0.05)
    writer.stop(10)
    got = [p for n in files(tmp_path) for p in iter_file(n)]
    assert len(got) == sent
    stamps = [os.path.basename(n).rsplit("-", 1)[1] for n in files(tmp_path)]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_index_seeks_to_a_time(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = RecordWriter(metrics, index_records=10).start()
    rec = make(tmp_path, writer, metrics)
    base = 1_700_000_000_000_000_000
    # stamps out of order within a few records, as requests that end in another order
    stamps = [base + i * 1000 + (300 if i % 3 == 0 else 0) for i in range(95)]
    for i, ts in enumerate(stamps):
        record(rec, i, ts)
    writer.stop(10)
    [name] = files(tmp_path)
    blocks = read_index(name)
    assert [b.records for b in blocks] == [10] * 9 + [5]
    assert all(b.min_ts <= b.ts <= b.max_ts for b in blocks)
    # every block offset is a gzip member start: reading from it gives that block's records
    for b in blocks:
        first = next(iter_file_from(name, b.offset))
        assert first.ts_ns == b.ts
    for t in (base, base + 37_000, base + 37_300, base + 60_500, base + 94_000, base + 10**9):
        want = sorted(s for s in stamps if s >= t)
        got = sorted(p.ts_ns for p in iter_since(name, t))
        assert got == want, t
    # the seek skipped blocks: reading from late on did not start at offset 0
    assert blocks[5].offset > 0


def test_answers_are_type_2_with_latency(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = RecordWriter(metrics).start()
    rec = make(tmp_path, writer, metrics, answers=True, max_body=8)
    answer = Captured(200, [(b"content-type", b"text/plain"), (b"content-length", b"20")],
                      b"12345678", True, 0.5)  # fmt: skip
    record(rec, 1, 10, b"", answer, 123_456)
    record(rec, 2, 11, b"", Captured(0, [], b"", False, 1.0, "timeout"), 1)
    writer.stop(10)
    got = [p for n in files(tmp_path) for p in iter_file(n)]
    assert [(p.kind, p.ts_ns) for p in got] == [(REQUEST, 10), (RESPONSE, 10), (REQUEST, 11)]
    ans = got[1]
    assert ans.latency_ns == 123_456
    head, _, body = ans.data.partition(b"\r\n\r\n")
    assert body == b"12345678"
    assert b"content-length: 8" in head and b"x-shadowlane-truncated: 1" in head


def test_queue_bound_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = RecordWriter(metrics)  # not started: nothing is taken from the queue
    rec = make(tmp_path, writer, metrics, queue="8KiB")
    for i in range(20):
        record(rec, i, i, b"x" * 1000)
    assert rec.pending <= 8 * 1024
    kept = len(rec.items)
    assert 0 < kept < 20
    text = metrics.render()[0].decode()
    dropped = 'shadowlane_record_total{outcome="dropped",route="r1",target=""}'
    assert f"{dropped} {20 - kept}.0" in text
    writer.stop(10)  # never started: writes what is queued in the caller's thread
    assert len([p for n in files(tmp_path) for p in iter_file(n)]) == kept
    assert rec.pending == 0


def test_write_errors_are_counted_never_raised(tmp_path: Path) -> None:
    """The directory is gone when the first file is opened: every record counts `error`, the
    writer keeps running, and the caller never sees an exception."""
    metrics = Metrics()
    writer2 = RecordWriter(metrics).start()
    rcfg = RecordConfig.model_validate({"dir": str(tmp_path / "gone" / "x")})
    rec2 = Recorder("r2", "", max_body=rcfg.max_body, queue_limit=rcfg.queue, answers=False,
                    metrics=metrics)  # fmt: skip
    writer2.add(rec2, rcfg, None)
    os.rmdir(tmp_path / "gone" / "x")
    for i in range(5):
        record(rec2, i, i)
    assert writer2.wait_idle(10)
    assert writer2.stats()[("r2", "")]["error"] == 5
    assert writer2.stop(10)
    text = metrics.render()[0].decode()
    assert 'shadowlane_record_total{outcome="error",route="r2",target=""} 5.0' in text


def test_redaction_of_messages_and_bodies() -> None:
    red = Redaction(["authorization"], ["body.password", "body.items[*].card"], ["token"], b"k")
    body = b'{"password": "pw", "items": [{"card": 4111, "n": 1}], "user": "bob"}'
    sent = b"POST /x?token=abc&t=abc HTTP/1.1\r\nhost: h\r\ncontent-length: %d\r\n" % len(body)
    msg = redact_head(sent + b"authorization: Bearer zzz\r\n\r\n", body, red)
    assert b"zzz" not in msg and b"authorization" not in msg
    assert b"token=" + red.mask(b"abc").encode() + b"&t=abc" in msg
    head, _, out = msg.partition(b"\r\n\r\n")
    assert b'"pw"' not in out and b"4111" not in out and b'"bob"' in out
    assert b"content-length: %d" % len(out) in head
    # equal values mask equal; the mask depends on the secret
    assert red.mask(b"pw") == red.mask(b"pw") != Redaction(secret=b"other").mask(b"pw")
    # NDJSON line by line, gzip bodies decoded and encoded again
    nd = b'{"index": {}}\n{"password": "pw"}\n'
    assert b"pw" not in red.json_body(nd).replace(red.mask(b"pw").encode(), b"")
    gz = gzip.compress(body)
    out = gzip.decompress(redact_body(red, gz, [(b"content-encoding", b"gzip")]))
    assert b'"pw"' not in out and red.mask(b"pw").encode() in out
    # fails closed: JSON that does not parse, an encoding it cannot undo
    with pytest.raises(Unredactable):
        red.json_body(b'{"password": "pw", ')
    with pytest.raises(Unredactable):
        redact_body(red, b"\x00\x01", [(b"content-encoding", b"br")])
    # not JSON at all: left as it is
    assert red.json_body(b"password=pw") == b"password=pw"


def test_compiled_fast_path_encodes_as_the_general_one() -> None:
    """The writer's no-redaction path (`encode_item`, one join) gives the bytes the general
    path (message builders + `goreplay.encode`) gives, a chunked request re-framed by
    Content-Length on both."""
    from shadowlane.record import RecordItem, encode, encode_item, payload_id
    from shadowlane.record.goreplay import Payload
    from shadowlane.record.redact import answer_message

    body = b'{"a": 1}'
    ans = Captured(404, [(b"content-type", b"application/json"), (b"transfer-encoding",
                   b"chunked")], b"nope", False, 0.25)  # fmt: skip
    rid = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
    pid = payload_id(rid)
    assert pid == "0f1e2d3c4b5aa5b4c3d2e1f0"  # a UUID's first and last 12 hex digits
    for sent, reframe in [
        (head(7, body), False),
        (b"POST /r/7 HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n", True),
    ]:
        item = RecordItem(sent, body, ans, rid, 1234, 0, 5678, reframe)
        general = Redaction([], [], [], b"k")  # no rules: only the framing is redone
        want = encode(Payload(REQUEST, pid, 1234, 0, redact_head(sent, body, general)))
        want += encode(Payload(RESPONSE, pid, 1234, 5678, answer_message(ans, None, False)))
        got = encode_item(item)
        assert got == want
        assert b"transfer-encoding" not in got and b"content-length: %d" % len(body) in got


def test_payload_ids_of_other_request_ids_are_hashed() -> None:
    from shadowlane.record import payload_id

    odd = "zz zz zz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"  # UUID-shaped, but a space in it
    for rid in ["rid-1", odd, "", "ü" * 36]:
        pid = payload_id(rid)
        assert len(pid) == 24 and all(c in "0123456789abcdef" for c in pid), (rid, pid)
    assert payload_id("rid-1") != payload_id("rid-2")
