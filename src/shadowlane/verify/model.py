"""What a verify found: counts per index, examples, repairs, and the verdict.

Plain data, shared by the walk (`run`), which fills it, and the renderers (`output`), which
only read it, so that the text and the JSON forms cannot disagree about a number.

The verdict is about the end state: without `--repair`, "equal" means nothing differed; with
it, it means every difference found was repaired and re-read equal afterwards. The counts
(`differing`, `only_in_primary`, ...) always say what was found before any repair, so a run
that healed 40 documents says 40, not 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Example", "IndexResult", "Kind", "RepairCounts", "VerifyError", "VerifyResult"]

#: how one document differs
Kind = Literal["differing", "only_in_primary", "only_in_shadow"]


class VerifyError(Exception):
    """Verify could not run (bad arguments, a cluster or store that failed): exit 2."""


@dataclass(slots=True)
class Example:
    index: str
    id: str
    kind: Kind
    #: differing field paths inside `_source` (as `--ignore` takes them); empty unless differing
    fields: list[str] = field(default_factory=list)
    #: `{path: [primary value, shadow value]}` for the first paths (null: absent)
    values: dict[str, list[Any]] = field(default_factory=dict)
    #: with `--repair`: whether it is equal now
    repaired: bool | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "id": self.id,
            "kind": self.kind,
            "fields": self.fields,
        }
        if self.values:
            out["values"] = self.values
        if self.repaired is not None:
            out["repaired"] = self.repaired
        return out


@dataclass(slots=True)
class RepairCounts:
    #: documents written to the shadow from the primary (differing + only in primary)
    indexed: int = 0
    #: documents deleted from the shadow (only in shadow)
    deleted: int = 0
    #: bulk items the shadow refused
    failed: int = 0
    #: differences not attempted (no `_source` on the primary, index missing on the shadow)
    skipped: int = 0
    #: repaired documents that still differ when read back
    still_differing: int = 0

    def add(self, other: RepairCounts) -> None:
        self.indexed += other.indexed
        self.deleted += other.deleted
        self.failed += other.failed
        self.skipped += other.skipped
        self.still_differing += other.still_differing

    @property
    def remaining(self) -> int:
        """Differences that are still there after the repair."""
        return self.failed + self.skipped + self.still_differing

    def as_json(self) -> dict[str, int]:
        return {
            "indexed": self.indexed,
            "deleted": self.deleted,
            "failed": self.failed,
            "skipped": self.skipped,
            "still_differing": self.still_differing,
            "remaining": self.remaining,
        }


@dataclass(slots=True)
class IndexResult:
    """One index (or alias, for a suspect label): what was compared and found."""

    name: str
    #: `both`, `primary` or `shadow` (only there), or `neither` (a suspect key's index)
    on: str = "both"
    #: `merge` (sorted by _id), `lookup` (scroll + _mget) or `ids` (suspect keys by _mget)
    strategy: str = ""
    compared: int = 0
    equal_docs: int = 0
    only_in_primary: int = 0
    only_in_shadow: int = 0
    differing: int = 0
    #: with `--repair`
    repair: RepairCounts | None = None
    #: the whole index was walked (not only suspect ids): an `index` ledger label can resolve
    whole: bool = True

    @property
    def differences(self) -> int:
        return self.only_in_primary + self.only_in_shadow + self.differing

    @property
    def equal(self) -> bool:
        """The end state: nothing found, or everything found repaired and read back equal."""
        if self.repair is not None:
            return self.repair.remaining == 0
        return self.differences == 0

    def count(self, kind: Kind | None) -> None:
        self.compared += 1
        if kind is None:
            self.equal_docs += 1
        elif kind == "differing":
            self.differing += 1
        elif kind == "only_in_primary":
            self.only_in_primary += 1
        else:
            self.only_in_shadow += 1

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "equal": self.equal,
            "on": self.on,
            "strategy": self.strategy,
            "compared": self.compared,
            "equal_docs": self.equal_docs,
            "only_in_primary": self.only_in_primary,
            "only_in_shadow": self.only_in_shadow,
            "differing": self.differing,
        }
        if self.repair is not None:
            out["repaired"] = self.repair.as_json()
        return out


@dataclass(slots=True)
class SuspectSummary:
    #: distinct ledger labels read
    labels: int = 0
    #: labels that are not Elasticsearch keys (left alone, with a warning)
    ignored: list[str] = field(default_factory=list)
    #: labels whose index is not selected by `--index` (left alone)
    unselected: int = 0
    #: labels marked resolved in the ledger (with `--repair`)
    resolved_labels: int = 0
    #: ledger entries that became fully resolved
    resolved_entries: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "ignored": self.ignored,
            "unselected": self.unselected,
            "resolved_labels": self.resolved_labels,
            "resolved_entries": self.resolved_entries,
        }


@dataclass(slots=True)
class VerifyResult:
    primary: str
    shadow: str
    indices: list[IndexResult] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    #: set with `--repair` (the sum over indices)
    repair: RepairCounts | None = None
    #: set with `--suspects`
    suspects: SuspectSummary | None = None
    #: things a person should know that did not stop the run
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def total(self, attr: str) -> int:
        return sum(int(getattr(i, attr)) for i in self.indices)

    @property
    def equal(self) -> bool:
        return all(i.equal for i in self.indices)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "equal": self.equal,
            "compared": self.total("compared"),
            "equal_docs": self.total("equal_docs"),
            "only_in_primary": self.total("only_in_primary"),
            "only_in_shadow": self.total("only_in_shadow"),
            "differing": self.total("differing"),
            "primary": self.primary,
            "shadow": self.shadow,
            "indices": {i.name: i.as_json() for i in self.indices},
            "examples": [e.as_json() for e in self.examples],
            "repaired": self.repair.as_json() if self.repair is not None else None,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }
        if self.suspects is not None:
            out["suspects"] = self.suspects.as_json()
        return out
