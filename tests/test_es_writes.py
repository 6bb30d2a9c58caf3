"""shadow/elasticsearch.py: what an Elasticsearch / OpenSearch write touches, the ids the shadow
must reuse, and which documents may have diverged.

The pure functions are tested on realistic requests and answers (the answers in the shape
osmem-server and OpenSearch give them); the last test sends the rewritten copies to two real
OpenSearch-compatible servers of different versions (osmem-server, see support/opensearch.py)
and checks that the shadow accepts them and ends up with the primary's documents and ids.
"""

from __future__ import annotations

import http.client
import os
import random
import urllib.parse
from typing import Any

import orjson
import pytest

from shadowlane.shadow.elasticsearch import (
    Divergent,
    EsRequest,
    IdsSkip,
    IdsUnusable,
    parse_request,
)
from shadowlane.shadow.keys import SCOPE_BARRIER

# --- builders of realistic bodies and answers ----------------------------------------------


def ndjson(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def action(kind: str, **meta: Any) -> bytes:
    return orjson.dumps({kind: meta})


def done(kind: str, index: str, id_: str, status: int = 201) -> dict[str, Any]:
    """A successful bulk item as OpenSearch writes it."""
    result = "created" if status == 201 else ("not_found" if status == 404 else "updated")
    return {
        kind: {
            "_index": index,
            "_id": id_,
            "_version": 1,
            "result": result,
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": 3,
            "_primary_term": 1,
            "status": status,
        }
    }


def failed(
    kind: str, index: str, status: int = 400, error: str = "mapper_parsing_exception", id_: str = ""
) -> dict[str, Any]:
    return {
        kind: {
            "_index": index,
            "_id": id_,
            "status": status,
            "error": {"type": error, "reason": "failed to parse field [n] of type [integer]"},
        }
    }


def answer(*items: dict[str, Any]) -> bytes:
    statuses = [r.get("status") for i in items for r in i.values() if isinstance(r, dict)]
    errors = any(not (isinstance(st, int) and 200 <= st < 300) for st in statuses)
    return orjson.dumps({"took": 3, "errors": errors, "items": list(items)})


def labels(req: EsRequest) -> list[str]:
    return req.order_keys().labels()


def rewritten(result: EsRequest | IdsSkip | IdsUnusable) -> EsRequest:
    assert isinstance(result, EsRequest), result
    return result


# --- reads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", b"/idx/_doc/1"),
        ("HEAD", b"/idx"),
        ("GET", b"/_cluster/health"),
        ("POST", b"/idx/_search"),
        ("POST", b"/logs-*/_search?size=0"),
        ("POST", b"/_msearch"),
        ("POST", b"/idx/_count"),
        ("POST", b"/_mget"),
        ("POST", b"/idx/_refresh"),
        ("POST", b"/_flush"),
        ("POST", b"/idx/_validate/query?explain=true"),
        ("POST", b"/idx/_explain/1"),
        ("POST", b"/idx/_field_caps?fields=n"),
        ("POST", b"/_search/scroll"),
        ("DELETE", b"/_search/scroll"),
        ("POST", b"/idx/_pit?keep_alive=1m"),
        ("DELETE", b"/_pit"),
        ("POST", b"/idx/_search/point_in_time?keep_alive=1m"),
    ],
)
def test_reads_have_no_keys_and_never_diverge(method: str, target: bytes) -> None:
    body = b'{"query":{"match_all":{}}}'
    req = parse_request(method, target, body)
    assert req.order_keys().empty
    assert not req.generated_ids()
    assert req.with_primary_ids(200, b"{}", False) is req
    assert req.divergences(200, b"{}", False, 500, b"{}", False) == []
    assert req.body() is body


# --- document writes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "label"),
    [
        ("PUT", b"/books/_doc/1", "books/1"),
        ("POST", b"/books/_doc/1?refresh=wait_for", "books/1"),
        ("PUT", b"/books/_create/1", "books/1"),
        ("POST", b"/books/_create/1", "books/1"),
        ("POST", b"/books/_update/1?retry_on_conflict=3", "books/1"),
        ("DELETE", b"/books/_doc/1", "books/1"),
        # percent-encoded ids and index names are decoded; '+' is not a space in a path
        ("PUT", b"/books/_doc/a%2Fb", "books/a/b"),
        ("PUT", b"/books/_doc/%C3%A9t%C3%A9%20%F0%9F%93%9A", "books/\u00e9t\u00e9 \U0001f4da"),
        ("PUT", b"/books/_doc/a+b", "books/a+b"),
        ("DELETE", b"/my%2Dbooks/_doc/x%3Fy", "my-books/x?y"),
        # Elasticsearch's router ignores trailing slashes
        ("PUT", b"/books/_doc/7/", "books/7"),
        # absolute-form target
        ("PUT", b"http://es.internal:9200/books/_doc/9?refresh=true", "books/9"),
    ],
)
def test_document_writes_hold_their_document(method: str, target: bytes, label: str) -> None:
    body = b'{"title": "Dune", "n": 1}' if method != "DELETE" else b""
    req = parse_request(method, target, body)
    assert labels(req) == [label]
    index = label.partition("/")[0]
    assert req.order_keys().items == ((index, label.partition("/")[2]),)
    assert not req.generated_ids()
    assert req.with_primary_ids(201, b"{}", False) is req
    assert req.body() is body and req.target is target and req.method == method


