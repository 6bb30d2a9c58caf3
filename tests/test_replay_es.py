"""Replayed writes converge like shadowed ones: ids from the recorded primary answers, in order.

A recording of Elasticsearch/OpenSearch writes is made against the primary, osmem-server 0.1.1
(answers as OpenSearch 2.19), with its real answers: an index created, documents indexed with
and without ids (`POST /idx/_doc`, `_bulk` `index` actions without `_id`), updated, deleted,
and one document written five times in a row. The recording is then replayed against a new,
empty osmem-server 0.1.6 (OpenSearch 3.8) as the config's shadow (`-c FILE --shadow es-new`),
whose `order: {scope, keys: elasticsearch}` and `ids_from_primary: elasticsearch` the replay
takes: the new cluster ends with exactly the primary's documents, under the ids the recorded
primary answers name, and the write checks find no divergence.

The same recording replayed to the same kind of server without the shadow's steps (plain
`--to`) ends with other ids: the test can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recordings import REPLAY, TIMEOUT, record
from shadowlane.record import RESPONSE, iter_file
from support.opensearch import NEW, OLD, FaultyRelay, OpenSearchServer

INDEX = "replayed"
DOCS = r"^/[^_/][^/]*/(_doc|_create|_update)(/|$)"


def _req(method: str, path: str, port: int, body: Any = None, ndjson: bool = False) -> bytes:
    if body is None:
        data = b""
    elif ndjson:
        data = "".join(json.dumps(line) + "\n" for line in body).encode()
    else:
        data = json.dumps(body).encode()
    ctype = "application/x-ndjson" if ndjson else "application/json"
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: {ctype}\r\n"
    return (head + f"content-length: {len(data)}\r\n\r\n").encode() + data


def _workload(port: int) -> list[bytes]:
    i = f"/{INDEX}"
    out = [_req("PUT", i, port, {"settings": {"number_of_shards": 1}})]
    out += [_req("POST", f"{i}/_doc", port, {"kind": "id-less", "n": n}) for n in range(5)]
    out += [_req("PUT", f"{i}/_doc/fixed-{n}", port, {"kind": "fixed", "n": n}) for n in range(4)]
    bulk: list[Any] = []
    for n in range(3):
        bulk += [{"index": {}}, {"kind": "bulk-id-less", "n": n}]
    bulk += [{"index": {"_id": "bulk-1"}}, {"kind": "bulk", "n": 1}]
    bulk += [{"update": {"_id": "fixed-0"}}, {"doc": {"n": 100}}]
    bulk += [{"delete": {"_id": "fixed-1"}}]
    out.append(_req("POST", f"{i}/_bulk", port, bulk, ndjson=True))
    out.append(_req("POST", f"{i}/_update/fixed-2", port, {"doc": {"updated": True}}))
    out.append(_req("DELETE", f"{i}/_doc/fixed-3", port))
    # one document written again and again: only the last version may survive
    out += [_req("PUT", f"{i}/_doc/hot", port, {"kind": "hot", "v": v}) for v in range(5)]
    return out


def _config(old: str, new: str, store: Path) -> str:
    shadow = (
        "{backend: es-new, order: {scope: es-writes, keys: elasticsearch}, "
        "ids_from_primary: elasticsearch, host_suffix: ''}"
    )
    return (
        "backends:\n"
        f"  es-old: {{endpoints: ['{old}']}}\n"
        f"  es-new: {{endpoints: ['{new}']}}\n"
        "routes:\n"
        "  - name: es-bulk\n"
        "    match: {path_regex: '(^|/)_bulk$', methods: [POST, PUT]}\n"
        f"    backend: es-old\n    shadows: [{shadow}]\n"
        "  - name: es-docs\n"
        f"    match: {{path_regex: '{DOCS}', methods: [PUT, POST, DELETE]}}\n"
        f"    backend: es-old\n    shadows: [{shadow}]\n"
        "  - name: es-index\n"
        "    match: {path_regex: '^/[^_/][^/]*/?$', methods: [PUT, DELETE]}\n"
        f"    backend: es-old\n    shadows: [{shadow}]\n"
        "  - {name: es-read, match: {path_prefix: /}, backend: es-old}\n"
        f"compare: {{store: 'sqlite:///{store}'}}\n"  # where the write steps keep the ledger
    )


def _ids_in_answers(path: Path) -> set[str]:
    """Every `_id` the recorded primary answers name (the ids the primary chose or kept)."""
    ids: set[str] = set()
    for p in iter_file(path):
        if p.kind != RESPONSE:
            continue
        doc = json.loads(p.data.partition(b"\r\n\r\n")[2] or b"{}")
        for item in doc.get("items", []):
            for action in item.values():
                ids.add(action["_id"])
        if "_id" in doc:
            ids.add(doc["_id"])
    return ids


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """The recording, what the primary holds at its end, and the primary's URL."""
    rec = tmp_path_factory.mktemp("es") / "writes.gor"
    with OpenSearchServer(OLD) as old:
        port = int(old.url.rsplit(":", 1)[1])
        record(rec, _workload(port), port=port, spacing=0.001)
        docs = old.documents(INDEX)
    return rec, docs, old.url


