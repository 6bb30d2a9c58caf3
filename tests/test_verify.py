"""`shadowlane verify` against two real OpenSearch-compatible servers (osmem-server).

The primary runs the old version (answers as OpenSearch 2.19) and the shadow the new one (3.8),
the shape of a migration; the main scenarios also run the other way round, so that neither
version's answers are only ever read on one side. The command runs as a subprocess
(`python -m shadowlane verify`), as a user runs it: its exit status, stdout and stderr are
what is judged. The suspect-key walk runs both from a real store (SQLite, seeded the way the
comparator writes the ledger) and in process with a small ledger of the test's own, whose
entries are easier to shape.

Each test writes its own indices (a fresh prefix) on the module's two servers and names them
with `--index`, so tests do not see each other's documents.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowlane.verify import Doc, VerifyError, VerifyOptions, parse_labels, verify
from shadowlane.verify.run import OrderBroken, ascending
from shadowlane.verify.suspects import matches
from support.backend import HungServer, Recorded, RecordingBackend, Reply, dead_port
from support.opensearch import NEW, OLD, OpenSearchServer

TIMEOUT = 60.0
_names = itertools.count()


def run_verify(
    primary: str, shadow: str, *args: str, stderr: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shadowlane",
            "verify",
            "--kind",
            "elasticsearch",
            "--primary",
            primary,
            "--shadow",
            shadow,
            "--timeout",
            "10s",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=TIMEOUT,
    )


def verify_json(
    primary: OpenSearchServer, shadow: OpenSearchServer, *args: str
) -> tuple[int, dict[str, Any], str]:
    res = run_verify(primary.url, shadow.url, "--format", "json", *args)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode in (0, 1), (res.returncode, res.stdout, res.stderr)
    return res.returncode, json.loads(res.stdout), res.stderr


def seed(server: OpenSearchServer, index: str, docs: dict[str, Any]) -> None:
    """Index `docs` (`id -> source`) in batches, refreshed."""
    items = list(docs.items())
    for start in range(0, len(items), 500):
        lines: list[Any] = []
        for doc_id, source in items[start : start + 500]:
            lines += [{"index": {"_index": index, "_id": doc_id}}, source]
        answer = server.request("POST", "/_bulk?refresh=true", lines, ndjson=True)
        assert answer.get("errors") is False, answer


def delete(server: OpenSearchServer, index: str, *ids: str) -> None:
    lines = [{"delete": {"_index": index, "_id": i}} for i in ids]
    answer = server.request("POST", "/_bulk?refresh=true", lines, ndjson=True)
    assert answer.get("errors") is False, answer


def docs(n: int, **extra: Any) -> dict[str, Any]:
    return {
        f"{i:05d}": {"n": i, "name": f"doc {i}", "tags": ["a", "b"], "meta": {"v": 1}, **extra}
        for i in range(n)
    }


@pytest.fixture(scope="module", params=[(OLD, NEW), (NEW, OLD)], ids=["old-new", "new-old"])
def clusters(request: pytest.FixtureRequest) -> Iterator[tuple[OpenSearchServer, OpenSearchServer]]:
    primary_version, shadow_version = request.param
    with OpenSearchServer(primary_version) as primary, OpenSearchServer(shadow_version) as shadow:
        yield primary, shadow


@pytest.fixture
def prefix() -> str:
    """A fresh index name prefix for one test."""
    return f"t{next(_names)}-"


@pytest.fixture
def old_new() -> Iterator[tuple[OpenSearchServer, OpenSearchServer]]:
    """A pair of servers for this test alone (for tests that read every index)."""
    with OpenSearchServer(OLD) as primary, OpenSearchServer(NEW) as shadow:
        yield primary, shadow


# ---------------------------------------------------------------------------------------------
# comparing


def test_equal_clusters_exit_0(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    for server in clusters:
        seed(server, prefix + "orders", docs(30))
        seed(server, prefix + "users", {"u1": {"name": "ann", "roles": []}, "u2": {"x": None}})
    code, out, err = verify_json(primary, shadow, "--index", prefix + "*")
    assert code == 0, out
    assert err == ""
    assert out["equal"] is True
    assert (out["compared"], out["equal_docs"]) == (32, 32)
    assert (out["only_in_primary"], out["only_in_shadow"], out["differing"]) == (0, 0, 0)
    assert out["examples"] == []
    assert set(out["indices"]) == {prefix + "orders", prefix + "users"}
    assert out["indices"][prefix + "orders"]["strategy"] == "merge"

    res = run_verify(primary.url, shadow.url, "--index", prefix + "*")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert prefix + "orders" in res.stdout and "EQUAL: 32 document(s) compared" in res.stdout


@pytest.mark.parametrize("strategy", ["merge", "lookup"])
def test_differences_are_counted_and_named(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str, strategy: str
) -> None:
    primary, shadow = clusters
    orders = prefix + "orders"
    for server in clusters:
        seed(server, orders, docs(20))
    seed(primary, orders, {"00007": {"n": 7, "name": "renamed", "tags": ["a"], "meta": {"v": 1}}})
    seed(primary, orders, {"p-only": {"n": -1}})
    seed(shadow, orders, {"s-only": {"n": -2}})
    seed(primary, prefix + "primary-side", {"a": {"x": 1}, "b": {"x": 2}})
    seed(shadow, prefix + "shadow-side", {"c": {"x": 3}})

    code, out, _ = verify_json(primary, shadow, "--index", prefix + "*", "--strategy", strategy)
    assert code == 1
    assert out["equal"] is False
    assert out["compared"] == 22 + 2 + 1
    assert (out["only_in_primary"], out["only_in_shadow"], out["differing"]) == (3, 2, 1)
    idx = out["indices"]
    assert idx[orders] == {
        "equal": False,
        "on": "both",
        "strategy": strategy,
        "compared": 22,
        "equal_docs": 19,
        "only_in_primary": 1,
        "only_in_shadow": 1,
        "differing": 1,
    }
    assert idx[prefix + "primary-side"]["on"] == "primary"
    assert idx[prefix + "primary-side"]["only_in_primary"] == 2
    assert idx[prefix + "shadow-side"]["on"] == "shadow"
    assert idx[prefix + "shadow-side"]["only_in_shadow"] == 1
    by_id = {(e["index"], e["id"]): e for e in out["examples"]}
    differing = by_id[(orders, "00007")]
    assert differing["kind"] == "differing"
    assert differing["fields"] == ["name", "tags[1]"]
    assert differing["values"] == {"name": ["renamed", "doc 7"], "tags[1]": [None, "b"]}
    assert by_id[(orders, "p-only")]["kind"] == "only_in_primary"
    assert by_id[(orders, "s-only")]["kind"] == "only_in_shadow"
    assert by_id[(prefix + "shadow-side", "c")]["kind"] == "only_in_shadow"

    res = run_verify(primary.url, shadow.url, "--index", prefix + "*", "--strategy", strategy)
    assert res.returncode == 1
    assert f"{orders}/00007: differs at name" in res.stdout
    assert f"{orders}/p-only: only in primary" in res.stdout
    assert "DIFFERENT: 6 of 25 document(s)" in res.stdout


def test_ignore_leaves_fields_out(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    index = prefix + "events"
    seed(primary, index, {"1": {"a": 1, "updated_at": "mon", "meta": {"ts": 1, "k": "x"}}})
    seed(shadow, index, {"1": {"a": 1, "updated_at": "tue", "meta": {"ts": 2, "k": "x"}}})
    code, out, _ = verify_json(primary, shadow, "--index", index)
    assert code == 1
    assert out["examples"][0]["fields"] == ["meta.ts", "updated_at"]
    code, out, _ = verify_json(
        primary, shadow, "--index", index, "--ignore", "updated_at", "--ignore", "**.ts"
    )
    assert code == 0, out
    assert out["equal_docs"] == 1
    # a path as written from the hit's root is the same path
    code, out, _ = verify_json(primary, shadow, "--index", index, "--ignore", "_source.updated_at")
    assert code == 1 and out["examples"][0]["fields"] == ["meta.ts"]


def test_numbers_and_key_order_are_compared_as_json(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    index = prefix + "json"
    seed(primary, index, {"1": {"a": 1, "b": {"x": 1, "y": 2}}, "2": {"flag": True}})
    seed(shadow, index, {"1": {"b": {"y": 2, "x": 1.0}, "a": 1.0}, "2": {"flag": 1}})
    code, out, _ = verify_json(primary, shadow, "--index", index)
    assert code == 1
    assert out["equal_docs"] == 1 and out["differing"] == 1
    assert out["examples"][0]["id"] == "2" and out["examples"][0]["fields"] == ["flag"]


@pytest.mark.parametrize("strategy", ["merge", "lookup"])
def test_more_documents_than_one_page(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str, strategy: str
) -> None:
    primary, shadow = clusters
    index = prefix + "big"
    all_docs = docs(1200)
    for server in clusters:
        seed(server, index, all_docs)
    # one difference of each kind, in different pages (ids sort as their number)
    seed(shadow, index, {"00150": {**all_docs["00150"], "n": -150}})
    delete(shadow, index, "00640")
    seed(shadow, index, {"01199x": {"n": 0}})
    delete(primary, index, "00999")
    code, out, _ = verify_json(
        primary, shadow, "--index", index, "--batch", "100", "--strategy", strategy
    )
    assert code == 1
    assert out["compared"] == 1201
    assert (out["only_in_primary"], out["only_in_shadow"], out["differing"]) == (1, 2, 1)
    found = {(e["id"], e["kind"]) for e in out["examples"]}
    assert found == {
        ("00150", "differing"),
        ("00640", "only_in_primary"),
        ("00999", "only_in_shadow"),
        ("01199x", "only_in_shadow"),
    }
    assert out["indices"][index]["strategy"] == strategy


def test_examples_are_capped(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    index = prefix + "many"
    seed(primary, index, docs(12))
    code, out, _ = verify_json(primary, shadow, "--index", index, "--examples", "3")
    assert code == 1 and out["only_in_primary"] == 12
    assert len(out["examples"]) == 3


def test_default_selection_skips_dot_indices_and_patterns_exclude(
    old_new: tuple[OpenSearchServer, OpenSearchServer],
) -> None:
    primary, shadow = old_new
    for server in old_new:
        seed(server, "orders", docs(3))
        seed(server, "logs-2024", docs(2))
    seed(primary, ".internal", {"x": {"only": "primary"}})
    seed(primary, "logs-old", {"x": {"only": "primary"}})
    code, out, _ = verify_json(primary, shadow, "--index", "*", "--index=-logs-old")
    assert code == 0, out
    assert set(out["indices"]) == {"orders", "logs-2024"}
    code, out, _ = verify_json(primary, shadow, "--index", "orders,logs-*,-logs-old")
    assert code == 0, out
    assert set(out["indices"]) == {"orders", "logs-2024"}
    code, out, _ = verify_json(primary, shadow)
    assert code == 1
    assert set(out["indices"]) == {"orders", "logs-2024", "logs-old"}
    code, out, _ = verify_json(primary, shadow, "--index", ".internal")
    assert code == 1 and out["only_in_primary"] == 1


# ---------------------------------------------------------------------------------------------
# repairing


def test_repair_heals_and_a_second_verify_is_equal(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    index = prefix + "heal"
    base = docs(250)
    for server in clusters:
        seed(server, index, base)
    seed(shadow, index, {"00003": {"n": 3, "stale": True}, "00200": {"n": 200}})
    delete(shadow, index, "00100", "00101")
    seed(shadow, index, {"zombie": {"n": -1}})

    code, out, err = verify_json(primary, shadow, "--index", index, "--repair", "--batch", "2")
    assert code == 0, (out, err)
    assert out["equal"] is True
    # what was found is still said
    assert (out["differing"], out["only_in_primary"], out["only_in_shadow"]) == (2, 2, 1)
    assert out["repaired"] == {
        "indexed": 4,
        "deleted": 1,
        "failed": 0,
        "skipped": 0,
        "still_differing": 0,
        "remaining": 0,
    }
    assert all(e["repaired"] is True for e in out["examples"])
    assert shadow.documents(index) == primary.documents(index)

    code, out, _ = verify_json(primary, shadow, "--index", index)
    assert code == 0, out
    assert out["equal_docs"] == 250

    res = run_verify(primary.url, shadow.url, "--index", index, "--repair")
    assert res.returncode == 0
    assert "repaired: 0 written, 0 deleted" in res.stdout


def test_repair_does_not_create_an_index_the_shadow_lacks(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    index = prefix + "nowhere"
    seed(primary, index, docs(3))
    code, out, err = verify_json(primary, shadow, "--index", index, "--repair")
    assert code == 1
    assert out["repaired"]["skipped"] == 3 and out["repaired"]["remaining"] == 3
    assert "does not create indices" in err
    assert out["warnings"] and "does not create indices" in out["warnings"][0]
    assert shadow.request("GET", f"/{index}/_count").get("status") == 404


def test_a_switch_of_strategy_mid_index_keeps_the_repairs_counted(
    clusters: tuple[OpenSearchServer, OpenSearchServer],
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The merge finds the order broken after repairs were made (injected here: osmem sorts
    `_id` as Python does); the index starts again by lookup, and the counts come out as a
    clean run's would, the early repairs included."""
    from shadowlane.verify import run as run_module

    primary, shadow = clusters
    index = prefix + "switch"
    for server in clusters:
        seed(server, index, docs(10))
    seed(shadow, index, {"00001": {"n": 1, "name": "stale"}, "00008": {"n": 8, "name": "stale"}})
    delete(shadow, index, "00002")
    seed(shadow, index, {"00003x": {"n": -3}})
    real = run_module.ascending

    def breaking(stream: Iterable[Doc], side: str) -> Iterator[Doc]:
        def gen() -> Iterator[Doc]:
            for i, doc in enumerate(real(stream, side)):
                if side == "primary" and i == 5:
                    raise OrderBroken("injected")
                yield doc

        return gen()

    monkeypatch.setattr(run_module, "ascending", breaking)
    options = VerifyOptions(
        primary=primary.url, shadow=shadow.url, indices=(index,), batch=1, repair=True
    )
    warnings: list[str] = []
    result = verify(options, warn=warnings.append)
    [found] = result.indices
    assert found.strategy == "lookup"
    assert any("injected" in w for w in warnings)
    assert (found.compared, found.equal_docs) == (11, 7)
    assert (found.differing, found.only_in_primary, found.only_in_shadow) == (2, 1, 1)
    assert found.repair is not None
    assert (found.repair.indexed, found.repair.deleted, found.repair.remaining) == (3, 1, 0)
    assert result.equal
    assert sorted(e.id for e in result.examples) == ["00001", "00002", "00003x", "00008"]
    assert shadow.documents(index) == primary.documents(index)

    with pytest.raises(VerifyError, match="use --strategy lookup"):
        verify(dataclasses.replace(options, repair=False, strategy="merge"))