def test_post_doc_without_id_touches_its_index_and_needs_the_primary_id() -> None:
    body = b'{"title": "Dune", "n": 1}'
    req = parse_request("POST", b"/books/_doc?refresh=true", body)
    assert req.generated_ids()
    keys = req.order_keys()
    assert (keys.items, keys.groups, keys.scope, keys.shared) == ((), (), False, ("books",))
    primary = (
        b'{"_id":"-EA-EmKChSgoXC-rqM6H","_index":"books","_primary_term":1,"_seq_no":1,'
        b'"_shards":{"failed":0,"successful":1,"total":2},"_version":1,"result":"created"}\n'
    )
    copy = rewritten(req.with_primary_ids(201, primary, False))
    assert (copy.method, copy.target) == (
        "PUT",
        b"/books/_create/-EA-EmKChSgoXC-rqM6H?refresh=true",
    )
    assert copy.body() is body
    assert labels(copy) == ["books/-EA-EmKChSgoXC-rqM6H"]
    assert not copy.generated_ids()
    assert copy.with_primary_ids(201, primary, False) is copy


def test_post_doc_rewrite_encodes_the_id_and_keeps_the_raw_index_and_query() -> None:
    req = parse_request("POST", b"/my%2Dbooks/_doc/?op_type=create&pipeline=p%201", b"{}")
    copy = rewritten(req.with_primary_ids(201, orjson.dumps({"_id": "a/b c+\u00e9?#"}), False))
    # op_type goes: _create implies it, and rejects op_type=index
    assert copy.target == b"/my%2Dbooks/_create/a%2Fb%20c%2B%C3%A9%3F%23?pipeline=p%201"
    assert labels(copy) == ["my-books/a/b c+\u00e9?#"]
    only_op = parse_request("POST", b"/books/_doc?op_type=index", b"{}")
    assert rewritten(only_op.with_primary_ids(201, b'{"_id":"x"}', False)).target == (
        b"/books/_create/x"
    )


@pytest.mark.parametrize(
    ("status", "body", "truncated", "kind", "reason"),
    [
        (400, b'{"error":{"type":"mapper_parsing_exception"},"status":400}', False, IdsSkip, "400"),
        (503, b"", True, IdsSkip, "503"),  # the status says it: cut or not, nothing created
        (201, b'{"_id":"abc","_index":"bo', True, IdsUnusable, "cut"),
        (201, b"<html>created</html>", False, IdsUnusable, "JSON"),
        (201, b'{"_index":"books","result":"created"}', False, IdsUnusable, "_id"),
        (201, b'{"_id":17}', False, IdsUnusable, "_id"),
        (201, b'{"_id":""}', False, IdsUnusable, "_id"),
        (201, b'["_id"]', False, IdsUnusable, "JSON"),
    ],
)
def test_post_doc_primary_answers_that_give_no_id(
    status: int, body: bytes, truncated: bool, kind: type, reason: str
) -> None:
    req = parse_request("POST", b"/books/_doc", b'{"n":1}')
    result = req.with_primary_ids(status, body, truncated)
    assert isinstance(result, kind)
    assert isinstance(result, IdsSkip | IdsUnusable) and reason in result.reason


# --- index- and cluster-level operations ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "groups"),
    [
        ("PUT", b"/books", ("books",)),
        ("DELETE", b"/books", ("books",)),
        ("PUT", b"/books/_mapping", ("books",)),
        ("PUT", b"/books/_settings", ("books",)),
        ("POST", b"/books/_delete_by_query?conflicts=proceed", ("books",)),
        ("POST", b"/books/_update_by_query", ("books",)),
        ("POST", b"/books/_open", ("books",)),
        ("POST", b"/books/_close", ("books",)),
        ("POST", b"/books-write/_rollover", ("books-write",)),
        # the alias or new index they create or move is barred too
        ("PUT", b"/books/_alias/current", ("books", "current")),
        ("DELETE", b"/books/_aliases/current", ("books", "current")),
        ("POST", b"/books-write/_rollover/books-000002", ("books-write", "books-000002")),
        ("POST", b"/books/_shrink/books-small", ("books", "books-small")),
        ("POST", b"/books/_split/books-big", ("books", "books-big")),
        ("PUT", b"/books/_clone/books-copy", ("books", "books-copy")),
        # writes not recognised, naming an index first (legacy typed APIs among them)
        ("POST", b"/books/book/1", ("books",)),
        ("PUT", b"/books/_doc", ("books",)),
        ("POST", b"/books/_doc/1/_update", ("books",)),
        ("PATCH", b"/books/_something", ("books",)),
    ],
)
def test_index_level_operations_are_barriers_for_their_index(
    method: str, target: bytes, groups: tuple[str, ...]
) -> None:
    req = parse_request(method, target, b"{}")
    keys = req.order_keys()
    assert (keys.groups, keys.items, keys.scope) == (groups, (), False)
    assert labels(req) == list(groups)
    assert not req.generated_ids()


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("PUT", b"/_index_template/logs"),
        ("DELETE", b"/_template/old"),
        ("PUT", b"/_component_template/base"),
        ("POST", b"/_aliases"),
        ("PUT", b"/_cluster/settings"),
        ("PUT", b"/_ingest/pipeline/enrich"),
        ("PUT", b"/_snapshot/repo/snap-1?wait_for_completion=true"),
        ("PUT", b"/_settings"),
        ("PUT", b"/_data_stream/logs-app"),
        ("POST", b"/_doc"),
        ("POST", b"/"),
        ("DELETE", b""),
        # index expressions: several indices (and we cannot know aliases)
        ("PUT", b"/logs-*/_settings"),
        ("DELETE", b"/books,films"),
        ("POST", b"/_all/_close"),
        ("DELETE", b"/-books"),
        ("PUT", b"/logs%2A/_mapping"),
        ("POST", b"/a%2Cb/_delete_by_query"),
        ("PUT", b"/logs-*/_doc/1"),
        ("PUT", b"/books/_alias/cur*"),
        ("DELETE", b"/books/_alias/a,b"),
    ],
)
def test_cluster_writes_and_index_expressions_are_scope_barriers(
    method: str, target: bytes
) -> None:
    req = parse_request(method, target, b"{}")
    assert req.order_keys() is SCOPE_BARRIER
    assert labels(req) == ["*"]
    assert not req.generated_ids()


