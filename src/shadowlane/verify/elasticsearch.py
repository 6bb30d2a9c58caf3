"""One Elasticsearch or OpenSearch cluster as `verify` reads and repairs it, over stdlib HTTP.

Why http.client and not a client library: verify needs eight endpoints (`_cat/indices`,
`_count`, `_search` sorted or scrolled, `_search/scroll`, `_mget`, `_bulk`, `_refresh`), the
same on Elasticsearch 6 to 9 and OpenSearch 1 to 3, and the official clients refuse to talk to
the other vendor's servers (and pin one major version each), while a migration talks to two of
them at once. One keep-alive connection per cluster: verify is one sequential walk.

Every failure is a `ClusterError` whose message names the cluster (`primary`/`shadow`), its
URL and the request, so the CLI can print it as the one line of an exit 2. A stale keep-alive
connection is retried once on a new one, and 429/503 (the cluster shedding load) a few times
with backoff: a verify of millions of documents should not die of one busy moment.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shadowlane.verify.model import VerifyError

__all__ = ["Cluster", "ClusterError", "Doc", "SortRefused"]

#: how long a scroll context lives between two pages
SCROLL_KEEP_ALIVE = "5m"
#: answers worth waiting for (the cluster says it is busy), and the waits before each retry
RETRY_STATUSES = frozenset({429, 503})
RETRY_WAITS = (0.5, 1.0, 2.0)


class ClusterError(VerifyError):
    """A request to one cluster failed: unreachable, timed out, or an error answer."""


class SortRefused(ClusterError):
    """The cluster will not sort on `_id` (Elasticsearch 8's default: no `_id` fielddata)."""


@dataclass(frozen=True, slots=True)
class Doc:
    """One document as read: its id, its `_source` (None when not asked for or not stored)
    and its custom routing, which every later get, index or delete of it must repeat."""

    id: str
    source: Any = None
    routing: str | None = None


def _reason(answer: Any) -> str:
    """`type: reason` of an Elasticsearch error answer (the root cause when there is one)."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict):
            causes = error.get("root_cause")
            cause = causes[0] if isinstance(causes, list) and causes else error
            if isinstance(cause, dict):
                return f"{cause.get('type', 'error')}: {cause.get('reason', '')}".rstrip(": ")
        if isinstance(error, str):
            return error
    return ""


def _index_missing(answer: Any) -> bool:
    return isinstance(answer, dict) and "index_not_found_exception" in _reason(answer)


def _doc(hit: dict[str, Any]) -> Doc:
    routing = hit.get("_routing")
    return Doc(
        id=str(hit["_id"]),
        source=hit.get("_source"),
        routing=str(routing) if routing is not None else None,
    )


class Cluster:
    """A cluster at `url` (http or https, optional path prefix and user:password)."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float = 30.0,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        #: `primary` or `shadow`: every error message starts with it
        self.name = name
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise VerifyError(f"{name}: {url!r} is not an http:// or https:// URL")
        try:
            port = parsed.port
        except ValueError as err:
            raise VerifyError(f"{name}: {url!r}: {err}") from None
        self.url = urllib.parse.urlunsplit(
            (parsed.scheme, parsed.hostname + (f":{port}" if port else ""), parsed.path, "", "")
        ).rstrip("/")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = port or (443 if self._https else 80)
        self._prefix = parsed.path.rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        if parsed.username is not None:
            user = urllib.parse.unquote(parsed.username)
            password = urllib.parse.unquote(parsed.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        for key, value in headers:
            self._headers[key] = value
        self._conn: http.client.HTTPConnection | None = None
        #: requests sent, for the summary (how much work the walk cost)
        self.requests = 0

    # -- transport ------------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _fail(self, method: str, path: str, what: str) -> ClusterError:
        return ClusterError(f"{self.name} {self.url}: {method} {path}: {what}")

    def _send(self, method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = ctype
        reused = self._conn is not None
        for attempt in range(2):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
                self.close()
                if reused and attempt == 0:  # an idle keep-alive connection the server closed
                    reused = False
                    continue
                raise self._fail(method, path, f"connection lost: {err}") from None
            except TimeoutError:
                self.close()
                raise self._fail(method, path, f"no answer within {self.timeout:g}s") from None
            except ssl.SSLError as err:
                self.close()
                raise self._fail(method, path, f"TLS: {err.reason or err}") from None
            except OSError as err:
                self.close()
                raise self._fail(method, path, f"cannot connect: {err.strerror or err}") from None
            except http.client.HTTPException as err:
                self.close()
                raise self._fail(method, path, f"bad HTTP answer: {err!r}") from None
            if resp.will_close:
                self.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ndjson: Iterable[Any] | None = None,
        allow: Iterable[int] = (),
    ) -> tuple[int, Any]:
        """`(status, decoded JSON)`; an error status raises unless it is in `allow`."""
        if ndjson is not None:
            data: bytes | None = b"".join(orjson.dumps(line) + b"\n" for line in ndjson)
            ctype = "application/x-ndjson"
        else:
            data = None if body is None else orjson.dumps(body)
            ctype = "application/json"
        for wait in (*RETRY_WAITS, None):
            self.requests += 1
            status, raw = self._send(method, path, data, ctype)
            if status in RETRY_STATUSES and wait is not None:
                time.sleep(wait)
                continue
            break
        try:
            answer = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            if status >= 400:
                answer = {"error": raw[:200].decode("utf-8", "replace")}
            else:
                raise self._fail(
                    method, path, f"answered {status} with a body that is not JSON"
                ) from None
        if status >= 300 and status not in set(allow):
            reason = _reason(answer)
            raise self._fail(
                method, path, f"answered {status}" + (f" ({reason})" if reason else "")
            )
        return status, answer

    # -- reading --------------------------------------------------------------------------------

    def indices(self) -> dict[str, str]:
        """Every index the cluster has, hidden and closed ones included: `{name: status}`."""
        status, answer = self.request(
            "GET", "/_cat/indices?format=json&h=index,status&expand_wildcards=all", allow=(400,)
        )
        if status == 400:  # a version without expand_wildcards here: hidden ones are not listed
            _, answer = self.request("GET", "/_cat/indices?format=json&h=index,status")
        if not isinstance(answer, list):
            raise self._fail("GET", "/_cat/indices", "answered something that is not a list")
        return {str(row["index"]): str(row.get("status", "open")) for row in answer}

    def count(self, index: str) -> int | None:
        """Documents in `index` (an index or alias name), or None when there is no such index."""
        path = f"/{_quote(index)}/_count"
        status, answer = self.request("GET", path, allow=(404,))
        if status == 404:
            if _index_missing(answer):
                return None
            raise self._fail("GET", path, f"answered 404 ({_reason(answer)})")
        return int(answer.get("count", 0))

    def sorted_pages(self, index: str, size: int, *, source: bool) -> Iterator[list[Doc]]:
        """Every document of `index` in `_id` order, `size` at a time (`search_after`).

        Raises `SortRefused` when the first page is refused with 400: the `_id` sort is the
        only new thing in it, so that is what the cluster will not do.
        """
        path = f"/{_quote(index)}/_search"
        body: dict[str, Any] = {
            "size": size,
            "sort": [{"_id": "asc"}],
            "_source": source,
            "query": {"match_all": {}},
        }
        first = True
        while True:
            status, answer = self.request("POST", path, body, allow=(400,) if first else ())
            if status == 400:
                raise SortRefused(f"{self.name}: cannot sort on _id: {_reason(answer)}")
            first = False
            hits = answer.get("hits", {}).get("hits", [])
            if not hits:
                return
            yield [_doc(h) for h in hits]
            if len(hits) < size:
                return
            body["search_after"] = hits[-1]["sort"]

    def scroll_pages(self, index: str, size: int, *, source: bool) -> Iterator[list[Doc]]:
        """Every document of `index` in no particular order, `size` at a time (scroll).

        `_doc` order is the cheapest a scroll can ask for; the scroll context is cleared when
        the walk ends, also when it ends early.
        """
        body = {"size": size, "sort": ["_doc"], "_source": source, "query": {"match_all": {}}}
        _, answer = self.request(
            "POST", f"/{_quote(index)}/_search?scroll={SCROLL_KEEP_ALIVE}", body
        )
        scroll_id = answer.get("_scroll_id")
        try:
            while True:
                hits = answer.get("hits", {}).get("hits", [])
                if not hits:
                    return
                yield [_doc(h) for h in hits]
                if not scroll_id:
                    raise self._fail("POST", f"/{index}/_search", "no _scroll_id in the answer")
                _, answer = self.request(
                    "POST",
                    "/_search/scroll",
                    {"scroll": SCROLL_KEEP_ALIVE, "scroll_id": scroll_id},
                )
                scroll_id = answer.get("_scroll_id", scroll_id)
        finally:
            if scroll_id:
                # best effort: it expires on its own, and the result does not depend on it
                with contextlib.suppress(ClusterError):
                    self.request(
                        "DELETE", "/_search/scroll", {"scroll_id": [scroll_id]}, allow=(400, 404)
                    )

    def mget(self, index: str, docs: Sequence[Doc], *, source: bool) -> dict[str, Doc]:
        """The documents of `docs` that `index` holds, by id (`_mget`: realtime, no refresh
        needed); an index that does not exist holds none."""
        if not docs:
            return {}
        wanted: list[dict[str, Any]] = []
        for d in docs:
            item: dict[str, Any] = {"_id": d.id, "_source": source}
            if d.routing is not None:
                item["routing"] = d.routing
            wanted.append(item)
        path = f"/{_quote(index)}/_mget"
        status, answer = self.request("POST", path, {"docs": wanted}, allow=(404,))
        if status == 404:
            if _index_missing(answer):
                return {}
            raise self._fail("POST", path, f"answered 404 ({_reason(answer)})")
        found: dict[str, Doc] = {}
        for item in answer.get("docs", []):
            if "error" in item:
                if _index_missing(item):
                    continue
                raise self._fail("POST", path, f"document {item.get('_id')!r}: {_reason(item)}")
            if item.get("found"):
                found[str(item["_id"])] = _doc(item)
        return found

    # -- writing --------------------------------------------------------------------------------

    def bulk(self, actions: Sequence[tuple[dict[str, Any], Any]]) -> dict[int, str]:
        """Send `(action, source or None)` pairs as one `_bulk`; `{position: reason}` of each
        item that failed. A delete of a document already gone is not a failure."""
        if not actions:
            return {}
        lines: list[Any] = []
        for action, source in actions:
            lines.append(action)
            if source is not None:
                lines.append(source)
        _, answer = self.request("POST", "/_bulk", ndjson=lines)
        failed: dict[int, str] = {}
        items = answer.get("items", [])
        if len(items) != len(actions):
            raise self._fail("POST", "/_bulk", f"{len(items)} items answered for {len(actions)}")
        for position, item in enumerate(items):
            op, result = next(iter(item.items()))
            status = int(result.get("status", 500))
            if status < 300 or (op == "delete" and status == 404):
                continue
            error = result.get("error")
            reason = (
                f"{error.get('type')}: {error.get('reason')}"
                if isinstance(error, dict)
                else str(error or status)
            )
            failed[position] = f"{op} {result.get('_id')!r}: {status} {reason}"
        return failed

    def refresh(self, indices: Iterable[str]) -> None:
        names = ",".join(_quote(i) for i in sorted(set(indices)))
        if names:
            self.request("POST", f"/{names}/_refresh")


def _quote(index: str) -> str:
    return urllib.parse.quote(index, safe="*,-")
