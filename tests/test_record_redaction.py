"""Redaction end to end: a masked header and a masked JSON field never reach the recording
files nor the comparison store's examples, while comparisons of the masked field still count
equal values as equal.

The proxy runs as a subprocess with a recorded, compared route. Both backends echo the secret
they were sent (in a header and in the JSON body); on `/diff` the shadow also changes a field
that is not secret, so an example pair is stored. The files are searched as raw bytes after
gunzip; the store is read with the store's own reader after the proxy has exited.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from shadowlane.record import KEY_FILE, iter_file, recording_files
from shadowlane.store import open_store
from support.backend import Recorded, Reply
from support.configs import backend_entry
from support.metrics import scrape
from support.proxy import ProxyProcess
from support.wait import wait_until

SECRET = "hunter2-correct-horse"
TOKEN = "tok-0f9e8d7c"


def answer(version: int) -> Any:
    def handler(req: Recorded) -> Reply:
        doc = json.loads(req.body or b"{}")
        out = {"password": doc.get("password"), "user": doc.get("user"), "v": 1}
        if req.path == "/diff" and version == 2:
            out["v"] = 2  # a difference that is not secret: an example is stored
        if req.path == "/secret-differs" and version == 2:
            out["password"] = SECRET + "-other"
        headers = [("content-type", "application/json"),
                   ("x-api-key", req.header("x-api-key") or "")]  # fmt: skip
        return Reply(200, headers, json.dumps(out).encode())

    return handler


def comparisons(proxy: ProxyProcess) -> dict[str, float]:
    return scrape(proxy).by("result", "shadowlane_comparisons_total", route="r1", target="s")


def test_masked_fields_never_reach_files_or_store(
    backends: Any, proxy_factory: Any, tmp_path: Path
) -> None:
    primary, shadow = backends(answer(1)), backends(answer(2))
    store = tmp_path / "cmp.db"
    rec_dir = tmp_path / "rec"
    cfg = {
        "backends": {"p": backend_entry(primary.url), "s": backend_entry(shadow.url)},
        "routes": [
            {
                "name": "r1",
                "match": {"path_prefix": "/"},
                "backend": "p",
                "record": {
                    "dir": str(rec_dir),
                    "answers": True,
                    "gzip": True,  # the secrets must not be in the compressed bytes either
                    "redact": {"headers": ["x-api-key"], "json": ["body.password"],
                               "query": ["token"]},
                },
                "shadows": [{"backend": "s", "percent": 100, "compare": True}],
            }
        ],
        "compare": {"store": f"sqlite:///{store}", "flush_interval": "100ms"},
    }  # fmt: skip
    proxy = proxy_factory(cfg)
    import requests

    body = json.dumps({"password": SECRET, "user": "bob"})
    headers = {"x-api-key": SECRET, "content-type": "application/json"}
    paths = ["/same", "/same", "/diff", "/secret-differs"]
    for path in paths:
        r = requests.post(f"{proxy.url}{path}?token={TOKEN}&page=1", data=body, headers=headers,
                          timeout=5)  # fmt: skip
        assert r.status_code == 200 and SECRET in r.text  # the client's answer is untouched
    counts = wait_until(
        lambda: (c := comparisons(proxy)) and sum(c.values()) >= len(paths) and c,
        10,
        "4 comparisons",
    )
    # the same secret on both sides is equal: /same matches; /diff differs on body.v only
    assert counts.get("match") == 2 and counts.get("diff") == 2, counts
    assert proxy.stop() == 0

    # 1. the recording files: not a byte of the secrets, after gunzip
    names = recording_files([str(rec_dir)])
    assert names
    raw = b"".join(gzip.decompress(Path(n).read_bytes()) for n in names)
    assert raw.count(b"POST /") == len(paths)  # the requests are there ...
    for secret in (SECRET, TOKEN):
        assert secret.encode() not in raw, f"{secret} reached the recording"
    assert b"x-api-key" not in raw
    # ... masked the same way each time (equal values stay equal)
    masks = {json.loads(p.data.partition(b"\r\n\r\n")[2])["password"]
             for n in names for p in iter_file(n) if p.kind == 1}  # fmt: skip
    assert len(masks) == 1 and next(iter(masks)).startswith("~h:")
    assert (rec_dir / KEY_FILE).exists() and oct(os.stat(rec_dir / KEY_FILE).st_mode)[-3:] == "600"

    # 2. the store's examples: the diffs were stored, without the secrets
    st = open_store(f"sqlite:///{store}")
    try:
        examples = st.examples("r1", "s", limit=20)
    finally:
        st.close()
    assert len(examples) == 2, examples
    dumped = json.dumps(examples)
    for secret in (SECRET, TOKEN):
        assert secret not in dumped, f"{secret} reached the store"
    assert "x-api-key" not in dumped
    by_uri = {e["uri"].split("?")[0]: e for e in examples}
    assert by_uri["/diff"]["differing"] == ["body.v"]  # the equal secrets did not differ
    assert by_uri["/secret-differs"]["differing"] == ["body.password"]
    a, b = by_uri["/secret-differs"]["candidate"]["values"]["body.password"]
    assert a.startswith("~h:") and b.startswith("~h:") and a != b  # shown masked, still unequal
