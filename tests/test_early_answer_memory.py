"""A backend that answers an upload before taking its body (nginx's `return 200`, an early 413)
must not leave that body pinned in the connection's write buffer: the copy's lane gives its
bytes back when the answer is in, so whatever is still buffered then would be held outside
every byte cap until the server reads it, and a pooled connection would hold it for good.
Such a connection is dropped (its buffer with it), never pooled."""

from __future__ import annotations

import socket
import threading

from inproc import endpoint, head, lane_to, run, until
from shadowlane.shadow.lane import ShadowCopy, ShadowResult
from shadowlane.wire.messages import body_of

MiB = 1 << 20
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class EarlyAnswer:
    """Answers each connection's first request at the end of its head, then reads nothing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.conns.append(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        got = b""
        while b"\r\n\r\n" not in got:
            got += conn.recv(4096)
        conn.sendall(ANSWER)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def test_an_early_answer_drops_the_connection_and_its_buffered_body() -> None:
    server = EarlyAnswer()
    body = b"u" * (32 * MiB)  # far more than the socket buffers take
    results: list[ShadowResult] = []

    async def main() -> tuple[int, int]:
        ep = endpoint(server.port)
        lane = lane_to(ep, timeout=5.0)
        copy = ShadowCopy(
            lane,
            "POST",
            head("POST", "/up", len(body)),
            body_of(body),
            lambda _c, r: results.append(r),
        )
        assert lane.submit(copy)
        await until(lambda: bool(results), 10, "the early answer")
        return len(ep.idle), lane.bytes

    try:
        idle, pinned = run(main)
    finally:
        server.close()
    assert results[0].status == 200
    assert pinned == 0
    assert idle == 0, "a connection with 30 MiB still to send was pooled"
