"""The `shadowlane` command (placeholder until the core lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("shadowlane: not implemented yet")
