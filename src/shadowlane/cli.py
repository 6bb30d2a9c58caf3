"""The `shadowlane` command: run, check, report, replay and demo."""

from __future__ import annotations

import argparse
import logging
import sys

from shadowlane import __version__, build_kind, stale_compiled_modules
from shadowlane.config import Config, ConfigError, load_config, summarize

EXIT_CONFIG = 2


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as err:
        for line in err.errors:
            print(line, file=sys.stderr)
        return None
    except OSError as err:
        print(f"{path}: {err.strerror or err}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    print(summarize(cfg))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    from shadowlane.app import run_workers

    if args.workers < 1:
        print("--workers: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s shadowlane %(levelname)s %(message)s"
    )
    try:
        return run_workers(
            cfg, args.config, args.workers, watch=args.watch, ready_file=args.ready_file
        )
    except OSError as err:
        # the usual one: the listen or admin port is taken (ListenError names key and address)
        print(f"shadowlane: cannot listen: {err.strerror or err}", file=sys.stderr)
        return 1


def cmd_report(args: argparse.Namespace) -> int:
    from shadowlane.report import render_report
    from shadowlane.store import open_store

    url = args.store
    options = None
    thresholds = None
    if url is None:
        cfg = _load(args.config)
        if cfg is None:
            return EXIT_CONFIG
        url = cfg.compare.store
        options = cfg.compare
        thresholds = cfg.compare.thresholds
    try:
        store = open_store(url, options)
    except Exception as err:  # any driver error is reported as one line
        print(f"shadowlane report: cannot open store {url}: {err}", file=sys.stderr)
        return 1
    try:
        print(render_report(store, args.format, thresholds))
    finally:
        store.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from shadowlane.replay import main as replay_main

    return replay_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadowlane",
        description="HTTP ingress that shadows live traffic to new backends and compares answers.",
    )
    parser.add_argument(
        "--version", action="version", version=f"shadowlane {__version__} ({build_kind()})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the ingress")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.add_argument(
        "--watch", action="store_true", help="reload when the config file changes (as SIGHUP)"
    )
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help='once every listener accepts, write {"listen", "admin", "pid"} as JSON to PATH '
        "(atomically; removed at exit): how a script learns the ports that port 0 picked",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config and summarize it")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="print the comparison summary per route and field")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--config", help="YAML config file (its compare.store is read)")
    src.add_argument("--store", help="store URL: sqlite:///PATH or postgresql://...")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_report)

    from shadowlane.replay import add_arguments as add_replay_arguments

    p = sub.add_parser(
        "replay",
        help="send recorded traffic (GoReplay files) again: paced, filtered, compared",
        description="Replay recorded requests (GoReplay's file format) to a target, at the "
        "recorded pace or another, and compare the answers. See docs/replay.md.",
    )
    add_replay_arguments(p)
    p.set_defaults(func=cmd_replay)

    from shadowlane.demo import add_demo_arguments, run_demo_from_args

    p = sub.add_parser(
        "demo", help="built-in demo: v1/v2 backends, the proxy, traffic, the dashboard"
    )
    add_demo_arguments(p)
    p.set_defaults(func=run_demo_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    # before parsing: `--version`, which a bug report quotes, exits inside parse_args
    stale = stale_compiled_modules()
    if stale:
        print(
            "shadowlane: warning: compiled modules were built from another version of their "
            f"source and run instead of it ({', '.join(stale)}); rebuild with "
            "`python -m pip install -e .`",
            file=sys.stderr,
        )
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