def test_post_doc_to_an_index_expression_is_a_scope_barrier_that_still_needs_ids() -> None:
    req = parse_request("POST", b"/logs-*/_doc", b'{"n":1}')
    assert req.order_keys() is SCOPE_BARRIER and req.generated_ids()
    copy = rewritten(req.with_primary_ids(201, b'{"_id":"q1"}', False))
    assert copy.target == b"/logs-*/_create/q1" and copy.order_keys() is SCOPE_BARRIER


@pytest.mark.parametrize(
    ("body", "groups"),
    [
        (b'{"source":{"index":"books"},"dest":{"index":"books-v2"}}', ("books-v2", "books")),
        (b'{"source":{"index":["a","b"]},"dest":{"index":"ab"},"max_docs":10}', ("ab", "a", "b")),
        (b'{"source":{"index":"ab"},"dest":{"index":"ab"}}', ("ab",)),
        (
            b'{"source":{"remote":{"host":"http://old:9200"},"index":"x*"},"dest":{"index":"x"}}',
            ("x",),
        ),
    ],
)
def test_reindex_bars_its_destination_and_sources(body: bytes, groups: tuple[str, ...]) -> None:
    req = parse_request("POST", b"/_reindex?wait_for_completion=false", body)
    assert req.order_keys().groups == groups and not req.order_keys().scope


@pytest.mark.parametrize(
    "body",
    [
        b'{"source":{"index":"logs-*"},"dest":{"index":"all"}}',
        b'{"source":{"index":"a,b"},"dest":{"index":"ab"}}',
        b'{"source":{"index":"a"},"dest":{"index":"b"},"script":{"source":"ctx._index=\'c\'"}}',
        b'{"source":{"index":"a"}}',
        b'{"source":{"index":"a"},"dest":{"index":"b"}',
        b"",
    ],
)
def test_reindex_that_may_write_anywhere_is_a_scope_barrier(body: bytes) -> None:
    assert parse_request("POST", b"/_reindex", body).order_keys() is SCOPE_BARRIER


# --- _bulk: keys ---------------------------------------------------------------------------

ALL_FOUR = ndjson(
    action("index", _index="books", _id="1"),
    b'{"title":"Dune","n":1}',
    action("create", _id="2"),
    b'{"title":"Emma","n":2}',
    action("update", _index="films", _id="1", retry_on_conflict=3),
    b'{"doc":{"n":3},"doc_as_upsert":true}',
    action("delete", _index="books", _id="old"),
)


def test_bulk_with_ids_holds_every_document_and_needs_nothing_from_the_primary() -> None:
    req = parse_request("POST", b"/books/_bulk?refresh=true", ALL_FOUR)
    assert labels(req) == ["books/1", "books/2", "films/1", "books/old"]
    assert req.order_keys().shared == ()
    assert not req.generated_ids()
    assert req.with_primary_ids(200, b"whatever", True) is req
    assert req.body() is ALL_FOUR


def test_bulk_without_default_index_and_numeric_ids() -> None:
    body = ndjson(
        action("index", _index="books", _id=5), b"{}", action("delete", _index="b", _id=6)
    )
    assert labels(parse_request("PUT", b"/_bulk", body)) == ["books/5", "b/6"]


def test_bulk_without_ids_touches_the_index_shared_and_needs_the_primary_ids() -> None:
    body = ndjson(
        action("index"),
        b'{"n":1}',
        action("create", _index="films"),
        b'{"n":2}',
        action("index", _index="books", _id=""),  # empty: the server picks one, as if absent
        b'{"n":3}',
        action("delete", _id="x"),
    )
    req = parse_request("POST", b"/books/_bulk", body)
    keys = req.order_keys()
    assert req.generated_ids()
    assert (keys.items, keys.shared, keys.scope) == ((("books", "x"),), ("books", "films"), False)


