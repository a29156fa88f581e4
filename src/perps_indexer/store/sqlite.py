"""The SQLite event store (the default backend).

The SQL is kept portable (plain parameterised statements, ``ON CONFLICT`` upserts) so that a
PostgreSQL store can share it; what is SQLite-only (pragmas, ``BEGIN IMMEDIATE``) stays here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final

from perps_indexer import errors
from perps_indexer.events import AnyEvent
from perps_indexer.store.base import (
    BODY_FORMAT,
    EventStore,
    check_bounds,
    check_contiguous,
    decode_row,
    encode_rows,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
"""The layout this code writes; a database with a larger ``schema_version`` is refused."""

SCHEMA_VERSION_KEY: Final = "schema_version"
BODY_FORMAT_KEY: Final = "body_format"

SYNCHRONOUS_MODES: Final = ("EXTRA", "FULL", "NORMAL")
"""Accepted ``synchronous`` settings; OFF is left out: it may corrupt the file on power loss."""

CACHE_KIB: Final = 65_536
"""Page cache per connection (SQLite's default is 2 MiB). The key index takes inserts all over
its B-tree (one per address); with the default cache, appends to a large log run about half as
fast, most of the time going to re-reading evicted index pages."""

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS events ("
    "seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, type TEXT NOT NULL, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS event_keys ("
    "key TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (key, seq))",
    "CREATE TABLE IF NOT EXISTS snapshots ("
    "name TEXT PRIMARY KEY, seq INTEGER NOT NULL, data BLOB NOT NULL)",
)
_CREATE_META: Final = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"

_GET_META: Final = "SELECT value FROM meta WHERE key = ?"
_SET_META: Final = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_LAST_SEQ: Final = "SELECT MAX(seq) FROM events"
_FIRST_SEQ: Final = "SELECT MIN(seq) FROM events"
_INSERT_EVENT: Final = "INSERT INTO events (seq, ts, type, body) VALUES (?, ?, ?, ?)"
_INSERT_KEY: Final = "INSERT INTO event_keys (key, seq) VALUES (?, ?)"
_READ: Final = "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
_READ_KEY: Final = (
    "SELECT e.seq, e.body FROM event_keys k JOIN events e ON e.seq = k.seq "
    "WHERE k.key = ? AND k.seq > ?"
)
_SAVE_SNAPSHOT: Final = (
    "INSERT INTO snapshots (name, seq, data) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, data = excluded.data"
)
_LOAD_SNAPSHOT: Final = "SELECT seq, data FROM snapshots WHERE name = ?"


class SQLiteStore(EventStore):
    """An event store in one SQLite file (or ``":memory:"``), in WAL journal mode.

    ``synchronous`` chooses what a returned :meth:`append` survives:

    * ``"FULL"`` (default) and ``"EXTRA"``: the WAL is fsynced at every commit, so an
      acknowledged append survives a process crash, ``kill -9``, an OS crash and power loss.
    * ``"NORMAL"``: the WAL is fsynced only at checkpoints. An acknowledged append survives a
      process crash or ``kill -9`` (the data is in the OS's page cache), but an OS crash or
      power loss may roll back the last transactions; the file itself stays consistent.

    ``busy_timeout`` is how long (seconds) to wait for another connection's write lock.
    The connection is opened with ``check_same_thread=False`` and every call holds a lock, so a
    store may be created in one thread and used in another (one at a time).
    """

    read_chunk: int = 1_000
    """Rows fetched per query by :meth:`read`."""

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "FULL", busy_timeout: float = 5.0
    ) -> None:
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise errors.StoreError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}"
            )
        self.path = os.fspath(path)
        self.synchronous = mode
        self._lock = threading.Lock()
        try:
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise errors.StoreError(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            with self._translated():
                self._configure(conn, mode)
                self._check_schema(conn)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, synchronous={self.synchronous!r})"

    # ------------------------------------------------------------------ setup

    def _configure(self, conn: sqlite3.Connection, mode: str) -> None:
        journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        # An in-memory database has no WAL; a file that refuses it (some network filesystems)
        # behaves otherwise than the class docstring says, so say so.
        if journal != "wal" and self.path != ":memory:":
            logger.warning("%s: journal_mode is %s, not wal", self.path, journal)
        # Pragmas take no parameters: ``mode`` is one of SYNCHRONOUS_MODES (checked in
        # __init__) and CACHE_KIB a constant.
        conn.execute(f"PRAGMA synchronous = {mode}")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")  # negative: KiB, not pages

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        with self._transaction(conn):
            conn.execute(_CREATE_META)
            row = conn.execute(_GET_META, (SCHEMA_VERSION_KEY,)).fetchone()
            if row is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(_SET_META, (SCHEMA_VERSION_KEY, str(SCHEMA_VERSION)))
                conn.execute(_SET_META, (BODY_FORMAT_KEY, BODY_FORMAT))
                logger.info("%s: created event store schema v%d", self.path, SCHEMA_VERSION)
                return
            version = row[0]
            if not str(version).isdigit():
                raise errors.StoreError(
                    f"{self.path}: schema version {version!r} is not a number; "
                    "this is not a perps-indexer event store or it is damaged"
                )
            if int(version) > SCHEMA_VERSION:
                raise errors.StoreError(
                    f"{self.path}: the event store has schema version {version}, newer than "
                    f"the version {SCHEMA_VERSION} this perps-indexer understands; "
                    "upgrade perps-indexer to open it"
                )
            if int(version) < SCHEMA_VERSION:
                raise errors.StoreError(
                    f"{self.path}: unknown old schema version {version} "
                    f"(the first version is {SCHEMA_VERSION})"
                )
            row = conn.execute(_GET_META, (BODY_FORMAT_KEY,)).fetchone()
            if row is None or row[0] != BODY_FORMAT:
                found = None if row is None else row[0]
                raise errors.StoreError(
                    f"{self.path}: event bodies are stored as {found!r}; "
                    f"this perps-indexer reads {BODY_FORMAT!r}"
                )

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Report database failures as :class:`StoreError`, naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise errors.StoreError(f"SQLite error on {self.path}: {exc}") from exc

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so the last_seq read inside an append cannot
        # be overtaken by another writer before the insert.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _using(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock, self._translated():
            conn = self._conn
            if conn is None:
                raise errors.StoreError(f"the event store {self.path} is closed")
            if write:
                with self._transaction(conn):
                    yield conn
            else:
                yield conn

    @staticmethod
    def _int_or_zero(conn: sqlite3.Connection, query: str) -> int:
        value = conn.execute(query).fetchone()[0]
        return 0 if value is None else int(value)

    # ------------------------------------------------------------------ events

    def append(self, events: Sequence[AnyEvent]) -> None:
        if not events:
            return
        rows, keys = encode_rows(events)  # before the transaction, to hold the lock briefly
        with self._using(write=True) as conn:
            check_contiguous(events, self._int_or_zero(conn, _LAST_SEQ) + 1)
            conn.executemany(_INSERT_EVENT, rows)
            conn.executemany(_INSERT_KEY, keys)
        logger.debug("%s: appended events %d..%d", self.path, events[0].seq, events[-1].seq)

    def last_seq(self) -> int:
        with self._using() as conn:
            return self._int_or_zero(conn, _LAST_SEQ)

    def first_seq(self) -> int:
        with self._using() as conn:
            return self._int_or_zero(conn, _FIRST_SEQ)

    def read(self, after: int = 0, limit: int | None = None) -> Iterator[AnyEvent]:
        check_bounds(after, limit)  # here, not in the generator, so bad arguments fail at once
        return self._read(after, limit)

    def _read(self, after: int, limit: int | None) -> Iterator[AnyEvent]:
        # Keyset pagination: each chunk is one short query, so no cursor or read transaction
        # stays open while the caller works through the events (or abandons the iterator).
        remaining = limit
        expected: int | None = None
        while remaining is None or remaining > 0:
            size = self.read_chunk if remaining is None else min(self.read_chunk, remaining)
            with self._using() as conn:
                rows = conn.execute(_READ, (after, size)).fetchall()
            for seq, body in rows:
                if expected is not None and seq != expected:
                    raise errors.SequenceGap(expected, seq)
                yield decode_row(seq, body)
                expected = seq + 1
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def read_for_key(
        self,
        key: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AnyEvent]:
        check_bounds(after, limit)
        if limit == 0:
            return []
        # Only fixed fragments are joined; every value is a parameter.
        query = _READ_KEY
        params: list[object] = [key, after]
        if before is not None:
            query += " AND k.seq < ?"
            params.append(before)
        query += " ORDER BY k.seq DESC" if newest_first else " ORDER BY k.seq"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        with self._using() as conn:
            rows = conn.execute(query, params).fetchall()
        return [decode_row(seq, body) for seq, body in rows]

    # ------------------------------------------------------------------ snapshots & settings

    def save_snapshot(self, seq: int, name: str, data: bytes) -> None:
        with self._using(write=True) as conn:
            last = self._int_or_zero(conn, _LAST_SEQ)
            if not 0 <= seq <= last:
                raise errors.IntegrityError(
                    f"snapshot {name!r} at seq {seq} is outside the log (last seq {last})"
                )
            conn.execute(_SAVE_SNAPSHOT, (name, seq, data))

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        with self._using() as conn:
            row = conn.execute(_LOAD_SNAPSHOT, (name,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def get_meta(self, key: str) -> str | None:
        with self._using() as conn:
            row = conn.execute(_GET_META, (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._using(write=True) as conn:
            conn.execute(_SET_META, (key, value))

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
