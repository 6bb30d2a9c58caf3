"""The names of what happens to a shadow copy, in one place.

They are label values of `shadowlane_shadow_requests_total{outcome}` (DESIGN.md's contract),
written by the ticket, the lanes and the copies and validated by metrics, so a name spelt two
ways would silently split a series. Each is a `Final` literal: mypy checks every call of
`Metrics.shadow_outcome` against `Outcome`, and mypyc inlines them as constants.

This module imports nothing, so metrics can take the vocabulary from here without importing
the rest of the shadow package.
"""

from __future__ import annotations

from typing import Final, Literal

SAMPLED_OUT: Final = "sampled_out"
SENT: Final = "sent"
OK: Final = "ok"
ERROR: Final = "error"
TIMEOUT: Final = "timeout"
DROPPED: Final = "dropped"
SKIPPED_BODY: Final = "skipped_body"
SKIPPED_LOOP: Final = "skipped_loop"
SKIPPED_STATUS: Final = "skipped_status"
#: not sent: the copy is built from the primary's answer (ids), and that answer is unusable
SKIPPED_ANSWER: Final = "skipped_answer"
#: not sent: an `Upgrade` request (WebSocket) is never tunnelled to a shadow, and this shadow
#: does not take the handshake alone (`upgrades: handshake`)
SKIPPED_UPGRADE: Final = "skipped_upgrade"
#: not sent: this shadow's backend answered the request as its primary (a weighted split, a
#: migration's flip): a copy would compare the backend with itself, or write twice
SKIPPED_PRIMARY: Final = "skipped_primary"
#: not copied: the overload manager sheds shadow work (memory or in-flight watermark passed)
SHED: Final = "shed"
#: a streamed copy (`stream_body`) cut short: the shadow fell behind the primary by more than
#: its bound, failed while the body was still streaming, or the client's body was cut; its
#: connection is closed, never pooled (replaces `ok`/`error`/`timeout` for that copy)
ABORTED: Final = "aborted"

#: a value of the `outcome` label; tests check it lists exactly SHADOW_OUTCOMES
Outcome = Literal[
    "sampled_out",
    "sent",
    "ok",
    "error",
    "timeout",
    "dropped",
    "skipped_body",
    "skipped_loop",
    "skipped_status",
    "skipped_answer",
    "skipped_upgrade",
    "skipped_primary",
    "shed",
    "aborted",
]

#: every outcome, in the order docs/metrics.md lists them. The first seven are the DESIGN.md
#: contract; the `skipped_*` reasons were added by the dispatcher and the write steps (the
#: contract is a floor)
SHADOW_OUTCOMES: Final[tuple[Outcome, ...]] = (
    SAMPLED_OUT,
    SENT,
    OK,
    ERROR,
    TIMEOUT,
    DROPPED,
    SKIPPED_BODY,
    SKIPPED_LOOP,
    SKIPPED_STATUS,
    SKIPPED_ANSWER,
    SKIPPED_UPGRADE,
    SKIPPED_PRIMARY,
    SHED,
    ABORTED,
)

#: How one copy that was handed to a lane ended (`ShadowResult.outcome`), which is what a
#: comparison hears: one of OK, ERROR, TIMEOUT, or CIRCUIT_OPEN for a copy the breaker shed.
#: CIRCUIT_OPEN is not a label value (it is counted DROPPED): it says nothing about the
#: target's answers, so such a copy is never compared. PENDING is the value before the end.
CIRCUIT_OPEN: Final = "circuit_open"
PENDING: Final = ""
#: COPY_DROPPED: a copy that waited (for a slot or its keys) and was dropped at a drain's end
COPY_DROPPED: Final = "dropped"
CopyEnd = Literal["", "ok", "error", "timeout", "circuit_open", "dropped", "aborted"]
#: how a copy that went to the target ended (`aborted`: only a streamed copy)
Ended = Literal["ok", "error", "timeout", "aborted"]

#: the comparison result counted for a request whose comparison cannot happen (a copy not
#: sent, a secondary that failed); the other results are the comparator's
COMPARISON_DROPPED: Final = "dropped"

#: Why a copy of an ordered scope may have left the target in another state than the primary:
#: the `reason` of a divergence ledger entry and of `shadowlane_divergences_total{reason}`.
#:   dropped             not sent: the lane's queue or byte bound was full, or its circuit open
#:   skipped_body        not sent: the body was too big to keep or never complete
#:   error, timeout      sent, but no answer (the write may or may not have been applied)
#:   status_mismatch     one side answered 2xx and the other did not
#:   bulk_item           a `_bulk` item succeeded on one side and failed on the other
#:   primary_unusable    the primary's answer was needed (ids) but was cut, not JSON, or did
#:                       not match the request; the copy was not guessed at, not sent
#:   primary_incomplete  the client left mid-exchange: whether the primary applied it is unknown
#:   answer_unusable     the target's answer was needed to check items but was cut or not JSON
DIV_DROPPED: Final = "dropped"
DIV_SKIPPED_BODY: Final = "skipped_body"
DIV_ERROR: Final = "error"
DIV_TIMEOUT: Final = "timeout"
DIV_STATUS: Final = "status_mismatch"
DIV_BULK_ITEM: Final = "bulk_item"
DIV_PRIMARY_UNUSABLE: Final = "primary_unusable"
DIV_PRIMARY_INCOMPLETE: Final = "primary_incomplete"
DIV_ANSWER_UNUSABLE: Final = "answer_unusable"
DivergenceReason = Literal[
    "dropped",
    "skipped_body",
    "error",
    "timeout",
    "status_mismatch",
    "bulk_item",
    "primary_unusable",
    "primary_incomplete",
    "answer_unusable",
]
DIVERGENCE_REASONS: Final[tuple[DivergenceReason, ...]] = (
    DIV_DROPPED,
    DIV_SKIPPED_BODY,
    DIV_ERROR,
    DIV_TIMEOUT,
    DIV_STATUS,
    DIV_BULK_ITEM,
    DIV_PRIMARY_UNUSABLE,
    DIV_PRIMARY_INCOMPLETE,
    DIV_ANSWER_UNUSABLE,
)
