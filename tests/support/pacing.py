"""A paced keep-alive load: a few connections, each sending one request per period.

Why paced and not closed-loop: the loop-lag tests measure what shadow work costs the event
loop, so the load must stay far below what the proxy can forward; a late wake-up is then the
work's doing, not a loop kept busy by the load itself. Bounded in count and in time.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable


def paced_load(
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    *,
    requests: int,
    connections: int,
    period: float,
    complete: Callable[[int, bytes], bool],
    seconds: float = 60.0,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> int:
    """`requests` requests over `connections` keep-alive connections to 127.0.0.1:`port`, each
    connection one per `period`, stopping at `seconds`; how many answers `complete` (status,
    body) accepted."""
    done = [0] * connections
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            due = time.monotonic()
            for _ in range(requests // connections):
                if time.monotonic() > deadline:
                    return
                due += period
                time.sleep(max(0.0, due - time.monotonic()))  # pacing, not waiting for a state
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                if complete(resp.status, resp.read()):
                    done[k] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    return sum(done)
