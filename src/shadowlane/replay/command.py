"""`shadowlane replay`: the arguments, checked into a `Setup`, the run, the summary.

Every problem found before anything is sent (a bad argument, a file that is missing or not a
recording, a config error, a target that refuses connections) is one line on stderr naming
what failed, and exit status 2. See docs/replay.md for every option.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections import Counter
from typing import Any

from pydantic import ValidationError

from shadowlane.compare import DEFAULT_SETTINGS, compile_settings
from shadowlane.config import BackendConfig, Config, ConfigError, ShadowConfig, load_config
from shadowlane.record import FormatError, iter_file, recording_files
from shadowlane.replay.pacing import Pacer, parse_rate, parse_speed, parse_threshold, parse_time
from shadowlane.replay.runner import CannotRun, Lane, Lanes, Runner, Setup, TargetSpec
from shadowlane.replay.source import Counts, Filters, Source, Window
from shadowlane.replay.summary import (
    EXIT_CANNOT_RUN,
    Threshold,
    exit_status,
    render_json,
    render_text,
    summary_doc,
)
from shadowlane.routing import RouteTable
from shadowlane.store import open_store

PROG = "shadowlane replay"


class Refused(Exception):
    """An argument that cannot be used; the message says which and why."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="recording files or directories")
    g = p.add_argument_group("target")
    g.add_argument("--to", metavar="URL", help="send the requests to this base URL")
    g.add_argument("--to-backend", metavar="NAME", help="...or to a backend of the config (-c)")
    g.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="shadowlane config: backends, routes, shadows, compare settings and store",
    )
    g.add_argument(
        "--route",
        metavar="NAME",
        help="replay as this route: with -c only the requests the config routes to it, with "
        "its compare settings; the route comparisons are stored under (default: replay)",
    )
    g.add_argument(
        "--shadow",
        metavar="BACKEND",
        help="replay as the config's shadow to BACKEND: its mutations, order: scope and "
        "ids_from_primary (needs -c)",
    )
    g = p.add_argument_group("pacing")
    pace = g.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        default="1x",
        help="the recorded spacing divided by X: 1x (default), 2x, 0.5x, 200%%; max (or 0): "
        "as fast as --concurrency allows",
    )
    pace.add_argument("--rate", metavar="N", help="N requests per second instead")
    g.add_argument(
        "--max-wait", metavar="DURATION", help="count a longer recorded gap as this (e.g. 1s)"
    )
    g.add_argument("--loop", action="store_true", help="replay again and again")
    g.add_argument("--max-requests", type=int, metavar="N", help="stop after N requests")
    g.add_argument("--duration", metavar="DURATION", help="stop sending after this long")
    g = p.add_argument_group("window")
    g.add_argument(
        "--from",
        dest="from_",
        metavar="T",
        help="from this record time on: RFC 3339, epoch seconds, or +OFFSET from the "
        "recording's first record (+30s)",
    )
    g.add_argument("--until", metavar="T", help="up to this record time (excluded)")
    g = p.add_argument_group("filters")
    g.add_argument(
        "--method", action="append", default=[], metavar="M", help="only this method (repeatable)"
    )
    g.add_argument("--path-regex", metavar="RE", help="only paths this regex finds")
    g.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: RE'",
        help="only requests whose header NAME matches RE (repeatable; all must match)",
    )
    g = p.add_argument_group("mutations")
    g.add_argument("--rewrite-path", metavar="REGEX=REPLACEMENT", help="re.sub on the path")
    g.add_argument("--set-header", action="append", default=[], metavar="'NAME: VALUE'")
    g.add_argument("--remove-header", action="append", default=[], metavar="NAME")
    g.add_argument("--host", help="send this Host header")
    g.add_argument(
        "--keep-host",
        action="store_true",
        help="send the recorded Host header (default: the target's host:port)",
    )
    g = p.add_argument_group("sending")
    g.add_argument(
        "--concurrency", type=int, default=64, metavar="N", help="in flight at most (64)"
    )
    g.add_argument(
        "--timeout", default="30s", metavar="DURATION", help="per request, connecting included"
    )
    g = p.add_argument_group("comparison")
    g.add_argument(
        "--compare",
        choices=("none", "recorded"),
        default=None,
        help="recorded: compare the target's answers with the recorded ones",
    )
    g.add_argument(
        "--primary",
        metavar="URL|NAME",
        help="also send each request here, live, and compare (Diffy style)",
    )
    g.add_argument(
        "--secondary",
        metavar="URL|NAME",
        help="...and here (the primary's version), to tell noise from differences",
    )
    g.add_argument(
        "--store", metavar="URL", help="write comparisons here (default: the config's store)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("text", "json"), default="text")
    g.add_argument(
        "--max-failures",
        default="0",
        metavar="N|P%",
        help="exit 1 when more requests than this fail (default 0)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument("--dry-run", action="store_true", help="read and count; send nothing")


# ----- checking the arguments -----


def _duration(flag: str, text: str | None, *, positive: bool = True) -> float | None:
    if text is None:
        return None
    from shadowlane.config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise Refused(f"{flag}: {exc}") from None
    if positive and value <= 0:
        raise Refused(f"{flag}: must be above 0")
    return value


def _regex(flag: str, text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise Refused(f"{flag}: bad regex {text!r}: {exc}") from None


def _name_value(flag: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise Refused(f"{flag}: want 'Name: value', not {text!r}")
    return name.strip().lower(), value.strip()


def split_rewrite(text: str) -> tuple[str, str]:
    """`REGEX=REPLACEMENT` at the first `=` outside groups, classes and escapes, so a regex
    may hold `(?=...)` or `[=]`; an `=` of its own must be escaped (`\\=`)."""
    depth = 0
    in_class = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "=" and depth == 0:
            return text[:i], text[i + 1 :]
        i += 1
    raise Refused(f"--rewrite-path: want REGEX=REPLACEMENT, not {text!r}")


def _files(paths: list[str]) -> list[str]:
    for path in paths:
        if not os.path.exists(path):
            raise Refused(f"{path}: no such file or directory")
    files = recording_files(paths)
    for path in paths:
        if os.path.isdir(path) and not any(f.startswith(os.path.join(path, "")) for f in files):
            raise Refused(f"{path}: no recordings in it (*.gor, *.gor.gz, *.log, *.log.gz)")
    for f in files:
        try:
            # the first record: a file that is not a recording fails before anything is sent
            next(iter(iter_file(f)), None)
        except FormatError as exc:
            raise Refused(str(exc)) from None
        except OSError as exc:
            raise Refused(f"{f}: {exc.strerror or exc}") from None
    return files


def _config(path: str | None) -> Config | None:
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as err:
        raise Refused("\n".join(err.errors)) from None
    except OSError as err:
        raise Refused(f"{path}: {err.strerror or err}") from None


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def _target(role: str, value: str, cfg: Config | None, timeout: float) -> TargetSpec:
    """`--to`, `--primary`, `--secondary`: a URL, or a backend name of the config."""
    if "://" in value:
        try:
            backend = BackendConfig.model_validate(
                {"endpoints": [value], "timeout": timeout, "connect_timeout": min(timeout, 5.0)}
            )
        except ValidationError as exc:
            raise Refused(f"--{role}: {_pydantic_message(exc)}") from None
        return TargetSpec(role, backend.endpoints[0].authority, value, backend)
    if cfg is None:
        raise Refused(f"--{role} {value}: not a URL (a backend name needs -c FILE)")
    found = cfg.backends.get(value)
    if found is None:
        names = ", ".join(sorted(cfg.backends)) or "none"
        raise Refused(f"--{role} {value}: no such backend in the config (backends: {names})")
    return TargetSpec(role, value, value, found)


def _mutations(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """The command line's mutations on top of a shadow's own (or none)."""
    out = dict(base)
    headers = dict(out.get("headers") or {})
    sets = dict(headers.get("set") or {})
    for text in args.set_header:
        name, value = _name_value("--set-header", text)
        sets[name] = value
    removes = list(headers.get("remove") or [])
    removes += [h.strip().lower() for h in args.remove_header]
    if sets or removes:
        out["headers"] = {"set": sets, "remove": removes}
    if args.rewrite_path is not None:
        regex, repl = split_rewrite(args.rewrite_path)
        _regex("--rewrite-path", regex)
        out["rewrite_path"] = {"regex": regex, "replacement": repl}
    if args.host is not None and args.keep_host:
        raise Refused("--host and --keep-host: choose one")
    if args.host is not None:
        out["host"] = args.host
    elif args.keep_host:
        out["host"] = None
        out["host_suffix"] = ""
    return out


def _shadow_cfg(data: dict[str, Any], what: str) -> ShadowConfig:
    try:
        return ShadowConfig.model_validate(data)
    except ValidationError as exc:
        raise Refused(f"{what}: {_pydantic_message(exc)}") from None


def _lanes(
    args: argparse.Namespace, cfg: Config | None, to: TargetSpec | None
) -> tuple[Lanes, TargetSpec | None]:
    """The lanes, and the target the shadow names when --to was not given."""
    if args.shadow is None:
        route_cfg = None
        if args.route is not None and cfg is not None:
            route_cfg = next((r for r in cfg.routes if r.name == args.route), None)
            if route_cfg is None:
                raise Refused(f"--route {args.route}: no such route in the config")
        settings = (
            compile_settings(None, route_cfg, cfg.compare) if cfg is not None else DEFAULT_SETTINGS
        )
        base: dict[str, Any] = {
            "backend": to.name if to is not None else "replay",
            "host_suffix": "",
            "host": "backend",
        }
        sc = _shadow_cfg(_mutations(args, base), "mutations")
        lane = Lane(args.route or "replay", sc, settings, marker=False)
        if route_cfg is not None and cfg is not None:
            return Lanes(table=RouteTable(cfg.routes), by_route={route_cfg.name: lane}), None
        return Lanes(single=lane), None
    if cfg is None:
        raise Refused("--shadow needs -c FILE (the config that names the shadow)")
    lanes: dict[str, Lane] = {}
    for route in cfg.routes:
        if args.route is not None and route.name != args.route:
            continue
        for index, shadow in enumerate(route.shadows):
            if shadow.backend != args.shadow:
                continue
            data = _mutations(args, shadow.model_dump(exclude_unset=True, mode="json"))
            sc = _shadow_cfg(data, f"routes[{route.name}] shadow {args.shadow}")
            order = sc.ordering
            scope = order.scope if order is not None and order.scope else f"{route.name}#{index}"
            settings = compile_settings(sc, route, cfg.compare)
            lanes[route.name] = Lane(
                route.name, sc, settings, marker=True, scope_name=scope, as_shadow=True
            )
    if not lanes:
        where = f"route {args.route}" if args.route else "no route"
        raise Refused(f"--shadow {args.shadow}: {where} shadows to it in the config")
    own = None
    if to is None:
        backend = cfg.backends[args.shadow]
        own = TargetSpec("to", args.shadow, args.shadow, backend)
    return Lanes(table=RouteTable(cfg.routes), by_route=lanes), own


def build_setup(args: argparse.Namespace) -> Setup:
    """The arguments, checked; `Refused` names the first problem."""
    if args.concurrency < 1:
        raise Refused("--concurrency: must be at least 1")
    if args.max_requests is not None and args.max_requests < 1:
        raise Refused("--max-requests: must be at least 1")
    timeout = _duration("--timeout", args.timeout)
    assert timeout is not None
    try:
        speed = parse_speed(args.speed)
        rate = parse_rate(args.rate) if args.rate is not None else None
        start = parse_time(args.from_) if args.from_ is not None else None
        end = parse_time(args.until) if args.until is not None else None
        value, percent = parse_threshold(args.max_failures)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    if start and end and start[0] == end[0] and end[1] <= start[1]:
        raise Refused("--until: must be after --from (the window is [from, until))")
    cfg = _config(args.config)
    to: TargetSpec | None = None
    if args.to is not None and args.to_backend is not None:
        raise Refused("--to and --to-backend: choose one")
    if args.to is not None:
        to = _target("to", args.to, None, timeout)
    elif args.to_backend is not None:
        if cfg is None:
            raise Refused("--to-backend needs -c FILE")
        to = _target("to", args.to_backend, cfg, timeout)
    lanes, own = _lanes(args, cfg, to)
    to = to or own
    if to is None and not args.dry_run:
        raise Refused("where to? give --to URL, --to-backend NAME or --shadow BACKEND")
    primary = _target("primary", args.primary, cfg, timeout) if args.primary else None
    secondary = _target("secondary", args.secondary, cfg, timeout) if args.secondary else None
    if secondary is not None and primary is None:
        raise Refused("--secondary needs --primary (it measures the primary's noise)")
    if primary is not None and args.compare == "recorded":
        raise Refused("--compare recorded and --primary: compare with one primary, not two")
    compare_recorded = args.compare == "recorded"
    files = _files(args.paths)
    setup = Setup(
        files=files,
        window=Window(start, end),
        filters=_filters(args),
        lanes=lanes,
        to=to,
        primary=primary,
        secondary=secondary,
        compare_recorded=compare_recorded,
        speed=speed,
        rate=rate,
        max_wait=_duration("--max-wait", args.max_wait) or 0.0,
        loop=args.loop,
        max_requests=args.max_requests,
        duration=_duration("--duration", args.duration),
        concurrency=args.concurrency,
        timeout=timeout,
        keep_host=args.keep_host,
        threshold=Threshold(value, percent),
    )
    if (setup.comparing or setup.writes) and not args.dry_run:
        # comparisons go to the store, and so do the write steps' ledger entries (as an
        # instance with an ordered shadow opens its store whether or not it compares)
        url = args.store or (cfg.compare.store if cfg is not None else None)
        if url is not None:
            try:
                setup.store = open_store(url, cfg.compare if cfg is not None else None)
            except Exception as exc:  # any driver's error is one line
                raise Refused(f"cannot open store {url}: {exc}") from None
            setup.store_url = url
    elif args.store is not None:
        raise Refused(
            "--store: nothing to store (add --compare recorded or --primary URL, or replay as "
            "a shadow with write steps)"
        )
    return setup


def _filters(args: argparse.Namespace) -> Filters:
    headers = []
    for text in args.header:
        name, value = _name_value("--header", text)
        headers.append((name, _regex("--header", value)))
    return Filters(
        methods=frozenset(m.upper() for m in args.method),
        path=_regex("--path-regex", args.path_regex) if args.path_regex else None,
        headers=tuple(headers),
    )


# ----- running -----


def dry_run(setup: Setup, fmt: str) -> int:
    counts = Counts()
    source = Source(
        setup.files,
        setup.window,
        setup.filters,
        answers=False,
        answer_limit=0,
        by_answer_time=False,
        counts=counts,
    )
    pacer = Pacer(setup.speed, setup.rate, setup.max_wait)
    methods: Counter[str] = Counter()
    due = 0.0
    n = 0
    for item in source:
        due = pacer.due(item.ts_ns)
        methods[item.rec.request.method] += 1
        n += 1
    first, last = counts.first_ns, counts.last_ns
    span = (last - first) / 1e9 if first is not None and last is not None else 0.0
    reasons = {
        "window": counts.window,
        "invalid": counts.invalid,
        "upgrade": counts.upgrade,
        "filtered": counts.filtered,
    }
    skipped = {k: v for k, v in reasons.items() if v}
    doc = {
        "dry_run": True,
        "files": len(setup.files),
        "requests": n,
        "methods": dict(sorted(methods.items())),
        "skipped": skipped,
        "recorded_span_s": round(span, 6),
        "expected_duration_s": round(due, 6),
        "invalid_examples": counts.invalid_examples,
    }
    if fmt == "json":
        print(render_json(doc))
    else:
        print(
            f"{n} request(s) in {len(setup.files)} file(s), recorded over {span:.2f}s; "
            f"at this pace about {due:.2f}s"
        )
        print(f"  methods  {', '.join(f'{k} {v}' for k, v in sorted(methods.items())) or '-'}")
        if skipped:
            print(f"  skipped  {', '.join(f'{k} {v}' for k, v in skipped.items())}")
        for ex in counts.invalid_examples:
            print(f"  invalid  {ex}")
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        setup = build_setup(args)
    except Refused as exc:
        for line in str(exc).splitlines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.dry_run:
        return dry_run(setup, args.format)
    if not args.no_progress and sys.stderr.isatty():
        setup.progress = sys.stderr

    fatal: list[str] = []
    tally = None

    async def go() -> None:
        nonlocal tally
        runner = Runner(setup)
        try:
            tally = await runner.run()
        except CannotRun as exc:
            fatal.append(str(exc))
        if runner.fatal:
            fatal.append(runner.fatal)
            tally = runner.tally

    try:
        _run_loop(go)
    finally:
        if setup.store is not None:
            setup.store.close()
    if tally is None:
        for line in fatal:
            print(f"{PROG}: {line}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    doc = summary_doc(tally, setup.threshold, setup.store_url)
    print(render_json(doc) if args.format == "json" else render_text(doc))
    for line in fatal:
        print(f"{PROG}: {line}", file=sys.stderr)
    if fatal:
        return EXIT_CANNOT_RUN
    return exit_status(tally, setup.threshold)


def _run_loop(go: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(go())
        return
    uvloop.run(go())
