"""The store: comparison aggregates, example pairs and the divergence ledger in SQL, the same
schema on SQLite and PostgreSQL.

Why one SQL implementation with two thin drivers: the schema and every statement are plain
portable SQL (UPSERT with `ON CONFLICT ... DO UPDATE SET n = t.n + excluded.n`, `RETURNING`,
`LIMIT`), so a result means the same in the embedded default and in the shared PostgreSQL. The
drivers differ only in how they connect, their parameter style and their auto-increment column.

Concurrency: writes come from one thread (the comparator's), on the writer connection. Queries
come from any thread (admin API, dashboard, `report`) on a separate reader connection, each under
its own lock, so a long query never waits for a flush and a flush never waits for a query.
Aggregates are increments, so many writers (instances) add up instead of overwriting each other.

Why queries return rows and not reports: which field is reported, and every rate and percentile,
is Diffy's analysis step (`shadowlane.compare.analysis`), which applies the configured thresholds
to these rows. The store keeps sums; it never decides what they mean, so a threshold lives in one
place and the same rows can be judged by any thresholds.

The divergence ledger (`Divergence` records, written with the batch that carries them) is the
other half: not sums but evidence, one row per copy that may have left a shadow unlike its
primary and one row per (entry, key) with `resolved_at` NULL while the key is suspect. It is
appended to and resolved, never summed; `open_keys` on the entry counts its unresolved keys, so
many resolvers (instances, `verify --repair` runs) decrement it atomically and exactly one of
them sees it reach 0. Retention never sweeps an open entry.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson

from shadowlane.store.batch import Batch, Example
from shadowlane.store.ledger import SCOPE_KEY, Divergence, LedgerCountRow, LedgerRow
from shadowlane.store.state import AuditRecord, StateRow, state_schema

log = logging.getLogger("shadowlane.store")

#: bumped when the schema changes; stored in shadowlane_meta (`schema`). Every change so far
#: only added tables (`CREATE ... IF NOT EXISTS`), so opening an older store upgrades it in
#: place and an older shadowlane still reads a newer one (it ignores the tables it does not
#: know). 1: comparisons; 2: + the divergence ledger; 3: + shared state, audit log, leases.
SCHEMA_VERSION = 3

#: keys per statement of `resolve_keys` (an IN list; SQLite allows 32766 parameters)
RESOLVE_CHUNK = 500


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Store-side rules: how many examples to keep, and for how long."""

    examples_per_field: int = 5
    retention: float = 7 * 86400.0
    extra: dict[str, Any] = field(default_factory=dict)


class TotalsRow(NamedTuple):
    """Requests compared on one (route, target), by their result (`shadowlane_totals`)."""

    route: str
    target: str
    compared: int
    matched: int
    differing: int
    noise: int


class FieldRow(NamedTuple):
    """One field of a (route, target): requests where it differed primary vs candidate (`raw`)
    and primary vs secondary (`noise`), Diffy's raw and noise counters in one row."""

    route: str
    target: str
    field: str
    raw: int
    noise: int


class LatencyRow(NamedTuple):
    """Answers of one side (`primary`/`shadow`) of a (route, target) in one latency bucket."""

    route: str
    target: str
    side: str
    bucket: int
    n: int