def test_bulk_blank_lines_crlf_and_a_missing_final_newline() -> None:
    body = (
        b"\n"
        b'{"index":{"_id":"1"}}\r\n'
        b'{"n":1}\r\n'
        b"   \t\r\n"
        b"\n"
        b'{"delete":{"_id":"2"}}\n'
        b"\n"
        b'{"create":{"_id":"3"}}\n'
        b'{"n":3}'
    )
    req = parse_request("POST", b"/books/_bulk", body)
    assert labels(req) == ["books/1", "books/2", "books/3"]


def test_bulk_line_after_an_action_is_its_source_even_when_blank() -> None:
    """As Elasticsearch reads it: the source line is taken as it is (the server fails that
    item), so the next line is an action again, and items stay aligned with actions."""
    body = ndjson(action("index", _id="1"), b"", action("index", _id="2"), b'{"n":2}')
    assert labels(parse_request("POST", b"/books/_bulk", body)) == ["books/1", "books/2"]


@pytest.mark.parametrize(
    ("body", "generated"),
    [
        (ndjson(b"not json", b'{"n":1}'), True),
        (ndjson(action("index", _index="b", _id="1"), b"{}", b'{"index":{"_id":"2"}'), True),
        (ndjson(action("upsert", _index="books", _id="1"), b"{}"), True),
        (ndjson(b'{"index":{"_id":"1"},"delete":{"_id":"2"}}', b"{}"), True),
        (ndjson(b'{"index":"books"}', b"{}"), True),
        (ndjson(b'["index"]'), True),
        (ndjson(b'{"index":{"_id":null}}', b"{}"), True),
        (ndjson(b'{"index":{"_id":1.5}}', b"{}"), True),
        # no index and no default: known to have an id or not
        (ndjson(action("index", _id="1"), b"{}"), False),
        (ndjson(action("create"), b"{}"), True),
        (ndjson(action("index", _index="", _id="1"), b"{}"), False),
        # a source line missing at the end
        (ndjson(action("index", _index="books", _id="1")), False),
        (
            ndjson(action("index", _index="books", _id="1"), b"{}", action("create", _index="b")),
            True,
        ),
        # update and delete need an id
        (ndjson(action("update", _index="books"), b"{}"), False),
        (ndjson(action("delete", _index="books", _id="")), False),
        # an id-less action before the problem
        (ndjson(action("index", _index="b"), b"{}", action("delete", _index="b")), True),
    ],
)
def test_malformed_bulk_is_a_scope_barrier_and_its_ids_unusable(
    body: bytes, generated: bool
) -> None:
    req = parse_request("POST", b"/_bulk", body)
    assert req.order_keys() is SCOPE_BARRIER
    assert req.generated_ids() is generated
    result = req.with_primary_ids(200, answer(done("index", "b", "z")), False)
    if generated:
        assert isinstance(result, IdsUnusable) and "not understood" in result.reason
    else:
        assert result is req


def test_bulk_naming_an_index_expression_is_a_scope_barrier_but_gets_its_ids() -> None:
    body = ndjson(action("index", _index="logs-*"), b'{"n":1}', action("index", _id="k"), b"{}")
    req = parse_request("POST", b"/books/_bulk", body)
    assert req.order_keys() is SCOPE_BARRIER and req.generated_ids()
    copy = rewritten(
        req.with_primary_ids(
            200, answer(done("index", "logs-1", "g"), done("index", "books", "k")), False
        )
    )
    assert copy.body() == ndjson(
        b'{"index":{"_index":"logs-*","_id":"g"}}', b'{"n":1}', action("index", _id="k"), b"{}"
    )
    assert copy.order_keys() is SCOPE_BARRIER


# --- _bulk: ids from the primary -----------------------------------------------------------

#: sources with bytes a parser would change: spacing, escapes, raw UTF-8, invalid UTF-8, CR
SRC_A = b'{ "title" : "Dune",\t"n":1 , "u":"\\u00e9" }'
SRC_B = b'{"n":"two", "tag":"\xc3\xa9t\xc3\xa9 \xf0\x9f\x93\x9a"}'
SRC_C = b'{"n":3,"raw":"\xff\xfe"}\r'
SRC_D = b'{"doc":{"n":4}}'


def mixed() -> bytes:
    return ndjson(
        b'{ "index" : { "_index" : "books", "pipeline": "p" } }',
        SRC_A,
        b'{"create":{}}',
        SRC_B,
        b'{"index":{"_index":"books","_id":"k1"}}',
        SRC_C,
        b'{"update":{"_id":"k1","retry_on_conflict":2}}',
        SRC_D,
        b'{"create":{"_index":"films","routing":"u1"}}',
        SRC_A,
        b'{"delete":{"_id":"gone"}}',
    )


def mixed_primary_answer() -> bytes:
    return answer(
        done("index", "books", "gen-A"),
        failed("create", "books"),  # mapping conflict: the primary stored nothing
        done("index", "books", "k1"),
        done("update", "books", "k1", 200),
        done("create", "films", "gen-E"),
        done("delete", "books", "gone", 404),
    )