# ---------------------------------------------------------------------------------------------
# could not run


def assert_exit_2(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_unreachable_shadow_exits_2_naming_it(
    clusters: tuple[OpenSearchServer, OpenSearchServer],
) -> None:
    primary, _ = clusters
    url = f"http://127.0.0.1:{dead_port()}"
    line = assert_exit_2(run_verify(primary.url, url))
    assert line.startswith(f"shadowlane verify: shadow {url}: GET /_cat/indices")
    assert "cannot connect" in line


def test_http_error_exits_2_naming_the_request(
    clusters: tuple[OpenSearchServer, OpenSearchServer],
) -> None:
    primary, shadow = clusters
    line = assert_exit_2(run_verify(primary.url, shadow.url + "/not-a-cluster"))
    assert "shadow" in line and "/not-a-cluster/_cat/indices" in line and "answered 4" in line


def test_a_cluster_that_never_answers_is_cut_at_the_timeout() -> None:
    with HungServer() as hung:
        res = run_verify(hung.url, hung.url, "--timeout", "300ms")
    line = assert_exit_2(res)
    assert line.startswith(f"shadowlane verify: primary {hung.url}:") and "within 0.3s" in line


def test_headers_and_url_credentials_reach_both_clusters(
    backends: Callable[..., RecordingBackend],
) -> None:
    def no_indices(req: Recorded) -> Reply:
        if req.path == "/_cat/indices":
            return Reply(headers=[("Content-Type", "application/json")], body=b"[]")
        return Reply(status=404)

    primary, shadow = backends(no_indices), backends(no_indices)
    res = run_verify(
        f"http://ann:p%40ss@127.0.0.1:{primary.port}",
        shadow.url,
        "--header",
        "X-Api-Key: k1",
        "--header",
        "X-Tenant:acme",
    )
    assert res.returncode == 0, res.stderr
    assert "EQUAL: 0 document(s) compared" in res.stdout
    for backend in (primary, shadow):
        [req] = backend.requests
        assert req.header("x-api-key") == "k1" and req.header("x-tenant") == "acme"
    assert primary.requests[0].header("authorization") == "Basic YW5uOnBAc3M="
    assert shadow.requests[0].header("authorization") is None


def test_no_matching_index_exits_2(
    clusters: tuple[OpenSearchServer, OpenSearchServer],
) -> None:
    primary, shadow = clusters
    line = assert_exit_2(run_verify(primary.url, shadow.url, "--index", "no-such-index-*"))
    assert "no open index matches --index no-such-index-*" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--batch", "0"], "--batch 0: must be 1..10000"),
        (["--ignore", "a..b"], "--ignore 'a..b'"),
        (["--route", "r"], "need --suspects"),
        (["--suspects"], "give -c FILE or --store URL"),
        (["--suspects", "--store", "mysql://x"], "cannot open store"),
    ],
)
def test_bad_arguments_exit_2(
    clusters: tuple[OpenSearchServer, OpenSearchServer], args: list[str], says: str
) -> None:
    primary, shadow = clusters
    line = assert_exit_2(run_verify(primary.url, shadow.url, *args))
    assert says in line, line


