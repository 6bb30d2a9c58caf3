"""`shadowlane replay`: recorded traffic (GoReplay's format) sent again, paced, compared.

The recordings are read by `shadowlane.record` (the format both share); here they are selected
(`source`), paced (`pacing`), sent over the wire layer's pools (`client`), put through a
shadow's mutations and write steps when replayed as one (`runner`), compared with the engine
(`comparing`), counted and judged (`summary`), and shown (`progress`, `command`).
docs/replay.md is the user's guide.
"""

from __future__ import annotations

from shadowlane.replay.command import add_arguments, build_setup, main
from shadowlane.replay.runner import CannotRun, Lane, Lanes, Runner, Setup, TargetSpec, replay
from shadowlane.replay.summary import EXIT_CANNOT_RUN, EXIT_FAILED, EXIT_OK, Tally, Threshold

__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_FAILED",
    "EXIT_OK",
    "CannotRun",
    "Lane",
    "Lanes",
    "Runner",
    "Setup",
    "Tally",
    "TargetSpec",
    "Threshold",
    "add_arguments",
    "build_setup",
    "main",
    "replay",
]