MIXED_ITEMS: list[dict[str, Any]] = orjson.loads(mixed_primary_answer())["items"]


def test_bulk_ids_inserted_failed_items_removed_every_other_byte_kept() -> None:
    req = parse_request("POST", b"/books/_bulk?refresh=true", mixed())
    copy = rewritten(req.with_primary_ids(200, mixed_primary_answer(), False))
    assert copy.body() == ndjson(
        b'{"index":{"_index":"books","pipeline":"p","_id":"gen-A"}}',
        SRC_A,
        b'{"index":{"_index":"books","_id":"k1"}}',
        SRC_C,
        b'{"update":{"_id":"k1","retry_on_conflict":2}}',
        SRC_D,
        b'{"create":{"_index":"films","routing":"u1","_id":"gen-E"}}',
        SRC_A,
        b'{"delete":{"_id":"gone"}}',
    )
    assert (copy.method, copy.target) == ("POST", b"/books/_bulk?refresh=true")
    assert labels(copy) == ["books/gen-A", "books/k1", "films/gen-E", "books/gone"]
    assert copy.order_keys().shared == ()
    assert not copy.generated_ids() and copy.with_primary_ids(200, b"", True) is copy


def test_bulk_empty_id_is_replaced_in_place() -> None:
    body = ndjson(b'{"index":{"_id":"","_index":"books"}}', b"{}")
    copy = rewritten(
        parse_request("POST", b"/_bulk", body).with_primary_ids(
            200, answer(done("index", "books", "n1")), False
        )
    )
    assert copy.body() == ndjson(b'{"index":{"_id":"n1","_index":"books"}}', b"{}")


def test_bulk_whose_primary_failed_every_action_is_skipped() -> None:
    body = ndjson(action("index"), b'{"n":"x"}', action("create"), b'{"n":"y"}')
    req = parse_request("POST", b"/books/_bulk", body)
    result = req.with_primary_ids(
        200, answer(failed("index", "books"), failed("create", "books", 429, "es_rejected")), False
    )
    assert isinstance(result, IdsSkip)


@pytest.mark.parametrize(
    ("status", "body", "truncated", "reason"),
    [
        (200, mixed_primary_answer()[:-40], True, "cut"),
        (200, b"<html>bad gateway</html>", False, "items"),
        (200, b'{"took":1,"errors":false}', False, "items"),
        (400, b'{"error":{"type":"illegal_argument_exception"},"status":400}', False, "400"),
        (500, mixed_primary_answer(), False, "500"),
        # five items for six actions (say, filter_path left some out)
        (200, orjson.dumps({"items": MIXED_ITEMS[:5]}), False, "5 items for 6"),
        # the item of an index action says "create": the answer is not this request's
        (200, answer(done("create", "books", "gen-A"), *MIXED_ITEMS[1:]), False, "item 0"),
        # a success without an id
        (200, answer(done("index", "books", ""), *MIXED_ITEMS[1:]), False, "_id"),
        (200, answer({"index": "yes"}, *MIXED_ITEMS[1:]), False, "item 0"),
        (200, answer({"index": {"_id": "x", "status": "201"}}, *MIXED_ITEMS[1:]), False, "status"),
        (500, b'{"took":1,"err', True, "500"),
    ],
)  # fmt: skip
def test_bulk_primary_answers_that_cannot_give_ids(
    status: int, body: bytes, truncated: bool, reason: str
) -> None:
    req = parse_request("POST", b"/books/_bulk", mixed())
    result = req.with_primary_ids(status, body, truncated)
    assert isinstance(result, IdsUnusable) and reason in result.reason, result


def test_bulk_rewrite_keeps_every_source_line_in_order_property() -> None:
    """Random bulks (all four actions, ids or not, blank lines, CRLF, no final newline,
    arbitrary source bytes) and random primary outcomes: the copy's lines are exactly the
    kept actions' sources, in order, byte for byte, and each id-less kept action carries the
    primary's id."""
    rng = random.Random(20261201)
    alphabet = [b"a", b" ", b'"', b"\\", b"{", b"}", b"\r", b"\t", b"\xc3\xa9", b"\xff", b"9"]
    for _ in range(400):
        lines: list[bytes] = []
        expected: list[tuple[str, bytes | None, str | None]] = []  # kind, source, new id
        items: list[dict[str, Any]] = []
        for n in range(rng.randint(1, 12)):
            if rng.random() < 0.2:
                lines.append(rng.choice([b"", b"  ", b"\r"]))
            kind = rng.choice(["index", "create", "update", "delete"])
            meta: dict[str, Any] = {}
            if rng.random() < 0.5:
                meta["_index"] = rng.choice(["books", "films"])
            has_id = kind in ("update", "delete") or rng.random() < 0.4
            if has_id:
                meta["_id"] = f"d{n}"
            lines.append(orjson.dumps({kind: meta}))
            source = None
            if kind != "delete":
                source = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
                lines.append(source)
            index = meta.get("_index", "books")
            success = rng.random() < 0.7
            new_id = f"g{n}" if not has_id else None
            if success:
                items.append(done(kind, index, meta.get("_id", new_id or "")))
            else:
                items.append(failed(kind, index, rng.choice([400, 409, 429])))
            if has_id or success:
                expected.append((kind, source, new_id))
        # no final newline now and then (unless the last line is empty: that would be no line)
        body = b"\n".join(lines) + (b"\n" if rng.random() < 0.8 or not lines[-1] else b"")
        req = parse_request("POST", b"/books/_bulk", body)
        assert req.order_keys() is not SCOPE_BARRIER, (req._problem, body)
        result = req.with_primary_ids(200, answer(*items), False)
        if not expected:
            assert isinstance(result, IdsSkip)
            continue
        copy = rewritten(result)
        out = copy.body().split(b"\n")
        if copy.body().endswith(b"\n"):
            out.pop()
        got: list[tuple[str, bytes | None, str | None]] = []
        i = 0
        while i < len(out):
            if not out[i].strip(b" \t\r"):
                i += 1
                continue
            ((kind, meta),) = orjson.loads(out[i]).items()
            source = out[i + 1] if kind != "delete" else None
            i += 1 if kind == "delete" else 2
            got.append((kind, source, meta["_id"] if str(meta["_id"]).startswith("g") else None))
        assert got == expected
        if not req.generated_ids():
            assert copy is req and copy.body() is body


