"""Comparison and divergence ledger storage: SQLite (default, embedded) and PostgreSQL (shared
by many instances).

`open_store(url, options)` picks the driver from the URL; everything else codes against `Store`:
the comparator writes `Batch`es (comparison sums and `Divergence` records) from its own thread;
the analysis (`shadowlane.compare.analysis`) reads the comparison rows from any thread for the
admin API, the dashboard and `report`, which also read the ledger (`ledger`, `ledger_counts`,
`suspect_keys`); `verify` reads the suspect keys and resolves them (`resolve_keys`). See
docs/comparison.md for the schema, retention and multi-instance notes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shadowlane.store.base import (
    SCHEMA_VERSION,
    FieldRow,
    LatencyRow,
    Store,
    StoreOptions,
    TotalsRow,
)
from shadowlane.store.batch import Batch, Example, bucket_value, latency_bucket
from shadowlane.store.ledger import (
    SCOPE_KEY,
    Divergence,
    LedgerCountRow,
    LedgerQueries,
    LedgerRow,
)
from shadowlane.store.state import AuditRecord, StateRow

if TYPE_CHECKING:
    from shadowlane.config import CompareConfig

__all__ = [
    "SCHEMA_VERSION",
    "SCOPE_KEY",
    "AuditRecord",
    "Batch",
    "Divergence",
    "Example",
    "FieldRow",
    "LatencyRow",
    "LedgerCountRow",
    "LedgerQueries",
    "LedgerRow",
    "StateRow",
    "Store",
    "StoreOptions",
    "TotalsRow",
    "bucket_value",
    "latency_bucket",
    "open_store",
    "options_from_config",
]


def options_from_config(cfg: CompareConfig) -> StoreOptions:
    """The store-side part of the `compare:` config block (`thresholds` are the analysis')."""
    return StoreOptions(examples_per_field=cfg.examples_per_field, retention=cfg.retention)


def open_store(
    url: str,
    options: StoreOptions | CompareConfig | None = None,
    *,
    wait_for_server: bool = False,
) -> Store:
    """Open (creating tables if needed) the store at `url`.

    `wait_for_server`: a database server that cannot be reached now is not an error (see
    `PostgresStore`); a restarted worker opens its store this way.

    `sqlite:///relative.db`, `sqlite:////absolute/path.db`, `sqlite:///:memory:` (tests), or
    `postgresql://user:password@host:port/db` (needs the `psycopg` package). `options` is a
    `StoreOptions` or the config's `CompareConfig`; defaults when left out.
    """
    if options is not None and not isinstance(options, StoreOptions):
        options = options_from_config(options)
    if url.startswith("sqlite:///"):
        from shadowlane.store.sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:///") :], options)
    if url.startswith(("postgresql://", "postgres://")):
        from shadowlane.store.postgres import PostgresStore

        return PostgresStore(url, options, wait_for_server=wait_for_server)
    raise ValueError(f"unknown store URL {url!r}: use sqlite:///PATH or postgresql://...")
