"""Response comparison: lifting answers to field paths, diffing, noise, aggregation, analysis.

The proxy builds `CompareJob`s (see `model`) with a `CompareSettings` from `compile_settings`
and hands them to `Comparator.submit`; everything else happens on the comparator's thread.
Readers (admin API, dashboard, `report`) see the stored sums through `Analysis`, which applies
Diffy's reporting rule.
"""

from shadowlane.compare.analysis import Analysis, ComparisonRows, is_reported, percentile
from shadowlane.compare.diff import Lifted, Multiset, diff, lift, same
from shadowlane.compare.engine import Comparator, ComparisonCounter, Outcome, evaluate, record
from shadowlane.compare.model import Captured, CompareJob
from shadowlane.compare.paths import PathMatcher
from shadowlane.compare.settings import DEFAULT_SETTINGS, CompareSettings, compile_settings

__all__ = [
    "DEFAULT_SETTINGS",
    "Analysis",
    "Captured",
    "Comparator",
    "CompareJob",
    "CompareSettings",
    "ComparisonCounter",
    "ComparisonRows",
    "Lifted",
    "Multiset",
    "Outcome",
    "PathMatcher",
    "compile_settings",
    "diff",
    "evaluate",
    "is_reported",
    "lift",
    "percentile",
    "record",
    "same",
]