def test_nothing_raises_on_random_input() -> None:
    rng = random.Random(7)
    pieces = [b"/", b"_bulk", b"_doc", b"idx", b"%", b"%2", b"%zz", b"?", b"*", b"_all", b"-",
              b"\xff", b"_reindex", b"_create", b"_update", b"_alias", b"a", b","]  # fmt: skip
    body_pieces = [b"\n", b"{", b"}", b'"index"', b'"_id"', b":", b'"x"', b"[", b"1", b"\xff",
                   b'{"index":{}}', b'{"delete":{"_id":"1"}}', b"\r"]  # fmt: skip
    for _ in range(3000):
        target = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        body = b"".join(rng.choice(body_pieces) for _ in range(rng.randint(0, 12)))
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
        req = parse_request(method, target, body)
        req.order_keys().labels()
        ans = rng.choice([b"", b"{", answer(done("index", "idx", "1")), b'{"items":[1]}',
                          b'{"_id":"q"}', b'{"items":[{"index":{"status":"x"}}]}'])  # fmt: skip
        out = req.with_primary_ids(rng.choice([200, 201, 400]), ans, rng.random() < 0.2)
        if isinstance(out, EsRequest):
            out.divergences(200, ans, False, rng.choice([200, 500]), ans, rng.random() < 0.2)
        req.divergences(200, ans, rng.random() < 0.5, 200, b"{}", False)


# --- divergences ---------------------------------------------------------------------------


def test_document_write_status_mismatch_names_its_document() -> None:
    req = parse_request("PUT", b"/books/_doc/a%2Fb", b'{"n":"x"}')
    shadow = b'{"error":{"type":"mapper_parsing_exception","reason":"..."},"status":400}'
    assert req.divergences(201, b'{"result":"created"}', False, 400, shadow, False) == [
        Divergent(
            "books/a/b", "status_mismatch", "primary 201, shadow 400 mapper_parsing_exception"
        )
    ]
    assert req.divergences(409, b'{"error":"conflict"}', False, 200, b"{}", False) == [
        Divergent("books/a/b", "status_mismatch", "primary 409 conflict, shadow 200")
    ]
    assert req.divergences(201, b"{}", False, 503, b"cut", True) == [
        Divergent("books/a/b", "status_mismatch", "primary 201, shadow 503")
    ]
    assert req.divergences(201, b"{}", False, 200, b"{}", False) == []
    delete = parse_request("DELETE", b"/books/_doc/gone", b"")
    assert delete.divergences(404, b'{"result":"not_found"}', False, 404, b"{}", False) == []


def test_status_mismatch_of_barriers_and_of_id_less_writes() -> None:
    template = parse_request("PUT", b"/_index_template/t", b"{}")
    assert [d.label for d in template.divergences(200, b"{}", False, 400, b"{}", False)] == ["*"]
    mapping = parse_request("PUT", b"/books/_mapping", b"{}")
    assert [d.label for d in mapping.divergences(200, b"{}", False, 400, b"{}", False)] == ["books"]
    # a copy sent with the shadow choosing the id: the whole index is the suspect
    post = parse_request("POST", b"/books/_doc", b"{}")
    assert [d.label for d in post.divergences(201, b"{}", False, 400, b"{}", False)] == ["books"]


def rewritten_mixed() -> EsRequest:
    req = parse_request("POST", b"/books/_bulk", mixed())
    return rewritten(req.with_primary_ids(200, mixed_primary_answer(), False))