@pytest.mark.parametrize(
    "args", [["--header", "no colon"], ["--timeout", "soon"], ["--strategy", "fast"]]
)
def test_malformed_options_are_argparse_errors(args: list[str]) -> None:
    res = run_verify("http://127.0.0.1:9", "http://127.0.0.1:9", *args)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# progress


def test_progress_only_on_a_terminal(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    index = prefix + "progress"
    for server in clusters:
        seed(server, index, docs(50))
    res = run_verify(primary.url, shadow.url, "--index", index)
    assert res.returncode == 0 and res.stderr == ""

    master, slave = pty.openpty()
    try:
        res = run_verify(primary.url, shadow.url, "--index", index, "--batch", "10", stderr=slave)
        os.close(slave)
        slave = -1
        seen = b""
        while select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end is closed: everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert res.returncode == 0
    assert b"verify: " in seen and b"/100 docs" in seen and b"docs/s" in seen
    assert "docs/s" not in res.stdout


# ---------------------------------------------------------------------------------------------
# suspects


class MemoryLedger:
    """The ledger's two calls over a list of (route, target, scope, keys) entries: what
    `Store.suspect_keys/resolve_keys` promise, kept in memory."""

    def __init__(self, entries: Iterable[tuple[str, str, str, list[str]]]) -> None:
        self.entries = [(r, t, s, list(k), set()) for r, t, s, k in entries]

    def _select(self, route: str | None, target: str | None, scope: str | None) -> list[Any]:
        return [
            e
            for e in self.entries
            if (route is None or e[0] == route)
            and (target is None or e[1] == target)
            and (scope is None or e[2] == scope)
        ]

    def suspect_keys(
        self, route: str | None = None, target: str | None = None, scope: str | None = None
    ) -> list[str]:
        out: dict[str, None] = {}
        for _r, _t, _s, keys, done in self._select(route, target, scope):
            out.update((k, None) for k in keys if k not in done)
        return list(out)

    def resolve_keys(
        self,
        keys: Iterable[str],
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
    ) -> int:
        wanted = set(keys)
        closed = 0
        for entry in self._select(route, target, scope):
            before = set(entry[3]) <= entry[4]
            entry[4].update(wanted & set(entry[3]))
            closed += int(not before and set(entry[3]) <= entry[4])
        return closed


def test_suspects_verify_only_the_ledger_keys_and_repair_resolves_them(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    orders, users = prefix + "orders", prefix + "users"
    for server in clusters:
        seed(server, orders, docs(10))
        seed(server, users, {"u1": {"a": 1}, "u2": {"a": 2}})
    seed(shadow, orders, {"00001": {"n": 1, "name": "wrong"}})  # a suspect that differs
    seed(primary, orders, {"00009": {"n": 9, "name": "also wrong"}})  # unsuspected difference
    seed(shadow, users, {"u3": {"a": 3}})  # only in shadow, in a wholly suspect index
    ledger = MemoryLedger(
        [
            ("es", "es8", "writes", [f"{orders}/00001", f"{orders}/00002"]),
            ("es", "es8", "writes", [users]),
            ("es", "es8", "writes", [f"{orders}/gone"]),  # deleted on both: they agree
            ("es", "es8", "writes", ["/accounts/9", "Not An Index"]),
            ("other", "x", "s", [f"{orders}/00003"]),
        ]
    )
    options = VerifyOptions(
        primary=primary.url, shadow=shadow.url, suspects=True, route="es", target="es8"
    )
    warnings: list[str] = []
    result = verify(options, ledger=ledger, warn=warnings.append)
    assert not result.equal
    by_name = {i.name: i for i in result.indices}
    assert by_name[orders].strategy == "ids"
    assert (by_name[orders].compared, by_name[orders].differing) == (3, 1)
    assert by_name[users].only_in_shadow == 1 and by_name[users].compared == 3
    assert result.suspects is not None
    assert result.suspects.ignored == ["/accounts/9", "Not An Index"]
    assert any("not Elasticsearch keys" in w for w in warnings)
    # without --repair nothing is written, the ledger included
    assert ledger.suspect_keys(route="es") != []
    assert result.suspects.resolved_labels == 0

    repaired = verify(
        VerifyOptions(
            primary=primary.url,
            shadow=shadow.url,
            suspects=True,
            repair=True,
            route="es",
            target="es8",
        ),
        ledger=ledger,
    )
    assert repaired.equal
    assert repaired.repair is not None
    assert (repaired.repair.indexed, repaired.repair.deleted) == (1, 1)
    assert repaired.suspects is not None and repaired.suspects.resolved_entries == 3
    # what is left: the labels that are not ES keys, and the other route's entry
    assert ledger.suspect_keys(route="es") == ["/accounts/9", "Not An Index"]
    assert ledger.suspect_keys() == ["/accounts/9", "Not An Index", f"{orders}/00003"]
    # the unsuspected difference is still there: suspects mode read only what it was told
    assert primary.documents(orders)["00009"] != shadow.documents(orders)["00009"]


def test_suspects_scope_label_walks_every_selected_index(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str
) -> None:
    primary, shadow = clusters
    for server in clusters:
        seed(server, prefix + "a", docs(5))
        seed(server, prefix + "b", docs(5))
    delete(shadow, prefix + "b", "00004")
    ledger = MemoryLedger([("r", "t", "s", ["*"])])
    options = VerifyOptions(
        primary=primary.url, shadow=shadow.url, indices=(prefix + "*",), suspects=True
    )
    result = verify(options, ledger=ledger)
    assert {i.name: i.strategy for i in result.indices} == {
        prefix + "a": "merge",
        prefix + "b": "merge",
    }
    assert result.total("only_in_primary") == 1
    result = verify(
        VerifyOptions(
            primary=primary.url,
            shadow=shadow.url,
            indices=(prefix + "*",),
            suspects=True,
            repair=True,
        ),
        ledger=ledger,
    )
    assert result.equal and ledger.suspect_keys() == []


def test_suspects_need_a_ledger() -> None:
    with pytest.raises(VerifyError, match="needs the store"):
        verify(VerifyOptions(primary="http://127.0.0.1:9", shadow="http://x:9", suspects=True))


def test_suspects_from_the_store(
    clusters: tuple[OpenSearchServer, OpenSearchServer], prefix: str, tmp_path: Path
) -> None:
    """The CLI reads the ledger the proxy wrote into the comparison store (SQLite file)."""
    from shadowlane.store import open_store
    from shadowlane.store.ledger import Divergence

    primary, shadow = clusters
    index = prefix + "ledger"
    for server in clusters:
        seed(server, index, docs(4))
    seed(shadow, index, {"00002": {"n": 2, "name": "wrong"}})
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    try:
        record = Divergence(
            ts=1.0,
            route="es-bulk",
            target="es8",
            scope="es-writes",
            reason="status",
            keys=(f"{index}/00002", f"{index}/00003"),
            request_id="r1",
            method="POST",
            uri="/_bulk",
        )
        _write_divergences(store, [record])
        assert store.suspect_keys() == [f"{index}/00002", f"{index}/00003"]
    finally:
        store.close()

    code, out, _ = verify_json(primary, shadow, "--suspects", "--store", url)
    assert code == 1
    assert out["compared"] == 2 and out["differing"] == 1
    # the same store named by a config's compare.store
    config = tmp_path / "shadowlane.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        "backends: {es7: {endpoints: [http://127.0.0.1:9200]}}\n"
        "routes: [{name: es, match: {path_prefix: /}, backend: es7}]\n"
        f"compare: {{store: '{url}'}}\n"
    )
    code, out, _ = verify_json(primary, shadow, "--suspects", "-c", str(config))
    assert code == 1 and out["suspects"]["labels"] == 2
    code, out, _ = verify_json(primary, shadow, "--suspects", "--store", url, "--repair")
    assert code == 0, out
    assert out["suspects"]["resolved_entries"] == 1
    store = open_store(url)
    try:
        assert store.suspect_keys() == []
    finally:
        store.close()
    res = run_verify(primary.url, shadow.url, "--suspects", "--store", url)
    assert res.returncode == 0 and "no index to compare" in res.stdout


def _write_divergences(store: Any, records: list[Any]) -> None:
    """Seed the ledger the way the proxy's comparator does: records riding on a batch."""
    from shadowlane.store import Batch

    batch = Batch()
    batch.divergences.extend(records)
    store.write(batch)


# ---------------------------------------------------------------------------------------------
# pure parts


def test_ledger_labels_split_at_the_first_slash() -> None:
    s = parse_labels(["orders/a/b", "orders/1", "users", "*", "/accounts/9", "Bad", "x/", "_x"])
    assert s.scope
    assert s.indices == {"users"}
    assert s.ids == {"orders": {"a/b", "1"}}
    assert s.ignored == ["/accounts/9", "Bad", "x/", "_x"]
    s = parse_labels(["orders/1", "orders", ".kibana/1", "logs/2"], ["orders", "logs*"])
    assert s.indices == {"orders"} and s.ids == {"logs": {"2"}}
    assert s.unselected == [".kibana/1"]


def test_index_patterns() -> None:
    assert matches("orders", [])
    assert not matches(".kibana", [])
    assert matches(".kibana", [".k*"])
    assert not matches("logs-old", ["logs-*", "-logs-old"])
    assert matches("logs-new", ["logs-*", "-logs-old"])
    assert not matches("orders", ["logs-*"])


def test_merge_refuses_an_order_it_cannot_merge_by() -> None:
    assert [d.id for d in ascending([Doc("1"), Doc("10"), Doc("2")], "primary")] == [
        "1",
        "10",
        "2",
    ]
    with pytest.raises(OrderBroken, match="primary sorts _id '2' before '10'"):
        list(ascending([Doc("1"), Doc("2"), Doc("10")], "primary"))
    with pytest.raises(OrderBroken, match="two routings"):
        list(ascending([Doc("a"), Doc("a")], "shadow"))
