"""shadowlane bench, side by side with nginx: one command, see bench/README.md.

    python bench/run.py [--quick] [--only SCENARIO_OR_GROUP ...] [--proxies P ...]

Installs what is missing, starts every server on loopback, runs the scenarios, stops everything
it started, and writes bench/RESULTS.md and bench/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

import report
from procs import Supervisor
from scenarios import (
    PROXIES_ALL,
    SCENARIOS,
    Measurement,
    Settings,
    estimate_seconds,
    run_all,
    select,
)
from servers import PROXY_LABELS, Backends, start_backends

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOOLS = {"nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client"}


def ensure_tools() -> None:
    """apt-get install the Debian packages of missing tools; pip install the repo if needed."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        print(f"installing {' '.join(missing)} (apt-get)", flush=True)
        cmd = ["apt-get", "install", "-y", *missing]
        if subprocess.run(cmd, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(cmd, check=True)
    if importlib.util.find_spec("shadowlane") is None:
        print("installing shadowlane (pip install -e)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
    for module in ("uvloop", "httptools"):  # the stub backends need them
        if importlib.util.find_spec(module) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", module], check=True)


def shadowlane_build() -> tuple[str, list[str]]:
    """The build the bench's proxies will run, and the compiled modules older than their source.

    Asked of a child, as the proxies are started, so the answer is theirs and not this process's.
    """
    probe = (
        "import shadowlane; print(shadowlane.build_kind()); "
        "print(' '.join(shadowlane.stale_compiled_modules()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return out[0], (out[1].split() if len(out) > 1 else [])


def ensure_compiled(allow_interpreted: bool) -> str:
    """Rebuild an interpreted or stale editable install before measuring it.

    Why: a fresh checkout, or an edit since the last `pip install -e .`, runs the `.py` files
    (or an old build) at about half the compiled speed, and nothing in the figures shows it.
    A run on such a build once looked like a 25% regression. Without a C compiler the rebuild
    stays interpreted; then the run stops unless `--interpreted` says that is what to measure.
    """
    kind, stale = shadowlane_build()
    if kind == "compiled" and not stale:
        return kind
    why = "interpreted" if kind != "compiled" else f"stale ({', '.join(stale)})"
    print(f"shadowlane build is {why}: rebuilding (pip install -e, about 2 min)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True
    )
    kind, stale = shadowlane_build()
    if (kind != "compiled" or stale) and not allow_interpreted:
        raise SystemExit(
            "shadowlane did not compile (see pip's output above; mypyc needs a C compiler): "
            "the figures would not be the shipped build's. Pass --interpreted to measure it anyway."
        )
    return kind if not stale else "stale"


def raise_fd_limit() -> None:
    """Children (nginx, wrk with 1,000 connections, the stubs) inherit the raised limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 run per figure, shorter runs and memory check (a smoke test)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        help="scenario ids or groups, glob patterns allowed (see --list)",
    )
    p.add_argument("--proxies", nargs="+", choices=PROXIES_ALL, help="limit the proxies")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (default 4; --quick 2)")
    p.add_argument(
        "--growth-duration",
        type=float,
        help="seconds per run of the cost-growth scenarios (default 3; --quick 2)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per figure")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--render",
        action="store_true",
        help="rewrite RESULTS.md from results.json (after a report change), no run",
    )
    p.add_argument(
        "--interpreted",
        action="store_true",
        help="measure shadowlane even if it did not compile with mypyc (not the shipped speed)",
    )
    p.add_argument(
        "--no-write",
        action="store_true",
        help="do not overwrite RESULTS.md / results.json (write under bench/out/)",
    )
    return p.parse_args(argv)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.id:16} {s.group:12} {s.title}  [{', '.join(s.proxies)}]")
        return 0
    if args.render:
        return render_only()
    settings = Settings(
        duration=args.duration or (2.0 if args.quick else 4.0),
        growth_duration=args.growth_duration or (2.0 if args.quick else 3.0),
        warmup=args.warmup,
        runs=args.runs or (1 if args.quick else 3),
        work=BENCH_DIR / "out",
    )
    scenarios = select(args.only, args.proxies)
    if args.quick:  # the memory check shrinks with the rest
        scenarios = [replace(s, duration=15.0) if s.group == "memory" else s for s in scenarios]
    if not scenarios:
        print("no scenario matches", args.only, file=sys.stderr)
        return 2
    estimate = estimate_seconds(scenarios, settings)
    n_figures = sum(len(s.proxies) for s in scenarios)
    print(
        f"{len(scenarios)} scenarios, {n_figures} figures, {settings.runs} run(s) of "
        f"{settings.duration:g} s each: about {estimate / 60:.1f} min",
        flush=True,
    )

    ensure_tools()
    build = ensure_compiled(args.interpreted)
    raise_fd_limit()
    settings.work.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(settings.work / "logs")
    for leftover in sup.reap_leftovers():
        print(f"stopped leftover from an earlier run: {leftover}")
    # Explicitly: a shell starting us in the background leaves SIGINT ignored otherwise.
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    machine = report.machine_info(REPO)
    machine["shadowlane_build"] = build
    started = time.monotonic()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: list[Measurement] = []

    def on_result(m: Measurement) -> None:
        results.append(m)
        elapsed = time.monotonic() - started
        if m.status == "ok":
            errs = sum(m.errors.values())
            print(
                f"[{elapsed:5.0f}s] {m.scenario:14} {PROXY_LABELS[m.proxy]:17} "
                f"{m.rps or 0:9,.0f} req/s  p50 {m.p50_ms or 0:7.2f} ms  "
                f"p99 {m.p99_ms or 0:8.2f} ms  rss {m.peak_rss_mb or 0:6.1f} MB"
                + (f"  errors {errs:,}" if errs else ""),
                flush=True,
            )
        else:
            print(
                f"[{elapsed:5.0f}s] {m.scenario:14} {PROXY_LABELS[m.proxy]:17} "
                f"{m.status}: {m.note[:160]}",
                flush=True,
            )

    configs: dict[str, str] = {}
    interrupted = False
    backends: Backends | None = None
    try:
        backends = start_backends(sup, settings.work)
        configs = run_all(scenarios, settings, sup, backends, on_result)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every server we started", file=sys.stderr)
    finally:
        sup.stop_all()
        if backends is not None:
            backends.close()  # the `dead` port's socket, after everything that used it

    elapsed = time.monotonic() - started
    meta = {
        "command": "python bench/run.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:]),
        "date": date,
        "elapsed_s": round(elapsed, 1),
        "runs": settings.runs,
        "duration_s": settings.duration,
        "growth_duration_s": settings.growth_duration,
        "warmup_s": settings.warmup,
        "interrupted": interrupted,
        "load_average_at_end": os.getloadavg(),
    }
    out_dir = settings.work if (args.no_write or interrupted) else BENCH_DIR
    targets = report.write(out_dir, meta, machine, results, configs)
    print(f"\ndone in {elapsed / 60:.1f} min; wrote {out_dir / 'RESULTS.md'} and results.json")
    for t in targets:
        print(f"  {t.verdict:14} {t.name}: {t.measured}")
    return 130 if interrupted else 0


def render_only() -> int:
    doc = json.loads((BENCH_DIR / "results.json").read_text())
    fields = set(Measurement.__dataclass_fields__)
    ms = [Measurement(**{k: v for k, v in d.items() if k in fields}) for d in doc["measurements"]]
    report.write(BENCH_DIR, doc["meta"], doc["machine"], ms, doc["configs"])
    print(f"rewrote {BENCH_DIR / 'RESULTS.md'} from results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