def test_bulk_item_divergence_follows_the_primary_item_of_each_kept_action() -> None:
    copy = rewritten_mixed()
    shadow = answer(
        done("index", "books", "gen-A"),
        failed("index", "books", 409, "version_conflict_engine_exception", "k1"),
        done("update", "books", "k1", 200),
        done("create", "films", "gen-E"),
        done("delete", "books", "gone", 200),  # the shadow had it, the primary did not
    )
    got = copy.divergences(200, mixed_primary_answer(), False, 200, shadow, False)
    assert got == [
        Divergent(
            "books/k1", "bulk_item", "primary 201, shadow 409 version_conflict_engine_exception"
        ),
        Divergent("books/gone", "bulk_item", "primary 404, shadow 200"),
    ]
    agree = answer(
        done("index", "books", "gen-A"),
        done("index", "books", "k1"),
        done("update", "books", "k1", 200),
        done("create", "films", "gen-E"),
        done("delete", "books", "gone", 404),
    )
    assert copy.divergences(200, mixed_primary_answer(), False, 200, agree, False) == []


def test_bulk_overall_status_mismatch_names_every_key() -> None:
    copy = rewritten_mixed()
    shadow = b'{"error":{"type":"illegal_argument_exception"},"status":400}'
    got = copy.divergences(200, mixed_primary_answer(), False, 400, shadow, False)
    assert [(d.label, d.reason) for d in got] == [
        (label, "status_mismatch")
        for label in ["books/gen-A", "books/k1", "films/gen-E", "books/gone"]
    ]
    assert got[0].detail == "primary 200, shadow 400 illegal_argument_exception"
    assert copy.divergences(503, b"", True, 500, b"", True) == []


@pytest.mark.parametrize(
    ("primary", "p_cut", "shadow", "s_cut", "detail"),
    [
        (None, True, None, False, "primary answer cut short"),
        (None, False, None, True, "shadow answer cut short"),
        (b"{}", False, None, False, "primary answer has no items list"),
        (None, False, b"not json", False, "shadow answer has no items list"),
        (None, False, answer(done("index", "b", "g")), False, "shadow answered 1 items for 5"),
        (answer(done("index", "b", "g")), False, None, False, "primary answered 1 items for 6"),
        (None, False, answer(*[done("create", "b", "x")] * 5), False, "shadow item 0 is not"),
        (None, False, answer({"index": {"_id": "gen-A"}}, *[done("index", "b", "x")] * 4), False,
         "shadow item 0 has no status"),
    ],
)  # fmt: skip
def test_bulk_answers_that_cannot_be_checked_make_every_key_a_suspect(
    primary: bytes | None, p_cut: bool, shadow: bytes | None, s_cut: bool, detail: str
) -> None:
    copy = rewritten_mixed()
    same = answer(
        done("index", "books", "gen-A"),
        done("index", "books", "k1"),
        done("update", "books", "k1", 200),
        done("create", "films", "gen-E"),
        done("delete", "books", "gone", 404),
    )
    got = copy.divergences(
        200, primary or mixed_primary_answer(), p_cut, 200, shadow or same, s_cut
    )
    assert {d.reason for d in got} == {"answer_unusable"}
    assert [d.label for d in got] == ["books/gen-A", "books/k1", "films/gen-E", "books/gone"]
    assert detail in got[0].detail


def test_unrewritten_bulk_divergences_label_id_less_actions_by_index() -> None:
    body = ndjson(action("index"), b'{"n":1}', action("delete", _id="x"))
    req = parse_request("POST", b"/books/_bulk", body)
    primary = answer(done("index", "books", "p1"), done("delete", "books", "x", 200))
    shadow = answer(failed("index", "books"), done("delete", "books", "x", 200))
    assert req.divergences(200, primary, False, 200, shadow, False) == [
        Divergent("books", "bulk_item", "primary 201, shadow 400 mapper_parsing_exception")
    ]
    unusable = req.divergences(200, primary, True, 200, shadow, False)
    assert [d.label for d in unusable] == ["books/x", "books"]


def test_malformed_bulk_sent_unchanged_compares_items_one_to_one_as_scope() -> None:
    body = ndjson(action("index", _id="1"), b"{}")  # no index, no default
    req = parse_request("POST", b"/_bulk", body)
    primary = answer(done("index", "a", "1"))
    shadow = answer(failed("index", "a", 404, "index_not_found_exception"))
    assert req.divergences(200, primary, False, 200, shadow, False) == [
        Divergent("*", "bulk_item", "primary 201, shadow 404 index_not_found_exception")
    ]
    assert req.divergences(400, b"{}", False, 400, b"{}", False) == []
    short = req.divergences(200, primary, False, 200, answer(), False)
    assert [(d.label, d.reason) for d in short] == [("*", "answer_unusable")]


# --- against real servers ------------------------------------------------------------------


