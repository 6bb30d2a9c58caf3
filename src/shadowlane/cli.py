"""The `shadowlane` command: run, check, import, report, verify, replay and demo."""

from __future__ import annotations

import argparse
import logging
import sys

from shadowlane import __version__, build_kind, stale_compiled_modules
from shadowlane.config import Config, ConfigError, summarize

EXIT_CONFIG = 2


def _load(path: str, services: str | None = None, strict: bool = False) -> Config | None:
    """The config at `path`: a file or directory of native config and/or peers' documents
    (translated by shadowlane.importers; what could not be translated is a warning here)."""
    from shadowlane.importers import ConfigSource

    try:
        cfg, notes = ConfigSource(path, services, strict).load_with_notes()
    except ConfigError as err:
        for line in err.errors:
            print(line, file=sys.stderr)
        return None
    except OSError as err:
        print(f"{path}: {err.strerror or err}", file=sys.stderr)
        return None
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return cfg


def _source_args(args: argparse.Namespace) -> tuple[str | None, bool]:
    return getattr(args, "services", None), getattr(args, "strict", False)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config, *_source_args(args))
    if cfg is None:
        return EXIT_CONFIG
    print(summarize(cfg))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config, *_source_args(args))
    if cfg is None:
        return EXIT_CONFIG
    from shadowlane.app import run_workers
    from shadowlane.importers import ConfigSource

    if args.workers < 1:
        print("--workers: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s shadowlane %(levelname)s %(message)s"
    )
    try:
        return run_workers(
            cfg,
            args.config,
            args.workers,
            watch=args.watch,
            ready_file=args.ready_file,
            source=ConfigSource(args.config, *_source_args(args)),
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


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or any(c.isspace() for c in name.strip()):
        raise argparse.ArgumentTypeError(f"{text!r}: use 'Name: value'")
    return name.strip(), value.strip()


def _duration(text: str) -> float:
    from shadowlane.config import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return seconds


def cmd_verify(args: argparse.Namespace) -> int:
    from shadowlane.verify import (
        Ledger,
        TerminalProgress,
        VerifyError,
        VerifyOptions,
        render,
        verify,
    )

    def fail(message: str) -> int:
        print(f"shadowlane verify: {message}", file=sys.stderr)
        return EXIT_CONFIG

    if not args.suspects and (args.route or args.target or args.scope):
        return fail("--route, --target and --scope choose ledger entries: they need --suspects")
    store = None
    ledger: Ledger | None = None
    if args.suspects:
        url = args.store
        if url is None:
            if args.config is None:
                return fail("--suspects reads the divergence ledger: give -c FILE or --store URL")
            cfg = _load(args.config)
            if cfg is None:
                return EXIT_CONFIG
            url = cfg.compare.store
        from shadowlane.store import open_store

        try:
            store = open_store(url)
        except Exception as err:  # any driver error is reported as one line
            return fail(f"cannot open store {url}: {err}")
        ledger = store
    options = VerifyOptions(
        primary=args.primary,
        shadow=args.shadow,
        kind=args.kind,
        indices=tuple(args.index),
        ignore=tuple(args.ignore),
        batch=args.batch,
        timeout=args.timeout,
        examples=args.examples,
        headers=tuple(args.header),
        strategy=args.strategy,
        repair=args.repair,
        suspects=args.suspects,
        route=args.route,
        target=args.target,
        scope=args.scope,
    )
    progress = TerminalProgress(sys.stderr)
    try:
        result = verify(
            options,
            ledger=ledger,
            progress=progress,
            warn=lambda message: progress.say(f"shadowlane verify: warning: {message}"),
        )
    except VerifyError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return fail("interrupted")
    finally:
        if store is not None:
            store.close()
    sys.stdout.write(render(result, args.format))
    return 0 if result.equal else 1


def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kind",
        required=True,
        choices=("elasticsearch", "opensearch"),
        help="what the clusters are (one client speaks to both)",
    )
    p.add_argument("--primary", required=True, metavar="URL", help="the cluster that is right")
    p.add_argument("--shadow", required=True, metavar="URL", help="the cluster checked against it")
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="PATTERN",
        help="indices to compare (repeatable, or comma-separated; * wildcards; a later "
        "-PATTERN excludes, written --index=-PATTERN or 'a-*,-a-old'); default: every index "
        "not starting with '.'",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("-c", "--config", help="YAML config file (its compare.store holds the ledger)")
    src.add_argument(
        "--store", help="store URL holding the ledger: sqlite:///PATH or postgresql://"
    )
    p.add_argument(
        "--suspects",
        action="store_true",
        help="verify only the keys in the divergence ledger (needs -c or --store)",
    )
    p.add_argument("--route", help="with --suspects: only ledger entries of this route")
    p.add_argument("--target", help="with --suspects: only ledger entries of this shadow target")
    p.add_argument("--scope", help="with --suspects: only ledger entries of this ordering scope")
    p.add_argument(
        "--repair",
        action="store_true",
        help="copy the primary's differing and missing documents to the shadow, delete what "
        "only the shadow holds, re-check; with --suspects, resolve the keys now equal",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATH",
        help="field path inside _source left out of the comparison (repeatable; the syntax of "
        "compare.ignore: a.b, items[*].price, **.updated_at)",
    )
    p.add_argument("--batch", type=int, default=500, metavar="N", help="page size (default 500)")
    p.add_argument(
        "--timeout",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="per HTTP request: 30s, 2m, 500ms (default 30s)",
    )
    p.add_argument(
        "--examples", type=int, default=10, metavar="N", help="differences shown (default 10)"
    )
    p.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="sent to both clusters on every request (repeatable), e.g. an Authorization",
    )
    p.add_argument(
        "--strategy",
        choices=("auto", "merge", "lookup"),
        default="auto",
        help="merge: both sides sorted by _id; lookup: scroll + _mget; auto (default): merge, "
        "falling back to lookup where _id sorting is refused or disagrees",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")


def cmd_import(args: argparse.Namespace) -> int:
    from shadowlane.importers import import_main

    return import_main(args)


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

    from shadowlane.importers import add_arguments as add_import_arguments
    from shadowlane.importers import add_services_arguments

    config_help = "config file or directory: native YAML and/or peers' documents (see import)"
    p = sub.add_parser("run", help="run the ingress")
    p.add_argument("-c", "--config", required=True, help=config_help)
    add_services_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.add_argument(
        "--watch",
        action="store_true",
        help="reload when the config file or directory changes (as SIGHUP; a mounted "
        "ConfigMap's swap counts)",
    )
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help='once every listener accepts, write {"listen", "admin", "pid"} as JSON to PATH '
        "(atomically; removed at exit): how a script learns the ports that port 0 picked",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config and summarize it")
    p.add_argument("-c", "--config", required=True, help=config_help)
    add_services_arguments(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "import",
        help="translate peers' routes (Gateway API, Istio, Emissary, Gloo, Skipper, Envoy) "
        "into a commented shadowlane config",
        description="Translate peers' route documents into shadowlane config. See docs/import.md.",
    )
    add_import_arguments(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "report", help="print the comparison summary per route and field, and the divergence ledger"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--config", help="YAML config file (its compare.store is read)")
    src.add_argument("--store", help="store URL: sqlite:///PATH or postgresql://...")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "verify",
        help="compare what two Elasticsearch/OpenSearch clusters hold; exit 0 equal, 1 not",
    )
    _add_verify_arguments(p)
    p.set_defaults(func=cmd_verify)

    from shadowlane.migrate.command import add_arguments as add_migrate_arguments
    from shadowlane.migrate.command import run as run_migrate

    p = sub.add_parser(
        "migrate",
        help="migration plans: status, advance, rollback (on the store the fleet shares)",
        description="See and move the migrations declared under `migrations:`. Changes are "
        "written to the store; every instance applies them within about a second. See "
        "docs/migrations.md.",
    )
    add_migrate_arguments(p)
    p.set_defaults(func=run_migrate)

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
