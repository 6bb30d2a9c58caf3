"""SQLite driver: the default store, embedded, nothing to set up.

WAL journal so the reader connection (admin API, dashboard) never blocks the comparator's writes
and vice versa; `BEGIN IMMEDIATE` for writes so several processes (`--workers N`) sharing one file
queue on the write lock (busy timeout) instead of failing half-way through a transaction.
`:memory:` (tests) has one connection, so reads and writes take the same lock there.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shadowlane.store.base import Cursor, SqlStore, StoreOptions

#: how long a writer waits for another process's write transaction before giving up
BUSY_TIMEOUT = 10.0


class SqliteStore(SqlStore):
    """A store in one SQLite file (or in memory)."""

    kind = "sqlite"

    def __init__(self, path: str, options: StoreOptions | None = None) -> None:
        super().__init__(options)
        self.path = path
        self.memory = path in ("", ":memory:")
        self._write_conn = self._connect()
        if self.memory:
            self._read_conn = self._write_conn
            self._read_lock = self._write_lock
        else:
            _wal(self._write_conn)
            self._write_conn.execute("PRAGMA synchronous=NORMAL")
            self._read_conn = self._connect()
        with self._write_lock, self._transaction(self._write_conn) as cur:
            self._create_schema(cur, "INTEGER PRIMARY KEY AUTOINCREMENT")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT) in _transaction.
        # check_same_thread=False: the store is opened on one thread and written from the
        # comparator's; the locks in SqlStore make sure one thread at a time uses a connection.
        return sqlite3.connect(
            self.path or ":memory:",
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
        )

    def _writer(self) -> Any:
        return self._write_conn

    def _reader(self) -> Any:
        return self._read_conn

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[Cursor]:
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE" if conn is self._write_conn else "BEGIN")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._write_lock:
            self._write_conn.close()
        if not self.memory:
            with self._read_lock:
                self._read_conn.close()


def _wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting for the lock it needs.

    With `--workers N` every worker opens the same new file at once; the switch takes an
    exclusive lock, and SQLite answers "database is locked" at once, without its busy handler,
    when another connection holds the file (seen in CI as a worker that exited at start-up). The
    mode is stored in the file, so once one worker switched it the others' PRAGMA is a read."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