def send(url: str, method: str, target: bytes, body: bytes) -> tuple[int, bytes]:
    """One request with exactly these bytes (urllib would re-encode the path)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    try:
        ctype = "application/x-ndjson" if b"_bulk" in target else "application/json"
        conn.putrequest(method, target.decode("ascii"), skip_accept_encoding=True)
        conn.putheader("Content-Type", ctype)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_rewritten_copies_are_accepted_by_a_real_shadow_and_divergences_are_real() -> None:
    """osmem-server 0.1.1 (OpenSearch 2.19) as primary, 0.1.6 (3.8) as shadow: a POST _doc and
    a _bulk with id-less actions (one fails on the primary: a mapping conflict) are sent to the
    primary, rewritten from its real answers and sent to the shadow, which must then hold the
    same documents under the same ids. Then a shadow index with a stricter mapping rejects
    items the primary took, and `divergences` must name exactly those documents."""
    from support.migration import InstallError
    from support.opensearch import NEW, OLD, OpenSearchServer, binary

    try:
        binary(OLD), binary(NEW)
    except InstallError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    with OpenSearchServer(OLD) as a, OpenSearchServer(NEW) as b:
        books = {"mappings": {"properties": {"n": {"type": "integer"}, "tag": {"type": "keyword"}}}}
        for server in (a, b):
            assert server.request("PUT", "/books", books).get("acknowledged") is True

        def mirror(
            method: str, target: bytes, body: bytes
        ) -> tuple[EsRequest, int, bytes, int, bytes]:
            p_status, p_answer = send(a.url, method, target, body)
            copy = parse_request(method, target, body).with_primary_ids(p_status, p_answer, False)
            assert isinstance(copy, EsRequest), (copy, p_answer)
            s_status, s_answer = send(b.url, copy.method, copy.target, copy.body())
            return copy, p_status, p_answer, s_status, s_answer

        single = b'{"n": 1, "tag": "single"}'
        copy, p_status, p_answer, s_status, s_answer = mirror(
            "POST", b"/books/_doc?refresh=true", single
        )
        assert p_status == 201 and s_status == 201, s_answer
        assert copy.target.startswith(b"/books/_create/")
        assert orjson.loads(s_answer)["_id"] == orjson.loads(p_answer)["_id"]
        assert copy.divergences(p_status, p_answer, False, s_status, s_answer, False) == []

        bulk = ndjson(
            b'{"index":{"_index":"books"}}',
            b'{"n": 2, "tag": "gen-index"}',
            b'{"create":{}}',
            b'{"n": "two", "tag": "conflict"}',  # fails on the primary: n is an integer
            b'{"create":{"_index":"books"}}',
            b'{"n":3,"tag":"gen-\xc3\xa9"}',
            b'{"index":{"_index":"books","_id":"a/b c"}}',
            b'{"n":4}',
            b'{"update":{"_id":"a/b c"}}',
            b'{"doc":{"tag":"updated"}}',
            b'{"create":{"_id":"gone"}}',
            b'{"n":5}',
            b'{"delete":{"_id":"gone"}}',
        )
        copy, p_status, p_answer, s_status, s_answer = mirror(
            "POST", b"/books/_bulk?refresh=true", bulk
        )
        p_items = orjson.loads(p_answer)["items"]
        assert [next(iter(i.values()))["status"] for i in p_items] == [
            201,
            400,
            201,
            201,
            200,
            201,
            200,
        ]
        assert p_items[1]["create"]["error"]["type"] == "mapper_parsing_exception"
        assert (
            b'"conflict"' not in copy.body() and copy.body().count(b"\n") == bulk.count(b"\n") - 2
        )
        assert s_status == 200 and orjson.loads(s_answer)["errors"] is False, s_answer
        assert copy.divergences(p_status, p_answer, False, s_status, s_answer, False) == []
        on_a = a.documents("books")
        assert len(on_a) == 4 and on_a["a/b c"] == {"n": 4, "tag": "updated"}
        assert b.documents("books") == on_a

        # the shadow's index is stricter: it rejects what the primary takes
        assert a.request("PUT", "/tight", {"mappings": {"properties": {"n": {"type": "integer"}}}})
        strict = {"mappings": {"dynamic": "strict", "properties": {"n": {"type": "integer"}}}}
        assert b.request("PUT", "/tight", strict).get("acknowledged") is True
        bulk = ndjson(
            b'{"index":{"_index":"tight"}}',
            b'{"n":1}',
            b'{"index":{"_index":"tight"}}',
            b'{"n":2,"extra":"x"}',
            b'{"create":{"_index":"tight","_id":"k"}}',
            b'{"n":3,"extra":"y"}',
        )
        copy, p_status, p_answer, s_status, s_answer = mirror("POST", b"/_bulk?refresh=true", bulk)
        assert p_status == 200 and s_status == 200 and orjson.loads(s_answer)["errors"] is True
        second = orjson.loads(p_answer)["items"][1]["index"]["_id"]
        assert copy.divergences(p_status, p_answer, False, s_status, s_answer, False) == [
            Divergent(
                f"tight/{second}",
                "bulk_item",
                "primary 201, shadow 400 strict_dynamic_mapping_exception",
            ),
            Divergent(
                "tight/k", "bulk_item", "primary 201, shadow 400 strict_dynamic_mapping_exception"
            ),
        ]
        missing = set(a.documents("tight")) - set(b.documents("tight"))
        assert missing == {second, "k"}

        copy, p_status, p_answer, s_status, s_answer = mirror(
            "PUT", b"/tight/_doc/solo%20one", b'{"n":4,"extra":"z"}'
        )
        assert copy.divergences(p_status, p_answer, False, s_status, s_answer, False) == [
            Divergent(
                "tight/solo one",
                "status_mismatch",
                "primary 201, shadow 400 strict_dynamic_mapping_exception",
            )
        ]
