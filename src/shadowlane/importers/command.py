"""`shadowlane import FILE|DIR... [-o OUT] [--services FILE] [--strict]`.

Exit 0: the translated config was written (warnings, if any, on stderr). Exit 2: unreadable
input, a `--strict` run with untranslated fields, or a translation that the config would not
accept (which is a bug here, reported as the config's own errors).
"""

from __future__ import annotations

import argparse
import os
import sys

from shadowlane.config import ConfigError, parse_config
from shadowlane.importers.documents import translate_paths
from shadowlane.importers.render import render
from shadowlane.importers.services import ServiceMap, ServicesError

EXIT_CONFIG = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="FILE|DIR",
        help="peers' documents: YAML (multi-document), eskip, or directories of them",
    )
    p.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    add_services_arguments(p)


def add_services_arguments(p: argparse.ArgumentParser) -> None:
    """`--services` and `--strict`, shared by import, run and check."""
    p.add_argument(
        "--services",
        metavar="FILE",
        help="YAML map of service name (as the peers write it) to endpoint URLs; lookups try "
        "name.namespace:port, name.namespace, name:port, name; else Kubernetes DNS",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="a field of a peer's document that cannot be translated is an error",
    )


def main(args: argparse.Namespace) -> int:
    try:
        services = ServiceMap.load(args.services)
        loaded = translate_paths(list(args.paths), services)
    except ServicesError as err:
        print(f"shadowlane import: --services {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as err:
        for line in err.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    word = "error" if args.strict else "warning"
    for note in loaded.notes:
        print(f"{word}: {note}", file=sys.stderr)
    if args.strict and loaded.notes:
        return EXIT_CONFIG
    sources = [str(p) for p in loaded.peers] + [f"{n} (native)" for n in loaded.native]
    text = render(loaded, sources)
    try:
        parse_config(text, args.output or "<translated>")
    except ConfigError as err:
        print("shadowlane import: the translation is not a valid config:", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    if args.output:
        tmp = f"{args.output}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        sys.stdout.write(text)
    return 0
