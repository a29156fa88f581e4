"""The SQLite event store (the default backend).

The SQL is kept portable (plain parameterised statements, ``ON CONFLICT`` upserts,
``RETURNING``) so that a PostgreSQL store can share it; what is SQLite-only (pragmas,
``BEGIN IMMEDIATE``, ``WITHOUT ROWID``) stays here.

Layout (schema version 2): the log is stored in *segments*, up to
:data:`~perps_indexer.store.base.SEGMENT_EVENTS` consecutive events per row (see
:func:`~perps_indexer.store.base.encode_segments`), and the key index has one row per key and
segment, the key interned as an integer id. Version 1 stored one row per event and one index
row per key and event: about three times the cost per appended event. A version 1 file is
converted to version 2 when it is opened (in one transaction; the events are unchanged).

A segment's body is LZ4-compressed JSON (:data:`~perps_indexer.store.base.BODY_FORMAT`); a file
whose bodies are plain JSON (written before that format) has them compressed when it is
opened, in the same way. The pages this frees are reused by later appends (``VACUUM`` gives
them back to the filesystem). A process of an older version must not have the file open then:
it checks the body format only when it opens a file, and would go on appending plain bodies.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from types import TracebackType
from typing import Final

from perps_indexer import errors
from perps_indexer.events import AnyEvent
from perps_indexer.store.base import (
    BODY_FORMAT,
    PLAIN_BODY_FORMAT,
    SEGMENT_EVENTS,
    EventStore,
    KeyRow,
    check_bounds,
    check_contiguous,
    compress_body,
    decode_event,
    decode_part,
    decode_segment,
    encode_segments,
    expand_body,
    key_offsets,
    segment_ends,
    segment_key_rows,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
"""The layout this code writes; a database with a larger ``schema_version`` is refused and one
of version 1 is converted when opened."""

V1: Final = 1
"""One row per event (``events``) and per key and event (``event_keys``)."""

SCHEMA_VERSION_KEY: Final = "schema_version"
BODY_FORMAT_KEY: Final = "body_format"
INDEXED_KEY: Final = "indexed_through"
"""The meta key of the seq the key index is complete through (see :meth:`SQLiteStore.append`)."""

CHECKPOINT_EVERY: Final = 0.05
"""Seconds between the background checkpointer's passes (see
:meth:`SQLiteStore.checkpoint_in_background`). Short: each pass copies less, so it competes
less with the appending thread for the core. Scenario 2 of BENCHMARKS.md at 5,000 fills/s,
p99: 14-22 ms every 0.05 s, 20-30 every 0.25 s, 37-41 every 1-2 s; a pass with nothing
to copy costs next to nothing."""

CHECKPOINT_RESTART_FRAMES: Final = 1_024
"""WAL frames (pages) past which the background checkpointer makes the next append restart
the WAL from its start, so that it cannot grow without bound under a writer that never
pauses (1,024 frames of 16 KiB: 16 MiB). Small, because every page the WAL grows by is a new
page of the kernel's page cache, and on a virtual machine new pages are dear: at scenario 2's
5,000 fills a second a bound of 16,384 let the WAL grow to 180 MB in a window, and the server
used 79-85 % of its core against 74-75 % with this bound (BENCHMARKS.md, issue 7). A restart
then comes about once a second at that rate, each holding appends off for a few ms."""

WAL_WARN_FACTOR: Final = 8
"""The background checkpointer warns when the WAL has held this many times its restart bound,
not wholly copied, for :data:`WAL_WARN_PASSES` passes in a row: restarts are not keeping up (see
:meth:`_Checkpointer._warn_large`)."""

WAL_WARN_PASSES: Final = 200
"""Passes in a row (10 s at the default interval) a WAL must stay that large before the
warning: one large transaction (a snapshot of the read models) makes a large WAL that the
next passes copy and restart, which is no cause for one."""

WAL_WARN_EVERY: Final = 60.0
"""Seconds between two of those warnings, at least."""

SYNCHRONOUS_MODES: Final = ("EXTRA", "FULL", "NORMAL")
"""Accepted ``synchronous`` settings; OFF is left out: it may corrupt the file on power loss."""

CACHE_KIB: Final = 65_536
"""Page cache per connection (SQLite's default is 2 MiB). The key index takes inserts all over
its B-tree (one per address); with the default cache, appends to a large log run about half as
fast, most of the time going to re-reading evicted index pages."""

PAGE_SIZE: Final = 16_384
"""Page size of a new database (SQLite's default is 4 KiB). A commit writes whole pages to the
WAL, two writes each, and a checkpoint copies them again: fewer, larger pages cut the CPU per
event of batches of 100 by about a fifth (and of 1,000 a little), and cost an append of one
command about 8% more CPU (its time goes to the fsync either way)."""

KEY_ID_CACHE: Final = 100_000
"""Interned keys remembered in memory; past this many the memory is cleared and refilled."""

INDEX_LAG: Final = 2_048
"""How many events the key index may lag the log by before an append writes it."""

INDEX_CHUNK: Final = 256
"""Events whose key rows an append writes, at least, once the index lags by INDEX_LAG: the
oldest, leaving it that much less behind. All 2,048 at once held a small append for 3-4 ms
(a stall of every stream, once a second at 1,400 orders/s; BENCHMARKS.md, scenario 6)."""

MIGRATE_CHUNK: Final = 4_096
"""Version 1 events converted per step (the whole conversion is one transaction)."""

COMPRESS_CHUNK: Final = 64
"""Segments compressed per step when plain bodies are converted (up to 64 x 128 events of
~1 KiB in memory at once; the whole conversion is one transaction)."""

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS segments ("
    "first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, "
    "ends BLOB NOT NULL, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS index_keys (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE)",
    # WITHOUT ROWID: the primary key is the table, not a second copy of it in an index.
    "CREATE TABLE IF NOT EXISTS key_segments ("
    "key_id INTEGER NOT NULL, last_seq INTEGER NOT NULL, first_seq INTEGER NOT NULL, "
    "offsets BLOB NOT NULL, PRIMARY KEY (key_id, last_seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS snapshots ("
    "name TEXT PRIMARY KEY, seq INTEGER NOT NULL, data BLOB NOT NULL)",
)
_CHECKPOINT: Final = "PRAGMA wal_checkpoint(PASSIVE)"
_sync_data: Final = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync

PRESYNC_ROUNDS: Final = 4
"""Unlocked passes, each followed by an fsync of the database file, the checkpointer runs at
most before the locked pass of a restart (see :meth:`_Checkpointer._restart`)."""

PRESYNC_FRAMES: Final = 64
"""A pass that copied fewer frames than this ends the unlocked passes: the locked one then
has about as few to copy."""

_SYNC_FILES: dict[tuple[int, int], int] = {}
"""File descriptors of database files, kept for fsyncs, by (device, inode); never closed."""
_SYNC_FILES_LOCK = threading.Lock()


def _sync_file(path: str) -> int:
    """A descriptor of the database file at ``path``, for fsync only, opened once per file and
    process and never closed: closing any descriptor of a file drops every POSIX lock the
    process holds on it, SQLite's included (https://sqlite.org/howtocorrupt.html, 2.2), so a
    close here while another connection of this process is open could let a second process
    delete a WAL still in use."""
    with _SYNC_FILES_LOCK:
        info = os.stat(path)
        key = (info.st_dev, info.st_ino)
        fd = _SYNC_FILES.get(key)
        if fd is None:
            # Read-write: Windows' fsync (FlushFileBuffers) needs write access.
            fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
            opened = os.fstat(fd)
            # Replaced between the stat and the open: kept under the file it is (not closed).
            _SYNC_FILES[(opened.st_dev, opened.st_ino)] = fd
        return fd


_CREATE_META: Final = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"

_GET_META: Final = "SELECT value FROM meta WHERE key = ?"
_SET_META: Final = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_LAST_SEQ: Final = "SELECT last_seq FROM segments ORDER BY first_seq DESC LIMIT 1"
_FIRST_SEQ: Final = "SELECT MIN(first_seq) FROM segments"
_INSERT_SEGMENT: Final = (
    "INSERT INTO segments (first_seq, last_seq, ends, body) VALUES (?, ?, ?, ?)"
)
_INSERT_KEY_SEGMENT: Final = (
    "INSERT INTO key_segments (key_id, last_seq, first_seq, offsets) VALUES (?, ?, ?, ?)"
)
_SEGMENTS_AFTER: Final = (
    "SELECT first_seq, last_seq, ends, body FROM segments WHERE first_seq > ? ORDER BY first_seq"
)
_SEGMENTS_AFTER_LIMIT: Final = (
    "SELECT first_seq, last_seq, ends, body FROM segments WHERE first_seq > ? "
    "ORDER BY first_seq LIMIT ?"
)
_SET_BODY: Final = "UPDATE segments SET body = ? WHERE first_seq = ?"
_SEGMENT: Final = "SELECT last_seq, ends FROM segments WHERE first_seq = ?"
_KEY_ID: Final = "SELECT id FROM index_keys WHERE key = ?"
_ADD_KEY: Final = "INSERT INTO index_keys (key) VALUES (?) RETURNING id"
_NEWEST_KEYS: Final = "SELECT key, id FROM index_keys ORDER BY id DESC LIMIT ?"
# The segments holding seqs >= ?: from the one that starts at or before it, when that one
# reaches it (both ? are the same seq).
_READ: Final = (
    "SELECT first_seq, last_seq, ends, body FROM segments WHERE first_seq >= "
    "COALESCE((SELECT MAX(first_seq) FROM segments WHERE first_seq <= ?), 0) "
    "AND last_seq >= ? ORDER BY first_seq LIMIT ?"
)
# Without the bodies: only the bodies of the segments picked are read (see _read_picked).
_READ_KEY: Final = (
    "SELECT k.first_seq, k.offsets, s.last_seq, s.ends "
    "FROM key_segments k JOIN segments s ON s.first_seq = k.first_seq "
    "WHERE k.key_id = ? AND k.last_seq > ?"
)
# Rows wholly before ``before``, and the one row that may straddle it: the first at or after.
_READ_KEY_BEFORE: Final = (
    " AND k.last_seq <= COALESCE((SELECT MIN(last_seq) FROM key_segments "
    "WHERE key_id = ? AND last_seq >= ?), ?)"
)
_V1_READ: Final = "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
_V1_DROP: Final = ("DROP TABLE event_keys", "DROP TABLE events")
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

    What is made durable is the events: an append commits its whole batch or nothing. The key
    index in the file may lag the events by up to :attr:`index_lag` of them (it is written with
    a later append); it is derived from the events, so :meth:`read_for_key` fills what it lacks
    from them and always covers every committed event, after a crash too.

    Checkpoints (copying the WAL into the file, with an fsync) run inside the append that
    fills the WAL past SQLite's threshold, by default; a server calls
    :meth:`checkpoint_in_background` to run them on a thread of their own instead.

    ``busy_timeout`` is how long (seconds) to wait for another connection's write lock.
    The connection is opened with ``check_same_thread=False`` and every call holds a lock, so a
    store may be created in one thread and used in another (one at a time).
    """

    read_chunk: int = 8
    """Segments fetched per query by :meth:`read`."""

    segment_events: int = SEGMENT_EVENTS
    """The most events written in one segment row (at most 65,536: offsets are 16-bit)."""

    index_lag: int = INDEX_LAG
    """How many events the key index may lag the log by (see :meth:`append`)."""

    index_chunk: int = INDEX_CHUNK
    """Events whose key rows one append writes once the index lags by :attr:`index_lag`: the
    oldest, so that it lags by that many fewer (see :meth:`append`)."""

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
        self._key_ids: dict[str, int] = {}
        # The key rows not in the index yet, the seq it is complete through, and the newest seq
        # when these were right (-1: unknown, rebuild them from the file).
        self._lagging: list[KeyRow] = []
        self._indexed = 0
        self._seen = -1
        self._busy_timeout = busy_timeout
        self._checkpointer: _Checkpointer | None = None
        try:
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise errors.StoreError(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            with _Translated(self.path):
                self._configure(conn, mode)
                self._check_schema(conn)
                # Interned ids never change once committed. Known up front, the first index
                # write after a start needs no look-up per key: with 10,000 addresses that
                # was a 10-20 ms pause at each of the first few writes (BENCHMARKS.md).
                self._key_ids = dict(conn.execute(_NEWEST_KEYS, (KEY_ID_CACHE,)).fetchall())
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, synchronous={self.synchronous!r})"

    # ------------------------------------------------------------------ setup

    def _configure(self, conn: sqlite3.Connection, mode: str) -> None:
        # Only a new file takes it (before WAL mode is set); an existing one keeps its own.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        # An in-memory database has no WAL; a file that refuses it (some network filesystems)
        # behaves otherwise than the class docstring says, so say so.
        if journal != "wal" and self.path != ":memory:":
            logger.warning("%s: journal_mode is %s, not wal", self.path, journal)
        # Pragmas take no parameters: ``mode`` is one of SYNCHRONOUS_MODES (checked in
        # __init__); PAGE_SIZE and CACHE_KIB are constants.
        conn.execute(f"PRAGMA synchronous = {mode}")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")  # negative: KiB, not pages

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        with _Transaction(conn):
            conn.execute(_CREATE_META)
            row = conn.execute(_GET_META, (SCHEMA_VERSION_KEY,)).fetchone()
            if row is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(_SET_META, (SCHEMA_VERSION_KEY, str(SCHEMA_VERSION)))
                conn.execute(_SET_META, (BODY_FORMAT_KEY, BODY_FORMAT))
                conn.execute(_SET_META, (INDEXED_KEY, "0"))
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
            if int(version) < V1:
                raise errors.StoreError(
                    f"{self.path}: unknown old schema version {version} (the first version is {V1})"
                )
            row = conn.execute(_GET_META, (BODY_FORMAT_KEY,)).fetchone()
            found = None if row is None else row[0]
            if found not in (BODY_FORMAT, PLAIN_BODY_FORMAT):
                raise errors.StoreError(
                    f"{self.path}: event bodies are stored as {found!r}; "
                    f"this perps-indexer reads {BODY_FORMAT!r} (and converts "
                    f"{PLAIN_BODY_FORMAT!r})"
                )
            if int(version) == V1:
                self._migrate_v1(conn)  # its segments are written in BODY_FORMAT
            elif found == PLAIN_BODY_FORMAT:
                self._compress_bodies(conn)
            if found != BODY_FORMAT:
                conn.execute(_SET_META, (BODY_FORMAT_KEY, BODY_FORMAT))

    def _compress_bodies(self, conn: sqlite3.Connection) -> None:
        """Compress every plain segment body, inside the opening transaction: if anything
        fails (a damaged segment) the file stays as it was."""
        after = count = logged = 0
        while rows := conn.execute(_SEGMENTS_AFTER_LIMIT, (after, COMPRESS_CHUNK)).fetchall():
            updates = []
            for first, last, ends_data, body in rows:
                ends = segment_ends(first, last, ends_data)
                if (ends[-1] if ends else 0) != len(body):
                    raise errors.IntegrityError(f"the segment of events {first}..{last} is damaged")
                updates.append((compress_body(body), first))
                count += last - first + 1
            conn.executemany(_SET_BODY, updates)
            after = rows[-1][0]
            if count - logged >= 100_000:
                logger.info("%s: compressed the segments through event %d", self.path, rows[-1][1])
                logged = count
        logger.warning(
            "%s: compressed the event bodies (%r to %r, %d events)",
            self.path,
            PLAIN_BODY_FORMAT,
            BODY_FORMAT,
            count,
        )

    def _migrate_v1(self, conn: sqlite3.Connection) -> None:
        """Rewrite a version 1 log as segments, inside the opening transaction: if anything
        fails (a damaged body, a hole) the file stays as it was, at version 1."""
        for statement in _SCHEMA:
            conn.execute(statement)
        after = count = 0
        while rows := conn.execute(_V1_READ, (after, MIGRATE_CHUNK)).fetchall():
            events = [decode_event(seq, body) for seq, body in rows]
            check_contiguous(events, events[0].seq if not after else after + 1)
            segments, key_rows = encode_segments(events, self.segment_events)
            conn.executemany(_INSERT_SEGMENT, segments)
            self._write_index(conn, key_rows, events[-1].seq)
            after, count = events[-1].seq, count + len(events)
        for statement in _V1_DROP:
            conn.execute(statement)
        conn.execute(_SET_META, (SCHEMA_VERSION_KEY, str(SCHEMA_VERSION)))
        logger.warning(
            "%s: converted the event store from schema v%d to v%d (%d events)",
            self.path,
            V1,
            SCHEMA_VERSION,
            count,
        )

    # ------------------------------------------------------------------ plumbing

    def _connection(self) -> sqlite3.Connection:
        """The open connection (the caller holds the lock); :class:`StoreError` once closed."""
        conn = self._conn
        if conn is None:
            raise errors.StoreError(f"the event store {self.path} is closed")
        return conn

    @contextmanager
    def _using(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock (and inside a transaction when ``write``)."""
        with self._lock, _Translated(self.path):
            conn = self._connection()
            if write:
                with _Transaction(conn):
                    yield conn
            else:
                yield conn

    @staticmethod
    def _int_or_zero(conn: sqlite3.Connection, query: str) -> int:
        row = conn.execute(query).fetchone()  # no row, or NULL, when the log is empty
        return 0 if row is None or row[0] is None else int(row[0])

    # ------------------------------------------------------------------ events

    def append(self, events: Sequence[AnyEvent]) -> None:
        """Durably append ``events`` in one transaction: when this returns, the batch is
        committed (and, with ``synchronous`` FULL or EXTRA, its WAL frames fsynced).

        The key index is written with every :attr:`index_lag` events or so, not with each
        append: each write of it rewrites one B-tree page per key touched, which cost more
        than the events themselves in batches of 100. The index is a function of the events,
        so what it lacks is rebuilt from them (see :meth:`_lagging_rows`); nothing is lost.
        Once it lags that far, an append writes the rows of its oldest :attr:`index_chunk`
        events (or more, to keep up with a large batch): the work comes in small pieces, never
        a whole lag's worth in one append.
        """
        if not events:
            return
        # Encoded before the transaction, to hold the write lock briefly; checked inside it.
        segments, key_rows = encode_segments(events, self.segment_events)
        through = events[-1].seq
        # The lock and the transaction as _using() gives them, without its generator: the
        # commit of every order comes here, and generator context managers cost ~2.5 us of it.
        with self._lock, _Translated(self.path):
            conn = self._connection()
            try:
                with _Transaction(conn):
                    last = self._int_or_zero(conn, _LAST_SEQ)
                    check_contiguous(events, last + 1)
                    lagging, indexed = self._lagging_rows(conn, last)
                    lagging += key_rows
                    flushed = through - indexed >= self.index_lag
                    if flushed:
                        split, indexed = self._index_part(lagging, through)
                        added = self._write_index(conn, lagging[:split], indexed)
                    else:
                        added = {}
                    conn.executemany(_INSERT_SEGMENT, segments)
            except BaseException:
                self._seen = -1  # the lagging rows may hold this batch's: rebuild them later
                raise
            # Committed: the in-memory state follows, still under the lock.
            if flushed:
                self._lagging, self._indexed = lagging[split:], indexed
            self._seen = through
            self._remember(added)  # only now: a rolled-back key id must not be remembered
        logger.debug("%s: appended events %d..%d", self.path, events[0].seq, events[-1].seq)

    def _lagging_rows(self, conn: sqlite3.Connection, last: int) -> tuple[list[KeyRow], int]:
        """The key rows of the segments the index does not hold yet, and the seq the index is
        complete through. Kept in memory while this store is the one appending (``last``, the
        newest seq in the file, is the one it wrote); otherwise, after opening the file or when
        another connection appended, rebuilt from the stored events."""
        if last == self._seen:
            return self._lagging, self._indexed
        row = conn.execute(_GET_META, (INDEXED_KEY,)).fetchone()
        indexed = 0 if row is None else int(row[0])
        lagging: list[KeyRow] = []
        for first, seg_last, ends, body in conn.execute(_SEGMENTS_AFTER, (indexed,)).fetchall():
            lagging += segment_key_rows(first, decode_segment(first, seg_last, ends, body))
        self._lagging, self._indexed, self._seen = lagging, indexed, last
        return lagging, indexed

    def _index_part(self, lagging: list[KeyRow], through: int) -> tuple[int, int]:
        """How many of the lagging key rows (oldest first) to write now, so that the index
        lags by about ``index_lag - index_chunk`` events after, and the seq it is then
        complete through: just before the first segment left out (segments are contiguous),
        or ``through`` if none is."""
        cutoff = through - self.index_lag + self.index_chunk
        split = bisect.bisect_right(lagging, cutoff, key=itemgetter(2))  # segments' first seqs
        return split, (lagging[split][2] - 1 if split < len(lagging) else through)

    def _write_index(
        self, conn: sqlite3.Connection, key_rows: list[KeyRow], through: int
    ) -> dict[str, int]:
        """Insert key rows and record the index complete through seq ``through`` (inside a
        transaction); returns the keys interned meanwhile."""
        known = self._key_ids
        added: dict[str, int] = {}
        rows = []
        for key, last, first, offsets in key_rows:
            key_id = known.get(key)
            if key_id is None:
                key_id = added.get(key)
                if key_id is None:
                    key_id = added[key] = self._intern(conn, key)
            rows.append((key_id, last, first, offsets))
        conn.executemany(_INSERT_KEY_SEGMENT, rows)
        conn.execute(_SET_META, (INDEXED_KEY, str(through)))
        return added

    @staticmethod
    def _intern(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute(_KEY_ID, (key,)).fetchone()
        if row is None:
            row = conn.execute(_ADD_KEY, (key,)).fetchone()
        return int(row[0])

    def _remember(self, key_ids: dict[str, int]) -> None:
        if len(self._key_ids) + len(key_ids) > KEY_ID_CACHE:
            self._key_ids.clear()
        self._key_ids.update(key_ids)

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
            # Every segment holds at least one event: never fetch more than ``remaining``.
            size = self.read_chunk if remaining is None else min(self.read_chunk, remaining)
            with self._using() as conn:
                rows = conn.execute(_READ, (after + 1, after + 1, size)).fetchall()
            if not rows:
                return
            for first, last, ends, body in rows:
                if expected is not None and first != expected:
                    raise errors.SequenceGap(expected, first)
                skip = max(after + 1 - first, 0)  # only in the segment holding ``after``
                if remaining is not None and last - first + 1 - skip > remaining:
                    wanted = range(skip, skip + remaining)
                else:
                    wanted = range(skip, last - first + 1)
                yield from decode_segment(first, last, ends, body, wanted)
                if remaining is not None:
                    remaining -= len(wanted)
                after, expected = last, last + 1
            # Not stopping at a short chunk: one segment may hold many events, and what was
            # appended while the caller worked through them is read too (as in version 1).

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
        picked: list[tuple[int, int, bytes, list[int]]] = []
        count = 0

        def take(first: int, offsets_data: bytes, last: int, ends: bytes) -> bool:
            """Pick the row's events in range; True once ``limit`` events are picked."""
            nonlocal count
            offsets = [
                o
                for o in key_offsets(offsets_data)
                if first + o > after and (before is None or first + o < before)
            ]
            if newest_first:
                offsets.reverse()
            if limit is not None:
                del offsets[limit - count :]
            if offsets:
                picked.append((first, last, ends, offsets))
            count += len(offsets)
            return limit is not None and count >= limit

        with self._using() as conn:
            lagging, _ = self._lagging_rows(conn, self._int_or_zero(conn, _LAST_SEQ))
            # Every lagging row is newer than every indexed one.
            tail = [row for row in lagging if row[0] == key and row[1] > after]
            if before is not None:
                tail = [row for row in tail if row[2] < before]
            if newest_first:
                tail.reverse()
                if not self._take_lagging(conn, tail, take):
                    self._take_indexed(conn, key, after, before, newest_first, take)
            elif not self._take_indexed(conn, key, after, before, newest_first, take):
                self._take_lagging(conn, tail, take)
            return self._read_picked(conn, picked)

    @staticmethod
    def _read_picked(
        conn: sqlite3.Connection, picked: list[tuple[int, int, bytes, list[int]]]
    ) -> list[AnyEvent]:
        """Decode the picked events: each picked segment's body is read (through SQLite's
        incremental blob I/O, which copies it once, where selecting it would copy it twice)
        and expanded, and only the picked events are decoded."""
        events: list[AnyEvent] = []
        for first, last, ends_data, offsets in picked:
            ends = segment_ends(first, last, ends_data)
            with conn.blobopen("segments", "body", first, readonly=True) as blob:
                body = blob.read()
            events += decode_part(first, ends, expand_body(first, last, ends, body), offsets)
        return events

    @staticmethod
    def _take_lagging(
        conn: sqlite3.Connection, rows: list[KeyRow], take: Callable[..., bool]
    ) -> bool:
        """Feed the lagging key rows with their segments to ``take`` until it is satisfied."""
        for _, _, first, offsets in rows:
            last, ends = conn.execute(_SEGMENT, (first,)).fetchone()
            if take(first, offsets, last, ends):
                return True
        return False

    def _take_indexed(
        self,
        conn: sqlite3.Connection,
        key: str,
        after: int,
        before: int | None,
        newest_first: bool,
        take: Callable[..., bool],
    ) -> bool:
        """Feed the indexed rows of ``key`` to ``take`` until it is satisfied."""
        key_id = self._key_ids.get(key)
        if key_id is None:
            row = conn.execute(_KEY_ID, (key,)).fetchone()
            if row is None:
                return False
            key_id = int(row[0])
        # Only fixed fragments are joined; every value is a parameter.
        query = _READ_KEY
        params: list[object] = [key_id, after]
        if before is not None:
            query += _READ_KEY_BEFORE
            params += [key_id, before, before]
        query += " ORDER BY k.last_seq DESC" if newest_first else " ORDER BY k.last_seq"
        # Rows are stepped lazily: the scan stops once ``take`` has what it needs.
        cursor = conn.execute(query, params)
        try:
            return any(take(*row) for row in cursor)
        finally:
            cursor.close()

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

    def checkpoint_in_background(
        self, every: float = CHECKPOINT_EVERY, *, restart_frames: int = CHECKPOINT_RESTART_FRAMES
    ) -> None:
        """Move checkpoints off the appending thread: from now on a thread of the store's own
        copies the WAL into the database file every ``every`` seconds, and :meth:`append`
        never does.

        An inline checkpoint copies every page the WAL gained since the last one and fsyncs
        the file, inside the append that crossed SQLite's threshold: 15-20 ms in a server
        appending 13,000 events a second, during which no command was answered and no update
        pushed (BENCHMARKS.md, scenario 2). The thread's checkpoints are PASSIVE: they never
        take the write lock, so appends go on meanwhile (SQLite releases the GIL while it
        works), except for one short pass holding this store's lock when the WAL has grown
        past ``restart_frames`` and must be restarted (a few ms at scenario 2's rate; see
        ``_Checkpointer._restart``). The thread keeps a descriptor of the database file for
        its fsyncs, open until the process ends. What an append survives is unchanged (see
        the class docstring): with NORMAL the WAL is still fsynced at each checkpoint, and
        FULL fsyncs it at every commit. :meth:`close` stops the thread. A file store only;
        calling it again does nothing. ``restart_frames``: see
        :data:`CHECKPOINT_RESTART_FRAMES`."""
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        if self._checkpointer is not None or self.path == ":memory:":
            return
        with self._using() as conn:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpointer = _Checkpointer(
            self.path, every, self._busy_timeout, restart_frames, self._lock
        )
        self._checkpointer.start()

    @property
    def checkpoints(self) -> int:
        """Checkpoints the background thread has run (0 without one)."""
        return self._checkpointer.passes if self._checkpointer is not None else 0

    @property
    def wal_frames(self) -> int:
        """The WAL's size in frames (pages) at the background thread's last pass (0 without
        one): it stays near ``restart_frames`` or below while restarts keep up."""
        return self._checkpointer.frames if self._checkpointer is not None else 0

    def close(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # the last connection to close checkpoints what the WAL holds


class _Checkpointer(threading.Thread):
    """Runs PASSIVE checkpoints of one database file on a connection of its own."""

    def __init__(
        self,
        path: str,
        every: float,
        busy_timeout: float,
        restart_frames: int,
        appends: threading.Lock,
    ) -> None:
        super().__init__(name=f"checkpoint {os.path.basename(path)}", daemon=True)
        self.path = path
        self.every = every
        self.busy_timeout = busy_timeout
        self.restart_frames = restart_frames
        self.passes = 0
        self.frames = 0
        """The WAL's frames at the last pass."""
        self._appends = appends
        self._large = 0
        """Passes in a row that found the WAL far past its bound and not wholly copied."""
        self._warned = -math.inf
        """When :meth:`_pass` last warned of a WAL far past its bound (``time.monotonic``)."""
        self._primed = -1
        """The WAL's frames when a restart was last readied: while they stay the same, no
        append came to restart it, and another pass could only repeat the same work."""
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            logger.error("%s: background checkpoints cannot start: %s", self.path, exc)
            return
        try:
            while not self._stopping.wait(self.every):
                self._pass(conn)
        finally:
            conn.close()

    def _pass(self, conn: sqlite3.Connection) -> None:
        try:
            busy, frames, copied = conn.execute(_CHECKPOINT).fetchone()
            self.frames = frames
            # A WAL wholly copied only waits for an append to restart it (a quiet server
            # after a snapshot): no cause for the warning.
            if frames >= WAL_WARN_FACTOR * self.restart_frames and copied < frames:
                self._large += 1
                if self._large >= WAL_WARN_PASSES:
                    self._warn_large(frames, copied)
            else:
                self._large = 0
            if (
                not busy
                and frames >= self.restart_frames
                and copied == frames
                and frames != self._primed
            ):
                self._restart(conn, copied)
        except sqlite3.Error as exc:  # the appends go on; the WAL grows meanwhile
            logger.warning("%s: background checkpoint failed: %s", self.path, exc)
            return
        self.passes += 1
        if busy:
            logger.debug("%s: checkpoint %d of %d frames (busy)", self.path, copied, frames)

    def _warn_large(self, frames: int, copied: int) -> None:
        """Say, now and then, that the WAL has stayed far past its bound. It is restarted only
        once a pass has copied all of it, which an old snapshot held by another connection's read
        transaction prevents (or another writer that never pauses): meanwhile the file grows
        and so does the cost of every checkpoint."""
        now = time.monotonic()
        if now - self._warned < WAL_WARN_EVERY:
            return
        self._warned = now
        logger.warning(
            "%s: the WAL holds %d frames, %d times the %d it is restarted at, and %d of them "
            "are copied: is another connection or process keeping a read transaction open?",
            self.path,
            frames,
            frames // self.restart_frames,
            self.restart_frames,
            copied,
        )

    def _restart(self, conn: sqlite3.Connection, copied: int) -> None:
        """Make the next append of this store restart the WAL from its start.

        SQLite restarts it when an append starts with the whole WAL copied, which never
        happens while a writer that never pauses adds frames during every pass. So a last
        pass runs with the store's calls held off: it copies the few frames added since and,
        the WAL complete, fsyncs the database file. A pass short of the WAL's end does not
        fsync that file: what the passes before copied waits in the kernel, and its fsync in
        the held pass kept appends waiting 30-122 ms (scenario 2, BENCHMARKS.md). So first,
        unheld, the file is fsynced and the frames added meanwhile copied, in rounds until a
        round copies few (:data:`PRESYNC_FRAMES`), so the held pass has little to do.

        Not ``wal_checkpoint(RESTART)``: it takes SQLite's write lock itself, and an append
        that finds it taken sleeps in the busy handler's steps (up to 100 ms each): stalls of
        115-145 ms every ~12 s at scenario 2's 5,000 fills/s. An append waits on the store's
        lock instead, woken the moment it is released.

        This bounds the WAL when this store is its writer; another writer's appends (another
        connection or process) are not held off, and under one that never pauses the WAL is
        not restarted."""
        try:
            file = _sync_file(self.path)
            for _ in range(PRESYNC_ROUNDS):
                _sync_data(file)
                busy, frames, now = conn.execute(_CHECKPOINT).fetchone()
                if busy or now - copied < PRESYNC_FRAMES:
                    break
                copied = now
        except OSError as exc:  # only the hold gets longer: the held pass fsyncs anyway
            logger.warning("%s: cannot fsync before restarting the WAL: %s", self.path, exc)
        with self._appends:
            busy, frames, copied = conn.execute(_CHECKPOINT).fetchone()
        if not busy and copied == frames:
            self._primed = frames  # not again until an append has restarted it
            # DEBUG: under a steady writer this comes every second or so, all day long.
            logger.debug("%s: WAL at %d frames; the next append restarts it", self.path, frames)


class _Translated:
    """``with``: database failures raised as :class:`StoreError` naming the file (a class,
    not a generator: it wraps every append)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise errors.StoreError(f"SQLite error on {self.path}: {exc}") from exc


class _Transaction:
    """``with``: a write transaction, committed at the end or rolled back on any exception.

    IMMEDIATE takes the write lock up front, so the last_seq read inside an append cannot be
    overtaken by another writer before the insert."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self.conn
        if kind is None:
            try:
                conn.execute("COMMIT")
                return
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if conn.in_transaction:
            conn.execute("ROLLBACK")