class Cursor(Protocol):
    """The part of a DB-API cursor used here (sqlite3 and psycopg both provide it)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...
    def executemany(self, sql: Any, params_seq: Any, /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


class Store(ABC):
    """Comparison results. Write from one thread; query from any."""

    #: `sqlite` or `postgresql`
    kind: str = ""

    def __init__(self, options: StoreOptions | None = None) -> None:
        self.options = options or StoreOptions()

    # -- writing (comparator thread) -----------------------------------------------------------

    @abstractmethod
    def write(self, batch: Batch) -> None:
        """Add a batch's increments and examples in one transaction, then trim examples."""

    @abstractmethod
    def sweep(self, now: float | None = None) -> int:
        """Delete examples older than the retention, and ledger entries resolved longer ago
        than it (never an open one); returns how many examples and entries went."""

    @abstractmethod
    def resolve_keys(
        self,
        keys: Iterable[str],
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        ts: float | None = None,
    ) -> int:
        """Mark the suspect (entry, key) rows of `keys` resolved at `ts` (now by default),
        optionally only those of `route`/`target`/`scope`; returns how many entries became
        fully resolved (their last open key was among `keys`). Any thread; it writes."""

    @abstractmethod
    def clear_ledger(self) -> None:
        """Forget every divergence ledger entry, open or resolved (`clear()` keeps them)."""

    # -- queries (any thread) ------------------------------------------------------------------

    @abstractmethod
    def totals(self, route: str | None = None, target: str | None = None) -> list[TotalsRow]:
        """Totals per (route, target), ordered by route then target; optionally only those of
        `route` and/or `target`."""

    @abstractmethod
    def field_counts(self, route: str | None = None, target: str | None = None) -> list[FieldRow]:
        """Raw and noise counts per field, in no particular order; optionally filtered."""

    @abstractmethod
    def latency_counts(
        self, route: str | None = None, target: str | None = None
    ) -> list[LatencyRow]:
        """Latency bucket counts per (route, target, side), in no particular order."""

    @abstractmethod
    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Newest example pairs of a (route, target), optionally only those showing `field`."""

    @abstractmethod
    def ledger(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        reason: str | None = None,
        include_resolved: bool = False,
        limit: int = 100,
    ) -> list[LedgerRow]:
        """Ledger entries, newest first (ts, then id): open ones only unless
        `include_resolved`; each filter narrows when given."""

    @abstractmethod
    def ledger_counts(
        self,
        route: str | None = None,
        target: str | None = None,
        include_resolved: bool = False,
        *,
        scope: str | None = None,
    ) -> list[LedgerCountRow]:
        """Entries per (route, target, reason), open ones only unless `include_resolved`,
        ordered by route, target, reason."""

    @abstractmethod
    def suspect_keys(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        *,
        limit: int | None = None,
    ) -> list[str]:
        """The distinct labels still suspect (an open (entry, key) row), sorted; at most
        `limit` of them when given."""

    # -- shared state (schema 3; any thread, blocking: call it off the event loop; a
    # store without it, like a test's wrapper, refuses) ---

    def read_states(self, prefix: str = "") -> list[StateRow]:
        """Every shared document whose name starts with `prefix`."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    def state_versions(self, prefix: str = "") -> dict[str, int]:
        """name -> version of the shared documents under `prefix` (the cheap poll)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    def write_state(self, name: str, data: str, expect: int | None = None) -> int | None:
        """Write a document; its new version, or None when `expect` (the version the writer
        read; 0 for "must not exist yet") is not the stored one any more."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    def append_audit(self, record: AuditRecord) -> int:
        """Add one audit record; its id."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    def audit(self, migration: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """Audit records, newest first, optionally of one migration."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    def acquire_lease(self, name: str, holder: str, ttl: float, now: float | None = None) -> bool:
        """Take or renew the lease `name` for `holder` until now + `ttl`; True when held."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up if `holder` has it (a clean stop hands over at once)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared state")

    @abstractmethod
    def clear(self) -> None:
        """Forget every comparison result (a new migration attempt starts from zero). The
        divergence ledger is kept: it is evidence about the shadow's data, which a reset of
        the comparison counts does not repair (`clear_ledger()` forgets it)."""

    @abstractmethod
    def close(self) -> None:
        """Close connections; the store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# SQL shared by both drivers

#: the comparison tables (what `clear()` empties, but for shadowlane_meta)
TABLES = (
    "shadowlane_totals",
    "shadowlane_fields",
    "shadowlane_latency",
    "shadowlane_example_fields",
    "shadowlane_examples",
    "shadowlane_meta",
)
#: the divergence ledger's tables (schema 2; what `clear_ledger()` empties)
LEDGER_TABLES = ("shadowlane_ledger_keys", "shadowlane_ledger")