def test_replayed_writes_end_with_the_primarys_documents_and_ids(
    recorded: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    rec, primary_docs, _ = recorded
    # what the recorded answers name: 5 + 3 generated ids among them
    named = _ids_in_answers(rec)
    assert len([d for d in primary_docs.values() if "id-less" in d["kind"]]) == 8
    assert set(primary_docs) <= named
    assert primary_docs["hot"] == {"kind": "hot", "v": 4}
    assert "fixed-1" not in primary_docs and "fixed-3" not in primary_docs
    with OpenSearchServer(NEW) as new:
        cfg = tmp_path / "shadowlane.yaml"
        cfg.write_text(_config("http://127.0.0.1:9", new.url, tmp_path / "s.db"))
        res = subprocess.run(
            [*REPLAY, str(rec), "-c", str(cfg), "--shadow", "es-new", "--speed", "max",
             "--concurrency", "16", "--format", "json", "--no-progress"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert res.returncode == 0, (res.stdout, res.stderr)
        doc = json.loads(res.stdout)
        shadow_docs = new.documents(INDEX)
    assert doc["sent"] == len(_workload(1)) and doc["divergences"] == {} and doc["failures"] == 0
    assert doc["target"] == "es-new" and doc["skipped"] == {}
    assert shadow_docs == primary_docs


def test_without_the_shadows_steps_the_ids_differ(
    recorded: tuple[Path, dict[str, Any], str],
) -> None:
    rec, primary_docs, _ = recorded
    with OpenSearchServer(NEW) as new:
        res = subprocess.run(
            [*REPLAY, str(rec), "--to", new.url, "--speed", "max", "--concurrency", "1",
             "--format", "json", "--no-progress"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert res.returncode == 0, (res.stdout, res.stderr)
        shadow_docs = new.documents(INDEX)
    assert len(shadow_docs) == len(primary_docs)
    generated = {k for k, v in primary_docs.items() if "id-less" in v["kind"]}
    assert not generated & set(shadow_docs), "the new cluster chose the primary's ids by itself?"


def test_a_write_the_target_refuses_is_a_divergence_and_fails_the_replay(tmp_path: Path) -> None:
    rec = tmp_path / "writes.gor"
    with OpenSearchServer(OLD) as old:
        port = int(old.url.rsplit(":", 1)[1])
        writes = [
            _req("PUT", f"/{INDEX}/_doc/good", port, {"note": "fine"}),
            _req("PUT", f"/{INDEX}/_doc/bad", port, {"note": "REJECT"}),
            _req("POST", f"/{INDEX}/_doc", port, {"note": "fine too"}),
        ]
        record(rec, writes, port=port, spacing=0.001)
    with OpenSearchServer(NEW) as new, FaultyRelay(new.url) as relay:
        cfg = tmp_path / "shadowlane.yaml"
        cfg.write_text(_config("http://127.0.0.1:9", relay.url, tmp_path / "ledger.db"))
        res = subprocess.run(
            [*REPLAY, str(rec), "-c", str(cfg), "--shadow", "es-new", "--speed", "max",
             "--format", "json", "--no-progress"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        shadow_docs = new.documents(INDEX)
    assert res.returncode == 1, (res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert doc["divergences"] == {"status_mismatch": 1} and doc["failures"] == 1
    (example,) = doc["examples"]
    assert example["uri"] == f"/{INDEX}/_doc/bad" and example["why"].startswith("divergence")
    assert relay.rejected == 1 and set(shadow_docs) >= {"good"} and "bad" not in shadow_docs
    # the divergence is in the config's store, as a live copy's would be: report shows it
    rep = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "-c", str(cfg), "--format", "json"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    (entry,) = json.loads(rep.stdout)["ledger"]["targets"]
    assert (entry["route"], entry["target"], entry["open"]) == ("es-docs", "es-new", 1)
    assert entry["reasons"] == {"status_mismatch": 1}
    assert entry["suspect_keys"] == [f"{INDEX}/bad"]


def test_with_a_live_primary_the_ids_come_from_its_answers(
    recorded: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    """`--primary URL`: each write goes to the primary first and the copy is built from its
    answer, as live shadowing does; both fresh clusters end equal, with ids neither recorded.
    One at a time: concurrent writes of one document would race on the live primary, whose
    answers need not come back in the order it applied them (docs/replay.md, section 7)."""
    rec, recorded_docs, _ = recorded
    with OpenSearchServer(OLD) as primary, OpenSearchServer(NEW) as new:
        cfg = tmp_path / "shadowlane.yaml"
        cfg.write_text(_config("http://127.0.0.1:9", new.url, tmp_path / "s.db"))
        res = subprocess.run(
            [*REPLAY, str(rec), "-c", str(cfg), "--shadow", "es-new", "--primary", primary.url,
             "--speed", "max", "--concurrency", "1", "--format", "json", "--no-progress",
             "--max-failures", "100%"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert res.returncode == 0, (res.stdout, res.stderr)
        doc = json.loads(res.stdout)
        live_docs, shadow_docs = primary.documents(INDEX), new.documents(INDEX)
    assert doc["divergences"] == {} and doc["primary"]["sent"] == doc["sent"]
    assert shadow_docs == live_docs and len(live_docs) == len(recorded_docs)
    generated = {k for k, v in live_docs.items() if "id-less" in v["kind"]}
    assert len(generated) == 8 and not generated & set(recorded_docs)
