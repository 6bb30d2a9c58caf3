"""`shadowlane verify`: compare what two clusters hold, document by document, and repair.

Shadowed writes leave the shadow holding what the primary holds only if every copy landed,
in order; answers compared per request cannot show a write that was dropped, reordered or
refused later. Verify reads both clusters' documents and compares their `_source`s with the
comparison engine's differ (`compare`), optionally only the keys the divergence ledger names
(`suspects`), and optionally copies the primary's documents over the shadow's (`run`). The
cluster client is `elasticsearch`; what is printed is `output`'s. See docs/verify.md.

Layer: above store, compare and config; only the CLI imports it.
"""

from shadowlane.verify.elasticsearch import Cluster, ClusterError, Doc, SortRefused
from shadowlane.verify.model import (
    Example,
    IndexResult,
    RepairCounts,
    SuspectSummary,
    VerifyError,
    VerifyResult,
)
from shadowlane.verify.output import TerminalProgress, render, render_json, render_text
from shadowlane.verify.run import KINDS, Progress, VerifyOptions, verify
from shadowlane.verify.suspects import Ledger, Suspects, parse_labels

__all__ = [
    "KINDS",
    "Cluster",
    "ClusterError",
    "Doc",
    "Example",
    "IndexResult",
    "Ledger",
    "Progress",
    "RepairCounts",
    "SortRefused",
    "SuspectSummary",
    "Suspects",
    "TerminalProgress",
    "VerifyError",
    "VerifyOptions",
    "VerifyResult",
    "parse_labels",
    "render",
    "render_json",
    "render_text",
    "verify",
]
