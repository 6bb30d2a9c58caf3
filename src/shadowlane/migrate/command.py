"""`shadowlane migrate status [NAME] | advance NAME | rollback NAME [--to STAGE]`.

Mutations go straight to the store (the migration's document, compare-and-set, and the audit
log), not through an instance's admin API: the store is the fleet's one state, every instance
applies a change from it within about a second, and the command then works with no instance
reachable and without the admin token (whoever can write the store can move the migration;
see docs/decisions.md "Migration commands act on the store"). `status` reads the last gate
evaluation the driving instance wrote.

Exit codes: 0 done; 1 refused (no such migration, a transition that does not apply); 2 could
not run (bad config, store unreachable).
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

import orjson

from shadowlane.config import Config, ConfigError, load_config
from shadowlane.migrate.runtime import describe
from shadowlane.migrate.shared import advance_op, gates_doc, load_all, rollback_op, transition
from shadowlane.migrate.state import TransitionError
from shadowlane.store import open_store

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("-c", "--config", help="YAML config file (its compare.store is used)")
        src.add_argument("--store", help="store URL: sqlite:///PATH or postgresql://...")
        q.add_argument("--format", choices=("text", "json"), default="text")

    q = sub.add_parser("status", help="stage, gates with figures, time in stage, what blocks")
    q.add_argument("name", nargs="?", help="one migration (all when left out)")
    common(q)
    q = sub.add_parser("advance", help="move to the next step or stage (resumes a halted one)")
    q.add_argument("name")
    q.add_argument("--by", default=None, help="who asks, for the audit log (default: $USER)")
    common(q)
    q = sub.add_parser("rollback", help="go back one step, or to an earlier stage")
    q.add_argument("name")
    q.add_argument("--to", metavar="STAGE", help="the stage to go back to")
    q.add_argument("--by", default=None, help="who asks, for the audit log (default: $USER)")
    common(q)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render_text(items: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for m in items:
        lines.append(
            f"{m['name']}: {m['old']} -> {m['new']}  {m['phase']} at {m['position']}  "
            f"(new weight {m['weight']}%, {m['in_stage_seconds']:.0f}s in stage"
            f"{', auto' if m['auto'] else ''})"
        )
        marks = {"done": "x", "current": ">", "pending": " "}
        lines.append(
            "  stages: "
            + "  ".join(
                f"[{marks[s['state']]}] {s['name']}"
                + (f" {s['weights']}" if s.get("weights") else "")
                for s in m["stages"]
            )
        )
        if m["gates"]:
            age = time.time() - float(m["gates_at"] or 0)
            lines.append(f"  gates (evaluated {age:.0f}s ago):")
            for g in m["gates"]:
                where = " ".join(x for x in (g.get("route", ""), g.get("field", "")) if x)
                lines.append(
                    f"    {g['verdict']:<4}  {g['gate']:<15} {where:<30} "
                    f"measured {_fmt(g['value']):<10} threshold {_fmt(g['threshold']):<8} "
                    f"{g['detail']}"
                )
        else:
            lines.append("  gates: not evaluated yet in this position (no instance drives it?)")
        if m["blocking"]:
            lines.append(
                "  blocked by: "
                + ", ".join(
                    g["gate"]
                    + (
                        f" ({g.get('route', '')} {g.get('field', '')})".rstrip() + ")"
                        if g.get("route")
                        else ""
                    )
                    for g in m["blocking"]
                )
            )
        if m["last"]:
            last = m["last"]
            lines.append(f"  last: {last['action']} by {last['actor']}: {last['reason']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "no migrations in the store\n"


def run(args: argparse.Namespace) -> int:
    cfg: Config | None = None
    url = args.store
    if url is None:
        try:
            cfg = load_config(args.config)
        except ConfigError as err:
            for line in err.errors:
                print(line, file=sys.stderr)
            return 2
        except OSError as err:
            print(f"{args.config}: {err.strerror or err}", file=sys.stderr)
            return 2
        url = cfg.compare.store
    try:
        store = open_store(url)
    except Exception as err:  # any driver error is one line
        print(f"shadowlane migrate: cannot open store {url}: {err}", file=sys.stderr)
        return 2
    try:
        return _act(args, store, cfg)
    except TransitionError as err:
        print(f"shadowlane migrate {args.action}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        print(f"shadowlane migrate {args.action}: store error: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _act(args: argparse.Namespace, store: Any, cfg: Config | None) -> int:
    if args.action == "status":
        docs = load_all(store)
        if args.name is not None and args.name not in docs:
            print(
                f"shadowlane migrate status: no migration {args.name!r} in the store",
                file=sys.stderr,
            )
            return 1
        mig_cfg = {m.name: m for m in cfg.migrations} if cfg is not None else {}
        items = [
            describe(
                doc,
                gates_doc(store, name),
                [a.as_json() for a in store.audit(name, 20)],
                mig_cfg.get(name),
            )
            for name, doc in sorted(docs.items())
            if args.name is None or name == args.name
        ]
        if args.format == "json":
            print(
                orjson.dumps(
                    items if args.name is None else items[0], option=orjson.OPT_INDENT_2
                ).decode()
            )
        else:
            print(render_text(items), end="")
        return 0
    actor = f"cli:{args.by or getpass.getuser()}"
    op = advance_op if args.action == "advance" else rollback_op(args.to)
    before, after = transition(
        store,
        args.name,
        op,
        actor=actor,
        action=args.action,
        reason="asked by " + actor,
        gates=list((gates_doc(store, args.name) or {}).get("gates", [])),
    )
    result = {"migration": args.name, "from": before.position, "to": after.position}
    if args.format == "json":
        print(orjson.dumps(result).decode())
    else:
        print(f"{args.name}: {before.position} -> {after.position} (instances apply it within ~1s)")
    return 0
