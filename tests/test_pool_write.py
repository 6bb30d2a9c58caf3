"""`compare.pool.write_some`, the one partial-`writev` loop (the comparison child's pipe, the
loop's feeder, the write worker), over a real pipe: more than IOV_MAX buffers, more bytes than
the pipe holds, a non-blocking end that fills up, and a reader that is gone."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from shadowlane.compare.pool import IOV_MAX, write_all, write_some

#: 3000 buffers (more than IOV_MAX) of uneven sizes, about 1.2 MiB: many times a pipe's buffer,
#: and a size that leaves a buffer written in part when the pipe fills
BUFFERS = [bytes([i % 251]) * (97 + (i * 131) % 700) for i in range(3000)]
PAYLOAD = b"".join(BUFFERS)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def drain(fd: int) -> bytes:
    got = bytearray()
    while True:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


@pytest.mark.parametrize("container", [list, deque], ids=["list", "deque"])
def test_a_full_non_blocking_pipe_keeps_the_rest_as_views(
    pipe: tuple[int, int],
    container: Callable[[list[memoryview]], deque[memoryview] | list[memoryview]],
) -> None:
    assert len(BUFFERS) > IOV_MAX
    r, w = pipe
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    out = container([memoryview(b) for b in BUFFERS])
    received = bytearray()
    rounds = 0
    while not write_some(w, out):
        rounds += 1
        assert out, "False means something is left"
        # what is left is the payload's tail, still views of the very buffers given (no copy)
        left = b"".join(bytes(v) for v in out)
        assert PAYLOAD.endswith(left)
        assert all(isinstance(v, memoryview) for v in out)
        assert out[0].obj is BUFFERS[len(BUFFERS) - len(out)]
        received += drain(r)
        assert bytes(received) + left == PAYLOAD
    assert rounds > 0, "the pipe filled up at least once"
    assert not out
    received += drain(r)
    assert bytes(received) == PAYLOAD


def test_write_all_writes_everything_to_a_blocking_pipe(pipe: tuple[int, int]) -> None:
    r, w = pipe
    received = bytearray()

    def reader() -> None:
        while chunk := os.read(r, 1 << 16):
            received.extend(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    write_all(w, [*BUFFERS[:10], b"", *BUFFERS[10:]])
    os.close(w)
    thread.join(30)
    assert bytes(received) == PAYLOAD


def test_write_all_on_a_full_non_blocking_pipe_raises(pipe: tuple[int, int]) -> None:
    _r, w = pipe
    os.set_blocking(w, False)
    with pytest.raises(BlockingIOError):
        write_all(w, BUFFERS)


def test_a_reader_that_is_gone_is_an_error_not_a_full_pipe(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.set_blocking(w, False)
    os.close(r)
    out = [memoryview(b) for b in BUFFERS[:3]]
    with pytest.raises(BrokenPipeError):
        write_some(w, out)
    assert len(out) == 3, "nothing was written, nothing dropped"


def test_nothing_to_write_is_all_out(pipe: tuple[int, int]) -> None:
    assert write_some(pipe[1], [])
    assert write_some(pipe[1], deque())