def schema(id_column: str) -> list[str]:
    """CREATE statements; `id_column` is the driver's auto-increment primary key definition."""
    return [
        "CREATE TABLE IF NOT EXISTS shadowlane_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS shadowlane_totals (
            route TEXT NOT NULL, target TEXT NOT NULL,
            compared BIGINT NOT NULL, matched BIGINT NOT NULL,
            differing BIGINT NOT NULL, noise BIGINT NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (route, target))""",
        """CREATE TABLE IF NOT EXISTS shadowlane_fields (
            route TEXT NOT NULL, target TEXT NOT NULL, field TEXT NOT NULL,
            raw BIGINT NOT NULL, noise BIGINT NOT NULL,
            PRIMARY KEY (route, target, field))""",
        """CREATE TABLE IF NOT EXISTS shadowlane_latency (
            route TEXT NOT NULL, target TEXT NOT NULL, side TEXT NOT NULL,
            bucket INTEGER NOT NULL, n BIGINT NOT NULL,
            PRIMARY KEY (route, target, side, bucket))""",
        f"""CREATE TABLE IF NOT EXISTS shadowlane_examples (
            id {id_column},
            route TEXT NOT NULL, target TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL, method TEXT NOT NULL, uri TEXT NOT NULL,
            data TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS shadowlane_example_fields (
            route TEXT NOT NULL, target TEXT NOT NULL, field TEXT NOT NULL,
            example_id BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (route, target, field, example_id))""",
        "CREATE INDEX IF NOT EXISTS shadowlane_example_fields_example "
        "ON shadowlane_example_fields (example_id)",
        "CREATE INDEX IF NOT EXISTS shadowlane_example_fields_ts ON shadowlane_example_fields (ts)",
        "CREATE INDEX IF NOT EXISTS shadowlane_examples_route "
        "ON shadowlane_examples (route, target, ts)",
        *ledger_schema(id_column),
        *state_schema(id_column),
    ]


def ledger_schema(id_column: str) -> list[str]:
    """The divergence ledger (schema 2): entries, and their keys with a resolution time each.

    The key rows repeat route, target and scope so that "which keys are suspect here" and
    "resolve these keys there" read one table through one index. The partial indexes cover
    only what is open, which is what every frequent query asks for; the ledger's resolved
    history then costs them nothing.
    """
    return [
        f"""CREATE TABLE IF NOT EXISTS shadowlane_ledger (
            id {id_column},
            ts DOUBLE PRECISION NOT NULL,
            route TEXT NOT NULL, target TEXT NOT NULL, scope TEXT NOT NULL,
            reason TEXT NOT NULL,
            request_id TEXT NOT NULL, method TEXT NOT NULL, uri TEXT NOT NULL,
            detail TEXT NOT NULL,
            open_keys INTEGER NOT NULL,
            resolved_at DOUBLE PRECISION)""",
        """CREATE TABLE IF NOT EXISTS shadowlane_ledger_keys (
            entry_id BIGINT NOT NULL, pos INTEGER NOT NULL, key TEXT NOT NULL,
            route TEXT NOT NULL, target TEXT NOT NULL, scope TEXT NOT NULL,
            resolved_at DOUBLE PRECISION,
            PRIMARY KEY (entry_id, key))""",
        "CREATE INDEX IF NOT EXISTS shadowlane_ledger_open "
        "ON shadowlane_ledger (route, target, ts) WHERE resolved_at IS NULL",
        "CREATE INDEX IF NOT EXISTS shadowlane_ledger_ts ON shadowlane_ledger (ts)",
        "CREATE INDEX IF NOT EXISTS shadowlane_ledger_resolved "
        "ON shadowlane_ledger (resolved_at) WHERE resolved_at IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS shadowlane_ledger_keys_open "
        "ON shadowlane_ledger_keys (key, route, target, scope) WHERE resolved_at IS NULL",
        "CREATE INDEX IF NOT EXISTS shadowlane_ledger_keys_suspect "
        "ON shadowlane_ledger_keys (route, target, scope, key) WHERE resolved_at IS NULL",
    ]


_UPSERT_TOTALS = """
INSERT INTO shadowlane_totals (route, target, compared, matched, differing, noise, updated)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (route, target) DO UPDATE SET
    compared = shadowlane_totals.compared + excluded.compared,
    matched = shadowlane_totals.matched + excluded.matched,
    differing = shadowlane_totals.differing + excluded.differing,
    noise = shadowlane_totals.noise + excluded.noise,
    updated = excluded.updated
"""

_UPSERT_FIELDS = """
INSERT INTO shadowlane_fields (route, target, field, raw, noise) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (route, target, field) DO UPDATE SET
    raw = shadowlane_fields.raw + excluded.raw,
    noise = shadowlane_fields.noise + excluded.noise
"""

_UPSERT_LATENCY = """
INSERT INTO shadowlane_latency (route, target, side, bucket, n) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (route, target, side, bucket) DO UPDATE SET n = shadowlane_latency.n + excluded.n
"""

_INSERT_EXAMPLE = """
INSERT INTO shadowlane_examples (route, target, ts, request_id, method, uri, data)
VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id
"""

_INSERT_EXAMPLE_FIELD = """
INSERT INTO shadowlane_example_fields (route, target, field, example_id, ts)
VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING
"""

# Keep the newest N links of one field; older links go, then examples nothing links to.
_TRIM_FIELD = """
DELETE FROM shadowlane_example_fields
WHERE route = ? AND target = ? AND field = ? AND example_id NOT IN (
    SELECT example_id FROM shadowlane_example_fields
    WHERE route = ? AND target = ? AND field = ?
    ORDER BY ts DESC, example_id DESC LIMIT ?)
"""

_DELETE_ORPHANS = """
DELETE FROM shadowlane_examples WHERE NOT EXISTS (
    SELECT 1 FROM shadowlane_example_fields f WHERE f.example_id = shadowlane_examples.id)
"""

_SWEEP = "DELETE FROM shadowlane_example_fields WHERE ts < ?"

_INSERT_LEDGER = """
INSERT INTO shadowlane_ledger
    (ts, route, target, scope, reason, request_id, method, uri, detail, open_keys, resolved_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL) RETURNING id
"""

_INSERT_LEDGER_KEY = """
INSERT INTO shadowlane_ledger_keys (entry_id, pos, key, route, target, scope, resolved_at)
VALUES (?, ?, ?, ?, ?, ?, NULL)
"""

# Resolved entries past the retention go, keys first (nothing else references an entry).
_SWEEP_LEDGER_KEYS = """
DELETE FROM shadowlane_ledger_keys WHERE entry_id IN (
    SELECT id FROM shadowlane_ledger WHERE resolved_at IS NOT NULL AND resolved_at < ?)
"""
_SWEEP_LEDGER = "DELETE FROM shadowlane_ledger WHERE resolved_at IS NOT NULL AND resolved_at < ?"

# One decrement per entry: concurrent resolvers (instances, verify runs) each subtract the keys
# they resolved, the row lock orders them, and the one that brings it to 0 stamps resolved_at.
_RESOLVE_ENTRY = """
UPDATE shadowlane_ledger SET
    open_keys = open_keys - ?,
    resolved_at = CASE WHEN open_keys - ? <= 0 THEN ? ELSE resolved_at END
WHERE id = ? AND resolved_at IS NULL
RETURNING open_keys
"""


def _text(data: str | bytes) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def _clean(value: str) -> str:
    """Text PostgreSQL can store: it refuses NUL in TEXT, and one such key (a document id is
    anybody's string) must not fail the whole batch with it. Both drivers do the same, so a
    key reads back the same from either."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def ledger_keys(d: Divergence) -> list[str]:
    """An entry's keys as stored: cleaned, each once, in order; `*` when it names none."""
    keys = list(dict.fromkeys(_clean(k) for k in d.keys))
    return keys or [SCOPE_KEY]


class SqlStore(Store):
    """The shared implementation; a driver supplies connections, placeholders and retries."""

    #: DB-API parameter marker of the driver; statements are written with `?`
    placeholder = "?"

    def __init__(self, options: StoreOptions | None = None) -> None:
        super().__init__(options)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False

    # -- driver hooks --------------------------------------------------------------------------

    @abstractmethod
    def _writer(self) -> Any:
        """The writer connection (opened or reopened on demand)."""

    @abstractmethod
    def _reader(self) -> Any:
        """The reader connection (opened or reopened on demand)."""

    @abstractmethod
    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[Cursor]:
        """A cursor inside one transaction, committed on exit, rolled back on error."""

    def _reset(self, which: str) -> None:
        """Forget a broken connection (`writer`/`reader`) so the next use reconnects."""

    def _retryable(self, exc: BaseException) -> bool:
        """Errors worth one more try of the whole transaction (deadlock, lost connection)."""
        return False

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _create_schema(self, cur: Cursor, id_column: str) -> None:
        """Create what is missing and record the schema version, inside the driver's opening
        transaction. An older store gets the new tables and its version raised; a newer one
        (written by a later shadowlane) is used as it is, its version left alone."""
        for statement in schema(id_column):
            cur.execute(statement)
        cur.execute(self._q("SELECT value FROM shadowlane_meta WHERE key = 'schema'"))
        row = cur.fetchone()
        if row is None:
            cur.execute(
                self._q("INSERT INTO shadowlane_meta (key, value) VALUES ('schema', ?)"),
                (str(SCHEMA_VERSION),),
            )
            return
        try:
            found = int(row[0])
        except ValueError:
            found = 0
        if found < SCHEMA_VERSION:
            log.info("store %s: schema %s upgraded to %d", self.kind, row[0], SCHEMA_VERSION)
            cur.execute(
                self._q("UPDATE shadowlane_meta SET value = ? WHERE key = 'schema'"),
                (str(SCHEMA_VERSION),),
            )
        elif found > SCHEMA_VERSION:
            log.warning(
                "store %s has schema %d, newer than this shadowlane's %d: using the tables "
                "it knows",
                self.kind,
                found,
                SCHEMA_VERSION,
            )

    # -- writing -------------------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        if not batch:
            return
        examples = batch.examples()
        with self._write_lock:
            self._with_retries("writer", lambda cur: self._write(cur, batch, examples))

    def _with_retries(self, which: str, work: Any) -> Any:
        attempts = 3
        for attempt in range(1, attempts + 1):
            conn = self._writer() if which == "writer" else self._reader()
            try:
                with self._transaction(conn) as cur:
                    return work(cur)
            except Exception as exc:
                if attempt == attempts or not self._retryable(exc):
                    raise
                log.warning("store %s: retrying after %s", self.kind, exc)
                self._reset(which)
                time.sleep(0.05 * attempt)
        return None

    def _write(self, cur: Cursor, batch: Batch, examples: list[tuple[Example, list[str]]]) -> None:
        now = time.time()
        # Sorted keys: two instances upserting the same rows lock them in the same order, so
        # PostgreSQL never has to break a deadlock between them.
        for (route, target), (compared, matched, differing, noise) in sorted(batch.totals.items()):
            cur.execute(
                self._q(_UPSERT_TOTALS), (route, target, compared, matched, differing, noise, now)
            )
        for (route, target, path), (raw, noise) in sorted(batch.fields.items()):
            cur.execute(self._q(_UPSERT_FIELDS), (route, target, path, raw, noise))
        for (route, target, side, bucket), n in sorted(batch.latency.items()):
            cur.execute(self._q(_UPSERT_LATENCY), (route, target, side, bucket, n))
        for d in batch.divergences:
            self._write_divergence(cur, d)
        if self.options.examples_per_field <= 0 or not examples:
            return
        touched: set[tuple[str, str, str]] = set()
        for example, paths in examples:
            data = orjson.dumps(example.data()).decode()
            cur.execute(
                self._q(_INSERT_EXAMPLE),
                (
                    example.route,
                    example.target,
                    example.ts,
                    example.request_id,
                    example.method,
                    example.uri,
                    data,
                ),
            )
            example_id = cur.fetchone()[0]
            for path in paths:
                cur.execute(
                    self._q(_INSERT_EXAMPLE_FIELD),
                    (example.route, example.target, path, example_id, example.ts),
                )
                touched.add((example.route, example.target, path))
        keep = self.options.examples_per_field
        for route, target, path in sorted(touched):
            cur.execute(self._q(_TRIM_FIELD), (route, target, path, route, target, path, keep))
        cur.execute(self._q(_DELETE_ORPHANS))

    def _write_divergence(self, cur: Cursor, d: Divergence) -> None:
        keys = ledger_keys(d)
        route, target, scope = _clean(d.route), _clean(d.target), _clean(d.scope)
        cur.execute(
            self._q(_INSERT_LEDGER),
            (
                d.ts,
                route,
                target,
                scope,
                _clean(d.reason),
                _clean(d.request_id),
                _clean(d.method),
                _clean(d.uri),
                _clean(d.detail),
                len(keys),
            ),
        )
        entry_id = cur.fetchone()[0]
        cur.executemany(
            self._q(_INSERT_LEDGER_KEY),
            [(entry_id, pos, key, route, target, scope) for pos, key in enumerate(keys)],
        )

    def sweep(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.options.retention

        def work(cur: Cursor) -> int:
            cur.execute(self._q(_SWEEP), (cutoff,))
            deleted = max(0, cur.rowcount or 0)
            cur.execute(self._q(_DELETE_ORPHANS))
            # open entries are evidence until a repair resolves them: never swept
            cur.execute(self._q(_SWEEP_LEDGER_KEYS), (cutoff,))
            cur.execute(self._q(_SWEEP_LEDGER), (cutoff,))
            return int(deleted) + max(0, cur.rowcount or 0)

        with self._write_lock:
            return int(self._with_retries("writer", work) or 0)

    def clear(self) -> None:
        def work(cur: Cursor) -> None:
            for table in TABLES:
                if table != "shadowlane_meta":
                    cur.execute(f"DELETE FROM {table}")

        with self._write_lock:
            self._with_retries("writer", work)

    def clear_ledger(self) -> None:
        def work(cur: Cursor) -> None:
            for table in LEDGER_TABLES:
                cur.execute(f"DELETE FROM {table}")

        with self._write_lock:
            self._with_retries("writer", work)

    def resolve_keys(
        self,
        keys: Iterable[str],
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        ts: float | None = None,
    ) -> int:
        wanted = sorted({_clean(k) for k in keys})
        if not wanted:
            return 0
        when = time.time() if ts is None else ts
        narrow = ""
        narrow_params: list[str] = []
        for column, value in (("route", route), ("target", target), ("scope", scope)):
            if value is not None:
                narrow += f" AND {column} = ?"
                narrow_params.append(value)

        def work(cur: Cursor) -> int:
            resolved_per_entry: dict[int, int] = {}
            for start in range(0, len(wanted), RESOLVE_CHUNK):
                chunk = wanted[start : start + RESOLVE_CHUNK]
                marks = ", ".join("?" * len(chunk))
                # `resolved_at IS NULL` is checked again on the locked row, so a key that two
                # resolvers race for is resolved (and counted) once
                cur.execute(
                    self._q(
                        "UPDATE shadowlane_ledger_keys SET resolved_at = ? "
                        f"WHERE resolved_at IS NULL AND key IN ({marks}){narrow} "
                        "RETURNING entry_id"
                    ),
                    (when, *chunk, *narrow_params),
                )
                for (entry_id,) in cur.fetchall():
                    resolved_per_entry[int(entry_id)] = resolved_per_entry.get(int(entry_id), 0) + 1
            closed = 0
            # in id order: two resolvers lock shared entries in the same order
            for entry_id, n in sorted(resolved_per_entry.items()):
                cur.execute(self._q(_RESOLVE_ENTRY), (n, n, when, entry_id))
                row = cur.fetchone()
                if row is not None and int(row[0]) <= 0:
                    closed += 1
            return closed

        with self._write_lock:
            return int(self._with_retries("writer", work) or 0)

    # -- shared state ----------------------------------------------------------------------------

    def read_states(self, prefix: str = "") -> list[StateRow]:
        rows = self._read(
            "SELECT name, version, data, updated FROM shadowlane_state WHERE name LIKE ? "
            "ORDER BY name",
            (prefix + "%",),
        )
        return [StateRow(n, int(v), _text(d), float(u)) for n, v, d, u in rows]

    def state_versions(self, prefix: str = "") -> dict[str, int]:
        rows = self._read(
            "SELECT name, version FROM shadowlane_state WHERE name LIKE ?", (prefix + "%",)
        )
        return {n: int(v) for n, v in rows}

    def write_state(self, name: str, data: str, expect: int | None = None) -> int | None:
        now = time.time()

        def work(cur: Cursor) -> int | None:
            if expect == 0:
                cur.execute(
                    self._q(
                        "INSERT INTO shadowlane_state (name, version, data, updated) "
                        "VALUES (?, 1, ?, ?) ON CONFLICT (name) DO NOTHING RETURNING version"
                    ),
                    (name, data, now),
                )
            elif expect is None:
                cur.execute(
                    self._q(
                        "INSERT INTO shadowlane_state (name, version, data, updated) "
                        "VALUES (?, 1, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                        "version = shadowlane_state.version + 1, data = excluded.data, "
                        "updated = excluded.updated RETURNING version"
                    ),
                    (name, data, now),
                )
            else:
                cur.execute(
                    self._q(
                        "UPDATE shadowlane_state SET version = version + 1, data = ?, "
                        "updated = ? WHERE name = ? AND version = ? RETURNING version"
                    ),
                    (data, now, name, expect),
                )
            row = cur.fetchone()
            return None if row is None else int(row[0])

        with self._write_lock:
            result = self._with_retries("writer", work)
        return None if result is None else int(result)

    def append_audit(self, record: AuditRecord) -> int:
        def work(cur: Cursor) -> int:
            cur.execute(
                self._q(
                    "INSERT INTO shadowlane_audit (ts, migration, from_stage, to_stage, actor, "
                    "action, reason, gates) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
                ),
                (
                    record.ts,
                    _clean(record.migration),
                    _clean(record.from_stage),
                    _clean(record.to_stage),
                    _clean(record.actor),
                    _clean(record.action),
                    _clean(record.reason),
                    orjson.dumps(list(record.gates)).decode(),
                ),
            )
            return int(cur.fetchone()[0])

        with self._write_lock:
            return int(self._with_retries("writer", work))

    def audit(self, migration: str | None = None, limit: int = 100) -> list[AuditRecord]:
        where, params = ("", []) if migration is None else (" WHERE migration = ?", [migration])
        rows = self._read(
            "SELECT id, ts, migration, from_stage, to_stage, actor, action, reason, gates "
            f"FROM shadowlane_audit{where} ORDER BY ts DESC, id DESC LIMIT ?",
            (*params, max(0, int(limit))),
        )
        return [
            AuditRecord(
                float(ts), m, f, t, actor, action, reason, tuple(orjson.loads(_text(g))), int(i)
            )
            for i, ts, m, f, t, actor, action, reason, g in rows
        ]

    def acquire_lease(self, name: str, holder: str, ttl: float, now: float | None = None) -> bool:
        when = time.time() if now is None else now

        def work(cur: Cursor) -> bool:
            # one statement: taken when free, expired, or ours already; the row lock orders
            # two instances racing for it
            cur.execute(
                self._q(
                    "INSERT INTO shadowlane_lease (name, holder, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                    "expires = excluded.expires "
                    "WHERE shadowlane_lease.holder = excluded.holder "
                    "OR shadowlane_lease.expires < ? RETURNING holder"
                ),
                (name, holder, when + ttl, when),
            )
            row = cur.fetchone()
            return row is not None and row[0] == holder

        with self._write_lock:
            return bool(self._with_retries("writer", work))

    def release_lease(self, name: str, holder: str) -> None:
        def work(cur: Cursor) -> None:
            cur.execute(
                self._q("DELETE FROM shadowlane_lease WHERE name = ? AND holder = ?"),
                (name, holder),
            )

        with self._write_lock:
            self._with_retries("writer", work)

    # -- queries -------------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        def work(cur: Cursor) -> list[Any]:
            cur.execute(self._q(sql), tuple(params))
            return list(cur.fetchall())

        with self._read_lock:
            result = self._read_retrying(work)
        return list(result or [])

    def _read_work(self, work: Any) -> Any:
        """Several statements in one read transaction (one snapshot on PostgreSQL)."""
        with self._read_lock:
            return self._read_retrying(work)

    def _read_retrying(self, work: Any) -> Any:
        try:
            with self._transaction(self._reader()) as cur:
                return work(cur)
        except Exception as exc:
            if not self._retryable(exc):
                raise
            self._reset("reader")
            with self._transaction(self._reader()) as cur:
                return work(cur)

    @staticmethod
    def _where(route: str | None, target: str | None) -> tuple[str, tuple[str, ...]]:
        clauses: list[str] = []
        params: list[str] = []
        for column, value in (("route", route), ("target", target)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)

    def totals(self, route: str | None = None, target: str | None = None) -> list[TotalsRow]:
        where, params = self._where(route, target)
        rows = self._read(
            "SELECT route, target, compared, matched, differing, noise FROM shadowlane_totals"
            f"{where} ORDER BY route, target",
            params,
        )
        return [
            TotalsRow(r, t, int(compared), int(matched), int(differing), int(noise))
            for r, t, compared, matched, differing, noise in rows
        ]

    def field_counts(self, route: str | None = None, target: str | None = None) -> list[FieldRow]:
        where, params = self._where(route, target)
        rows = self._read(
            f"SELECT route, target, field, raw, noise FROM shadowlane_fields{where}", params
        )
        return [FieldRow(r, t, path, int(raw), int(noise)) for r, t, path, raw, noise in rows]

    def latency_counts(
        self, route: str | None = None, target: str | None = None
    ) -> list[LatencyRow]:
        where, params = self._where(route, target)
        rows = self._read(
            f"SELECT route, target, side, bucket, n FROM shadowlane_latency{where}", params
        )
        return [LatencyRow(r, t, side, int(bucket), int(n)) for r, t, side, bucket, n in rows]

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        limit = max(0, int(limit))
        if field is None:
            rows = self._read(
                "SELECT id, ts, request_id, method, uri, data FROM shadowlane_examples "
                "WHERE route = ? AND target = ? ORDER BY ts DESC, id DESC LIMIT ?",
                (route, target, limit),
            )
        else:
            rows = self._read(
                "SELECT e.id, e.ts, e.request_id, e.method, e.uri, e.data "
                "FROM shadowlane_example_fields f "
                "JOIN shadowlane_examples e ON e.id = f.example_id "
                "WHERE f.route = ? AND f.target = ? AND f.field = ? "
                "ORDER BY f.ts DESC, f.example_id DESC LIMIT ?",
                (route, target, field, limit),
            )
        out = []
        for ident, ts, request_id, method, uri, data in rows:
            doc = orjson.loads(_text(data))
            out.append(
                {
                    "id": int(ident),
                    "route": route,
                    "target": target,
                    "request_id": request_id,
                    "ts": float(ts),
                    "method": method,
                    "uri": uri,
                    "request_body": doc.get("request_body", ""),
                    "primary": doc.get("primary", {}),
                    "candidate": doc.get("candidate", {}),
                    "differing": doc.get("differing", []),
                    "noise": doc.get("noise", []),
                }
            )
        return out

    # -- the divergence ledger -----------------------------------------------------------------

    @staticmethod
    def _filters(
        prefix: str, include_resolved: bool, **columns: str | None
    ) -> tuple[str, list[Any]]:
        clauses = [] if include_resolved else [f"{prefix}resolved_at IS NULL"]
        params: list[Any] = []
        for column, value in columns.items():
            if value is not None:
                clauses.append(f"{prefix}{column} = ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def ledger(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        reason: str | None = None,
        include_resolved: bool = False,
        limit: int = 100,
    ) -> list[LedgerRow]:
        where, params = self._filters(
            "", include_resolved, route=route, target=target, scope=scope, reason=reason
        )
        limit = max(0, int(limit))

        def work(cur: Cursor) -> list[LedgerRow]:
            cur.execute(
                self._q(
                    "SELECT id, ts, route, target, scope, reason, request_id, method, uri, "
                    f"detail, resolved_at FROM shadowlane_ledger{where} "
                    "ORDER BY ts DESC, id DESC LIMIT ?"
                ),
                (*params, limit),
            )
            entries = list(cur.fetchall())
            if not entries:
                return []
            ids = [int(e[0]) for e in entries]
            keys: dict[int, list[str]] = {i: [] for i in ids}
            cur.execute(
                self._q(
                    "SELECT entry_id, key FROM shadowlane_ledger_keys "
                    f"WHERE entry_id IN ({', '.join('?' * len(ids))}) ORDER BY entry_id, pos"
                ),
                tuple(ids),
            )
            for entry_id, key in cur.fetchall():
                keys[int(entry_id)].append(key)
            return [
                LedgerRow(
                    int(ident),
                    float(ts),
                    r,
                    t,
                    sc,
                    why,
                    tuple(keys[int(ident)]),
                    request_id,
                    method,
                    uri,
                    detail,
                    None if resolved_at is None else float(resolved_at),
                )
                for ident, ts, r, t, sc, why, request_id, method, uri, detail, resolved_at in (
                    entries
                )
            ]

        return list(self._read_work(work) or [])

    def ledger_counts(
        self,
        route: str | None = None,
        target: str | None = None,
        include_resolved: bool = False,
        *,
        scope: str | None = None,
    ) -> list[LedgerCountRow]:
        where, params = self._filters("", include_resolved, route=route, target=target, scope=scope)
        rows = self._read(
            f"SELECT route, target, reason, COUNT(*) FROM shadowlane_ledger{where} "
            "GROUP BY route, target, reason ORDER BY route, target, reason",
            params,
        )
        return [LedgerCountRow(r, t, why, int(n)) for r, t, why, n in rows]

    def suspect_keys(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        *,
        limit: int | None = None,
    ) -> list[str]:
        where, params = self._filters("", False, route=route, target=target, scope=scope)
        sql = f"SELECT DISTINCT key FROM shadowlane_ledger_keys{where} ORDER BY key"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, int(limit)))
        return [key for (key,) in self._read(sql, params)]
