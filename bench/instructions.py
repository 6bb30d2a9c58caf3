"""Instructions per proxied request, counted by callgrind: the before/after check of a change.

Req/s on this shared 2-core machine moves by ±20% between runs; instruction counts do not (the
same build, inputs and environment give the same count whatever else the machine does). So a
change to the per-request path is measured here, with the Python of each build:

    python bench/instructions.py --python /path/to/before/venv/bin/python \\
                                 --python /path/to/after/venv/bin/python

Each (python, scenario) starts the proxy under `valgrind --tool=callgrind` in front of the bench's
nginx backends, warms it up, zeroes the counters (`callgrind_control -z`), sends exactly N
requests with h2load (HTTP/1.1, 10 clients; the `h2-*` and `grpc-unary` scenarios speak HTTP/2
with prior knowledge, 10 connections x 10 streams, as the bench's rows of the same names do),
dumps the counters (`callgrind_control -d`) and divides. The shadow copies of those requests
are in the count: the primary answers before its copies end, so the run waits until the shadows
have answered them all before dumping.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import GRPC_MESSAGE, GRPC_PATH
from procs import Supervisor, port_of
from servers import ORDERED, shadowlane_conf, start_backends

BENCH = Path(__file__).resolve().parent
SCENARIOS: dict[str, tuple[str, ...]] = {
    "no-shadow": (),
    "shadow-fast": ("fast",),
    "compare-identical": ("fast",),
    "writes-ordered": (ORDERED,),
    "record-100": (),
    "record-100-gzip": (),
    "h2-no-shadow": (),
    "h2-shadow-fast": ("fast",),
    "grpc-unary": (),
    "shadow-json": ("json-diff",),
    "compare-json-diff": ("json-diff",),
}
#: scenarios whose primary is the JSON backend (the bench's compare-json rows), and the scenarios
#: that compare: `compare-identical` (the bench's "compare: true" row, identical answers decided
#: on the loop) and `compare-json-diff` (every answer differs: the comparator's queue is full,
#: most comparisons are dropped, which is what the row measures the cost of)
JSON_PRIMARY = {"shadow-json", "compare-json-diff"}
COMPARED = {"compare-identical", "compare-json-diff"}
#: scenarios spoken over HTTP/2 by the client: "h2" (plain GETs, backends HTTP/1.1) or "grpc"
#: (one unary call, the primary an h2c backend)
HTTP2 = {"h2-no-shadow": "h2", "h2-shadow-fast": "h2", "grpc-unary": "grpc"}
#: scenarios whose route records every request, as the bench's rows of the same name do
#: (plain files, the default; or `gzip: true`); the writer thread's instructions are in the
#: count too (callgrind counts every thread)
RECORDED = {"record-100": "plain", "record-100-gzip": "gzip"}


def _shadow_done(admin: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("shadowlane_shadow_requests_total{") and re.search(
            r'outcome="(ok|error|timeout|dropped)"', line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _h2load(url: str, n: int, uris: Path, http2: str = "") -> None:
    argv = ["h2load", "-n", str(n), "-c", "10", "-t", "1"]
    if not http2:
        argv += ["--h1", "-i", str(uris)]
    elif http2 == "h2":
        argv += ["-m", "10", url + "/"]
    else:
        body = uris.with_name("grpc-call.bin")
        body.write_bytes(GRPC_MESSAGE)
        argv += ["-m", "10", "-d", str(body), "-H", "content-type: application/grpc"]
        argv += ["-H", "te: trailers", url + GRPC_PATH]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or f"{n} succeeded" not in done.stdout:
        raise RuntimeError(f"h2load: {done.stdout[-800:]} {done.stderr[-400:]}")


def measure(python: str, scenario: str, n: int, work: Path) -> float:
    sup = Supervisor(work / "logs")
    try:
        backends = start_backends(sup, work)
        conf = work / f"{scenario}.yaml"
        record = RECORDED.get(scenario, "")
        http2 = HTTP2.get(scenario, "")
        conf.write_text(
            shadowlane_conf(
                work,
                backends,
                SCENARIOS[scenario],
                scenario in COMPARED,
                record,
                http2 == "h2",
                http2 == "grpc",
                primary="json" if scenario in JSON_PRIMARY else "fast",
            )
        )
        ready = work / f"{scenario}.ready.json"
        ready.unlink(missing_ok=True)
        out = work / f"callgrind.{scenario}.out"
        argv = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            python, "-m", "shadowlane", "run", "-c", str(conf), "--ready-file", str(ready),
        ]  # fmt: skip
        proc = sup.start(f"callgrind-{scenario}", argv)
        info = sup.wait_ready_file(proc, ready, timeout=300)
        url = f"http://127.0.0.1:{port_of(str(info['listen']))}"
        admin = str(info["admin"])
        uris = work / "uris.txt"  # distinct paths: ordered copies have disjoint keys
        uris.write_text("".join(f"{url}/w/{i}\n" for i in range(n)))
        _h2load(url, 300, uris, http2)  # warm-up
        settle = time.monotonic() + 120
        expect = 300 if SCENARIOS[scenario] else 0
        while _shadow_done(admin) < expect and time.monotonic() < settle:
            time.sleep(0.2)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        _h2load(url, n, uris, http2)
        expect += n if SCENARIOS[scenario] else 0
        while _shadow_done(admin) < expect and time.monotonic() < settle + 300:
            time.sleep(0.2)
        for old in work.glob(f"callgrind.{scenario}.out*"):
            old.unlink()
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        dumps = sorted(work.glob(f"callgrind.{scenario}.out*"))
        total = 0
        for dump in dumps:
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        return total / n
    finally:
        sup.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--python", action="append", required=True, help="a build's interpreter")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("-n", type=int, default=3000, help="requests measured per run")
    args = ap.parse_args()
    rows = []
    for scenario in args.scenario or list(SCENARIOS):
        for python in args.python:
            work = BENCH / "out" / "instructions"
            work.mkdir(parents=True, exist_ok=True)
            per = measure(python, scenario, args.n, work)
            rows.append({"scenario": scenario, "python": python, "instructions": round(per)})
            print(f"{scenario:16} {per:12,.0f} instructions/request  ({python})", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
