"""The SQLite event store against real database files."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import get_args

import lz4.block
import pytest

from benchlib import wal_restarts
from perps_indexer import errors
from perps_indexer.engine import Engine
from perps_indexer.events import AnyEvent, Fill, to_json
from perps_indexer.markets import default_markets
from perps_indexer.store import event_keys, market_key
from perps_indexer.store.base import SEGMENT_EVENTS
from perps_indexer.store.sqlite import (
    CHECKPOINT_RESTART_FRAMES,
    PAGE_SIZE,
    SCHEMA_VERSION,
    WAL_WARN_FACTOR,
    WAL_WARN_PASSES,
    SQLiteStore,
)
from tests.store.conftest import LIQUIDITY, MAKER, TRADER, deposits


def raw_query(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Ask the file through a connection of its own, not the store's."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def raw_write(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(sql, params)


def seqs(events: list[AnyEvent]) -> list[int]:
    return [ev.seq for ev in events]


# ---------------------------------------------------------------------- round trip & read


def test_the_scenario_covers_every_event_type(events: list[AnyEvent]) -> None:
    assert {type(ev) for ev in events} == set(get_args(AnyEvent))


def test_every_event_type_round_trips(store: SQLiteStore, events: list[AnyEvent]) -> None:
    store.append(events)
    assert list(store.read()) == events
    assert (store.first_seq(), store.last_seq()) == (1, len(events))
    # One batch, one segment row, holding each event's canonical JSON one after the other,
    # as one LZ4 block (BODY_FORMAT).
    ((first, last, body),) = raw_query(
        Path(store.path), "SELECT first_seq, last_seq, body FROM segments"
    )
    plain = b"".join(to_json(ev) for ev in events)
    assert (first, last) == (1, len(events))
    assert lz4.block.decompress(body, uncompressed_size=len(plain)) == plain
    assert len(body) < len(plain) / 3


def test_a_batch_larger_than_a_segment_is_split(store: SQLiteStore, db_path: Path) -> None:
    events = deposits(SEGMENT_EVENTS * 2 + 1)
    store.append(events)
    assert raw_query(db_path, "SELECT first_seq, last_seq FROM segments ORDER BY first_seq") == [
        (1, SEGMENT_EVENTS),
        (SEGMENT_EVENTS + 1, 2 * SEGMENT_EVENTS),
        (2 * SEGMENT_EVENTS + 1, 2 * SEGMENT_EVENTS + 1),
    ]
    assert list(store.read()) == events
    assert (
        list(store.read(SEGMENT_EVENTS - 1, 3)) == events[SEGMENT_EVENTS - 1 : SEGMENT_EVENTS + 2]
    )
    assert (
        store.read_for_key(TRADER, after=5, before=SEGMENT_EVENTS + 3)
        == events[5 : SEGMENT_EVENTS + 2]
    )
    newest = store.read_for_key(TRADER, before=SEGMENT_EVENTS * 2 + 1, limit=3, newest_first=True)
    assert seqs(newest) == [2 * SEGMENT_EVENTS, 2 * SEGMENT_EVENTS - 1, 2 * SEGMENT_EVENTS - 2]


def test_an_empty_store(store: SQLiteStore) -> None:
    assert (store.first_seq(), store.last_seq()) == (0, 0)
    assert list(store.read()) == []
    assert store.read_for_key(TRADER) == []
    store.append([])  # a no-op, not an error
    assert store.last_seq() == 0


@pytest.mark.parametrize(
    ("after", "limit"),
    [(0, None), (0, 5), (3, None), (3, 4), (21, None), (22, None), (100, None), (5, 0), (0, 100)],
)
def test_read_after_and_limit(
    store: SQLiteStore, events: list[AnyEvent], after: int, limit: int | None
) -> None:
    store.append(events)
    expected = [ev for ev in events if ev.seq > after]
    if limit is not None:
        expected = expected[:limit]
    assert list(store.read(after, limit)) == expected


@pytest.mark.parametrize("limit", [None, 6, 7, 9])
def test_read_fetches_in_chunks(
    store: SQLiteStore, events: list[AnyEvent], limit: int | None
) -> None:
    for event in events:  # one segment each: read_chunk counts segments
        store.append([event])
    store.read_chunk = 3
    queries: list[str] = []
    assert store._conn is not None
    store._conn.set_trace_callback(queries.append)
    got = list(store.read(0, limit))
    store._conn.set_trace_callback(None)
    wanted = len(events) if limit is None else limit
    assert got == events[:wanted]
    # Chunks of 3, plus the empty one that ends an unlimited read.
    selects = [q for q in queries if q.startswith("SELECT first_seq, last_seq, ends, body")]
    assert len(selects) == (-(-wanted // 3) + 1 if limit is None else -(-wanted // 3))


def test_read_is_lazy_and_sees_events_appended_meanwhile(
    store: SQLiteStore, events: list[AnyEvent]
) -> None:
    store.read_chunk = 4
    store.append(events[:10])
    reader = store.read()
    first = [next(reader) for _ in range(5)]
    store.append(events[10:])
    assert first + list(reader) == events


def test_read_rejects_bad_arguments_at_once(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="after"):
        store.read(-1)
    with pytest.raises(ValueError, match="limit"):
        store.read(0, -1)
    with pytest.raises(ValueError, match="limit"):
        store.read_for_key(TRADER, limit=-1)


def test_read_reports_a_hole_in_the_stored_log(
    store: SQLiteStore, events: list[AnyEvent], db_path: Path
) -> None:
    store.append(events[:4])
    store.append(events[4:7])
    store.append(events[7:])
    raw_write(db_path, "DELETE FROM segments WHERE first_seq = ?", (5,))
    with pytest.raises(errors.SequenceGap, match="expected event seq 5, got 8"):
        list(store.read())


def test_a_body_that_is_not_its_row_is_an_integrity_error(
    store: SQLiteStore, events: list[AnyEvent], db_path: Path
) -> None:
    for event in events:
        store.append([event])
    row = "SELECT ends, body FROM segments WHERE first_seq = ?"
    ends, body = raw_query(db_path, row, (2,))[0]
    update = "UPDATE segments SET ends = ?, body = ? WHERE first_seq = ?"
    raw_write(db_path, update, (ends, body, 3))
    with pytest.raises(errors.IntegrityError, match="row of event 3 holds event 2"):
        list(store.read())
    with pytest.raises(errors.IntegrityError, match="row of event 3 holds event 2"):
        store.read_for_key(LIQUIDITY)
    junk = b"\xc1junk"  # expands, but is no event
    size = len(junk).to_bytes(4, "little")
    raw_write(db_path, update, (size, lz4.block.compress(junk, store_size=False), 3))
    with pytest.raises(errors.IntegrityError, match="event 3 cannot be decoded"):
        list(store.read(2))
    with pytest.raises(errors.IntegrityError, match="event 3 cannot be decoded"):
        store.read_for_key(LIQUIDITY)
    raw_write(db_path, update, (size, junk, 3))  # not an LZ4 block
    with pytest.raises(errors.IntegrityError, match=r"events 3\.\.3 cannot be expanded"):
        list(store.read(2))
    with pytest.raises(errors.IntegrityError, match=r"events 3\.\.3 cannot be expanded"):
        store.read_for_key(LIQUIDITY)
    # Offsets that do not fit the body: the segment is damaged.
    raw_write(db_path, update, (ends + ends, body, 3))
    with pytest.raises(errors.IntegrityError, match=r"segment of events 3\.\.3 is damaged"):
        list(store.read(2))
    longer = (int.from_bytes(ends, "little") + 1).to_bytes(4, "little")
    raw_write(db_path, update, (longer, body, 3))
    with pytest.raises(errors.IntegrityError, match=r"events 3\.\.3 expands to \d+ bytes, not"):
        list(store.read(2))
    # A size no block of this length expands to is refused before anything is allocated
    # (2**31 and up would not even fit the codec's argument).
    for huge in (0x7FFF_FFF0, 0x8000_0000, 0xFFFF_FFFF):
        raw_write(db_path, update, (huge.to_bytes(4, "little"), body, 3))
        with pytest.raises(errors.IntegrityError, match=r"events 3\.\.3 is damaged: \d+ stored"):
            list(store.read(2))
        with pytest.raises(errors.IntegrityError, match=r"events 3\.\.3 is damaged: \d+ stored"):
            store.read_for_key(LIQUIDITY)
    raw_write(db_path, update, (ends + b"\x00", body, 3))
    with pytest.raises(errors.IntegrityError, match="offsets column of 5 bytes is damaged"):
        list(store.read(2))


# ---------------------------------------------------------------------- keys


def test_event_keys_by_type(events: list[AnyEvent]) -> None:
    fill = next(ev for ev in events if isinstance(ev, Fill))
    assert event_keys(fill) == (TRADER, MAKER, "market:396")
    by_type = {type(ev).__name__: event_keys(ev) for ev in events}
    assert by_type["Deposited"] == (LIQUIDITY,)
    assert by_type["Withdrew"] == (LIQUIDITY,)
    assert by_type["MarkPriceSet"] == ("market:396",)
    assert by_type["OrderPlaced"] == (TRADER, "market:396")  # the last one: the liquidation
    assert by_type["OrderRested"] == (LIQUIDITY, "market:396")
    assert by_type["OrderCancelled"] == (MAKER, "market:397")
    assert by_type["PositionUpdated"] == (MAKER, "market:396")
    assert by_type["PositionReleased"] == (TRADER, "market:396")
    assert by_type["LiquidationSettled"] == (TRADER, "market:396")
    assert market_key(397) == "market:397"


# What the scenario in conftest.py touches, worked out by hand from its commands.
TRADER_SEQS = [1, 7, 8, 13, 19, 20, 21, 22]
MAKER_SEQS = [2, 5, 6, 8, 9, 10, 11, 12, 14, 15, 24]  # 24: the maker's long pays funding
MARKET_397_SEQS = [9, 10, 11, 12]
MARKET_396_SEQS = [5, 6, 7, 8, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]


def test_read_for_key_addresses_and_markets(store: SQLiteStore, events: list[AnyEvent]) -> None:
    store.append(events)
    assert seqs(store.read_for_key(TRADER)) == TRADER_SEQS
    assert seqs(store.read_for_key(MAKER)) == MAKER_SEQS
    assert seqs(store.read_for_key("market:397")) == MARKET_397_SEQS
    # ... 23: the index price, 24: the funding settlement.
    assert seqs(store.read_for_key("market:396")) == MARKET_396_SEQS
    assert store.read_for_key(TRADER)[0] == events[0]
    assert store.read_for_key("0x" + "99" * 32) == []
    assert store.read_for_key("market:999") == []


@pytest.mark.parametrize("newest_first", [False, True])
@pytest.mark.parametrize(
    ("after", "before", "limit"),
    [
        (0, None, None),
        (7, None, None),
        (0, 20, None),
        (7, 20, None),
        (0, None, 3),
        (7, 21, 2),
        (8, 9, None),
        (0, 1, None),
        (22, None, None),
        (0, None, 0),
    ],
)
def test_read_for_key_bounds_order_and_limit(
    store: SQLiteStore,
    events: list[AnyEvent],
    after: int,
    before: int | None,
    limit: int | None,
    newest_first: bool,
) -> None:
    store.append(events)
    expected = [s for s in TRADER_SEQS if s > after and (before is None or s < before)]
    if newest_first:
        expected.reverse()
    if limit is not None:
        expected = expected[:limit]
    got = store.read_for_key(
        TRADER, after=after, before=before, limit=limit, newest_first=newest_first
    )
    assert seqs(got) == expected
    assert got == [events[s - 1] for s in expected]


# ---------------------------------------------------------------------- gaps & atomicity


def count_rows(path: Path) -> tuple[int, int, int]:
    ((n_segments,),) = raw_query(path, "SELECT COUNT(*) FROM segments")
    ((n_index,),) = raw_query(path, "SELECT COUNT(*) FROM key_segments")
    ((n_keys,),) = raw_query(path, "SELECT COUNT(*) FROM index_keys")
    return int(n_segments), int(n_index), int(n_keys)  # type: ignore[call-overload]


def test_gaps_and_duplicates_are_refused_and_write_nothing(
    store: SQLiteStore, events: list[AnyEvent], db_path: Path
) -> None:
    with pytest.raises(errors.SequenceGap) as gap:
        store.append(events[1:3])  # the log must start at 1
    assert (gap.value.expected, gap.value.got) == (1, 2)
    store.append(events[:5])
    before = count_rows(db_path)
    cases = [
        (events[6:9], 6, 7),  # skips seq 6
        (events[3:8], 6, 4),  # repeats 4 and 5
        (events[4:5], 6, 5),  # repeats the last one
        ([events[5], events[7]], 7, 8),  # a hole inside the batch
        ([events[5], events[5]], 7, 6),  # a duplicate inside the batch
        ([events[6], events[5]], 6, 7),  # out of order
    ]
    for batch, expected, got in cases:
        with pytest.raises(errors.SequenceGap) as gap:
            store.append(batch)
        assert (gap.value.expected, gap.value.got) == (expected, got)
        assert count_rows(db_path) == before
    with SQLiteStore(db_path) as fresh:
        assert list(fresh.read()) == events[:5]
    store.append(events[5:])
    assert list(store.read()) == events


def test_a_batch_failing_midway_leaves_no_trace(
    store: SQLiteStore, events: list[AnyEvent], db_path: Path
) -> None:
    store.index_lag = 1  # every append writes the key index
    store.append(events[:4])  # deposits and a withdrawal: no market key yet
    ((trader,),) = raw_query(db_path, "SELECT id FROM index_keys WHERE key = ?", (TRADER,))
    # Plant the index row of the trader's events in the next batch (its last one is 13), so
    # the batch fails after the market keys are interned.
    plant = "INSERT INTO key_segments (key_id, last_seq, first_seq, offsets) VALUES (?, ?, ?, ?)"
    raw_write(db_path, plant, (trader, 13, 5, b""))
    before = count_rows(db_path)
    with pytest.raises(errors.StoreError, match="UNIQUE constraint failed"):
        store.append(events[4:13])
    assert count_rows(db_path) == before
    assert store.get_meta("indexed_through") == "4"
    raw_write(db_path, "DELETE FROM key_segments WHERE last_seq = ?", (13,))
    assert store.last_seq() == 4
    store.append(events[4:])
    assert list(store.read()) == events
    # The key ids interned by the failed batch were rolled back; the store did not keep them.
    for reader in (store, SQLiteStore(db_path)):
        with reader:
            assert seqs(reader.read_for_key("market:396")) == MARKET_396_SEQS
            assert seqs(reader.read_for_key("market:397")) == MARKET_397_SEQS
            assert seqs(reader.read_for_key(TRADER)) == TRADER_SEQS


def test_a_commit_that_fails_is_rolled_back_and_reported(store: SQLiteStore, db_path: Path) -> None:
    """A COMMIT refused inside the transaction (here a deferred foreign key, broken by a
    trigger on the segments) is rolled back: nothing is written, the error names the file,
    and the next append starts a transaction of its own."""
    events = deposits(20)
    store.append(events[:10])
    assert store._conn is not None
    store._conn.execute("PRAGMA foreign_keys = ON")  # a setting of the store's connection
    raw_write(db_path, "CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    raw_write(
        db_path,
        "CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
    )
    orphan = (
        "CREATE TRIGGER orphan AFTER INSERT ON segments BEGIN INSERT INTO child VALUES (-1); END"
    )
    raw_write(db_path, orphan)
    before = count_rows(db_path)
    with pytest.raises(errors.StoreError) as failed:
        store.append(events[10:])
    assert str(failed.value) == f"SQLite error on {db_path}: FOREIGN KEY constraint failed"
    assert isinstance(failed.value.__cause__, sqlite3.IntegrityError)
    assert not store._conn.in_transaction
    assert count_rows(db_path) == before and store.last_seq() == 10
    raw_write(db_path, "DROP TRIGGER orphan")
    store.append(events[10:])
    assert list(store.read()) == events


@pytest.mark.parametrize("index_lag", [1, 3, 1000])
def test_two_stores_appending_to_one_file_keep_the_index_whole(
    db_path: Path, events: list[AnyEvent], index_lag: int
) -> None:
    with SQLiteStore(db_path) as one, SQLiteStore(db_path) as two:
        one.index_lag = two.index_lag = index_lag
        for n, start in enumerate(range(0, len(events), 2)):
            (one if n % 3 else two).append(events[start : start + 2])
            for store in (one, two):
                stored = events[: start + 2]
                assert store.read_for_key(TRADER) == [
                    ev for ev in stored if TRADER in event_keys(ev)
                ]
    with SQLiteStore(db_path) as reopened:
        assert seqs(reopened.read_for_key(TRADER)) == TRADER_SEQS
        assert (
            seqs(reopened.read_for_key("market:396", newest_first=True)) == (MARKET_396_SEQS[::-1])
        )
        reopened.index_lag = 1
        reopened.append(deposits(1, start_seq=len(events) + 1))  # writes the whole index
        assert reopened.get_meta("indexed_through") == str(len(events) + 1)
        assert seqs(reopened.read_for_key(MAKER)) == MAKER_SEQS


def test_a_lagging_index_is_written_a_chunk_at_a_time(db_path: Path) -> None:
    with SQLiteStore(db_path) as store:
        store.index_lag, store.index_chunk = 20, 4
        lags = []
        for event in deposits(60):
            store.append([event])
            lags.append(event.seq - int(store.get_meta("indexed_through") or 0))
        # Up to 19 behind; at 20, the oldest 4 events' rows are written (never all 20).
        assert lags[:19] == list(range(1, 20))
        assert set(lags[19:]) == {16, 17, 18, 19}
        # A batch larger than the chunk is indexed up to the same distance behind its end.
        store.append(deposits(50, start_seq=61))
        assert 110 - int(store.get_meta("indexed_through") or 0) <= 16
        assert seqs(store.read_for_key(TRADER)) == list(range(1, 111))
    with SQLiteStore(db_path) as reopened:  # the lagging rows rebuilt from the file
        assert seqs(reopened.read_for_key(TRADER, newest_first=True)) == list(range(110, 0, -1))


# ---------------------------------------------------------------------- reopening & replay


def test_reopening_gives_the_same_log_and_replay_gives_the_same_state(
    db_path: Path, session: tuple[Engine, list[AnyEvent]]
) -> None:
    engine, events = session
    with SQLiteStore(db_path) as store:
        store.append(events[:9])
        store.append(events[9:])
    with SQLiteStore(db_path, synchronous="NORMAL") as store:
        assert list(store.read()) == events
        assert seqs(store.read_for_key(TRADER)) == TRADER_SEQS
        replayed = Engine.replay(default_markets(), store.read())
    assert replayed.state() == engine.state()


def test_settings_reach_the_database(db_path: Path) -> None:
    for mode, level in (("FULL", 2), ("normal", 1), ("EXTRA", 3)):
        with SQLiteStore(db_path, synchronous=mode) as store:
            assert store._conn is not None
            assert store._conn.execute("PRAGMA synchronous").fetchone() == (level,)
            assert store.synchronous == mode.upper()
    assert raw_query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_query(db_path, "PRAGMA page_size") == [(PAGE_SIZE,)]
    with pytest.raises(errors.StoreError, match="synchronous must be one of"):
        SQLiteStore(db_path, synchronous="OFF")


def test_a_batch_commits_far_faster_than_single_commits(tmp_path: Path) -> None:
    events = deposits(600)
    with SQLiteStore(tmp_path / "batch.db") as store:
        start = time.perf_counter()
        store.append(events[:300])
        batched = time.perf_counter() - start
    with SQLiteStore(tmp_path / "single.db") as store:
        start = time.perf_counter()
        for event in events[:300]:
            store.append([event])
        single = time.perf_counter() - start
    assert batched * 5 < single, (batched, single)


def test_a_store_made_in_one_thread_works_in_another(db_path: Path) -> None:
    events = deposits(50)
    failures: list[BaseException] = []
    with SQLiteStore(db_path) as store:

        def work() -> None:
            try:
                store.append(events)
                assert list(store.read()) == events
            except BaseException as exc:  # surfaced to the test thread below
                failures.append(exc)

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        assert failures == []
        assert store.last_seq() == 50


# ---------------------------------------------------------------------- snapshots & meta


def test_snapshots_keep_only_the_latest_per_name(
    store: SQLiteStore, events: list[AnyEvent], db_path: Path
) -> None:
    assert store.load_snapshot("engine") is None
    store.save_snapshot(0, "engine", b"empty")
    assert store.load_snapshot("engine") == (0, b"empty")
    store.append(events)
    store.save_snapshot(5, "engine", b"at five")
    store.save_snapshot(5, "projections", b"\x00\xffbinary")
    store.save_snapshot(len(events), "engine", b"at the end")
    assert store.load_snapshot("engine") == (len(events), b"at the end")
    assert store.load_snapshot("projections") == (5, b"\x00\xffbinary")
    assert raw_query(db_path, "SELECT name, seq FROM snapshots ORDER BY name") == [
        ("engine", len(events)),
        ("projections", 5),
    ]
    store.close()
    with SQLiteStore(db_path) as reopened:
        assert reopened.load_snapshot("engine") == (len(events), b"at the end")


@pytest.mark.parametrize("seq", [-1, 25, 1000])
def test_a_snapshot_outside_the_log_is_refused(
    store: SQLiteStore, events: list[AnyEvent], seq: int
) -> None:
    store.append(events)
    store.save_snapshot(3, "engine", b"kept")
    with pytest.raises(errors.IntegrityError, match="outside the log"):
        store.save_snapshot(seq, "engine", b"bad")
    assert store.load_snapshot("engine") == (3, b"kept")


def test_meta_get_and_set(store: SQLiteStore, db_path: Path) -> None:
    assert store.get_meta("market_spec_hash") is None
    store.set_meta("market_spec_hash", "abc")
    store.set_meta("market_spec_hash", "def")
    assert store.get_meta("market_spec_hash") == "def"
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    store.close()
    with SQLiteStore(db_path) as reopened:
        assert reopened.get_meta("market_spec_hash") == "def"


# ---------------------------------------------------------------------- refusals


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    raw_write(db_path, "UPDATE meta SET value = ? WHERE key = ?", ("3", "schema_version"))
    with pytest.raises(errors.StoreError, match=r"schema version 3, newer than the version 2"):
        SQLiteStore(db_path)
    raw_write(db_path, "UPDATE meta SET value = ? WHERE key = ?", ("two", "schema_version"))
    with pytest.raises(errors.StoreError, match="not a number"):
        SQLiteStore(db_path)
    raw_write(db_path, "UPDATE meta SET value = ? WHERE key = ?", ("0", "schema_version"))
    with pytest.raises(errors.StoreError, match="unknown old schema version 0"):
        SQLiteStore(db_path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a SQLite database, just some text " * 100)
    with pytest.raises(errors.StoreError, match=r"notes\.txt.*not a database"):
        SQLiteStore(path)
    with pytest.raises(errors.StoreError, match="cannot open"):
        SQLiteStore(tmp_path / "missing-dir" / "events.db")


def test_a_closed_store_refuses_calls(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    store.close()
    store.close()  # harmless
    with pytest.raises(errors.StoreError, match="is closed"):
        store.last_seq()
    with pytest.raises(errors.StoreError, match="is closed"):
        store.append(deposits(1))


def test_an_unknown_body_format_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    raw_write(db_path, "UPDATE meta SET value = ? WHERE key = ?", ("msgpack", "body_format"))
    with pytest.raises(errors.StoreError, match="stored as 'msgpack'; this perps-indexer reads"):
        SQLiteStore(db_path)


# ---------------------------------------------------------------------- background checkpoints


def append_in_batches(store: SQLiteStore, events: list[AnyEvent], size: int = 1_000) -> None:
    for i in range(0, len(events), size):
        store.append(events[i : i + size])


def events_in_main_file(db: Path, tmp_path: Path) -> int:
    """Events in the database file alone, as if the WAL were lost: what checkpoints copied."""
    alone = tmp_path / "alone.db"
    alone.write_bytes(db.read_bytes())
    with closing(sqlite3.connect(alone)) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'segments'").fetchall():
            return 0  # not even the schema was copied yet
        return int(conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM segments").fetchone()[0])


def test_appends_checkpoint_inline_by_default(tmp_path: Path) -> None:
    db = tmp_path / "inline.db"
    with SQLiteStore(db, synchronous="NORMAL") as store:
        # A frame or more a commit: past SQLite's 1,000-frame WAL threshold (in batches, the
        # compressed events would need far more than this to get there).
        append_in_batches(store, deposits(3_000), size=1)
        assert events_in_main_file(db, tmp_path) > 0
        assert store.checkpoints == 0


def test_in_background_no_append_checkpoints_and_close_leaves_everything_in_the_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / "bg.db"
    store = SQLiteStore(db, synchronous="NORMAL")
    store.checkpoint_in_background(every=3_600)  # the thread will not get to run a pass
    store.checkpoint_in_background(every=3_600)  # again: nothing more
    events = deposits(100_000)
    append_in_batches(store, events)
    assert events_in_main_file(db, tmp_path) == 0  # all of it still in the WAL only
    store.close()
    assert events_in_main_file(db, tmp_path) == len(events)
    with SQLiteStore(db) as reopened:
        assert [e.seq for e in reopened.read()] == list(range(1, len(events) + 1))


def test_background_checkpoints_copy_the_wal_while_appends_go_on(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    events = deposits(30_000)
    with SQLiteStore(db, synchronous="NORMAL") as store:
        store.checkpoint_in_background(every=0.01)
        for i in range(0, len(events), 100):
            store.append(events[i : i + 100])
            if i % 3_000 == 0:
                time.sleep(0.02)  # let the checkpointer in now and then
        deadline = time.monotonic() + 10
        while events_in_main_file(db, tmp_path) < len(events) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert events_in_main_file(db, tmp_path) == len(events)
        assert store.checkpoints > 0
        assert [e.seq for e in store.read()] == list(range(1, len(events) + 1))
        assert len(store.read_for_key(TRADER)) == len(events)


def test_background_checkpoints_refuse_a_bad_interval_and_skip_memory() -> None:
    with SQLiteStore(":memory:") as store:
        with pytest.raises(ValueError, match="every must be positive"):
            store.checkpoint_in_background(every=0)
        store.checkpoint_in_background()  # an in-memory database has no WAL: nothing to do
        assert store.checkpoints == 0


def test_a_wal_past_the_bound_is_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="perps_indexer.store.sqlite")
    db = tmp_path / "r.db"
    events = deposits(20_000)
    with SQLiteStore(db, synchronous="NORMAL") as store:
        store.checkpoint_in_background(every=0.01, restart_frames=2)
        deadline = time.monotonic() + 10
        i = 0
        while i == 0 or wal_restarts(db) == 0:
            assert time.monotonic() < deadline, "the WAL was never restarted"
            if i < len(events):
                store.append(events[i : i + 500])
                i += 500
            time.sleep(0.005)
        assert "the next append restarts it" in caplog.text
        assert [e.seq for e in store.read()] == list(range(1, i + 1))


def test_the_default_bound_keeps_the_wal_small_under_a_steady_writer(tmp_path: Path) -> None:
    """A server's rhythm (a small append every half millisecond) with the server's default
    checkpoints: the WAL is restarted as it passes 1,024 frames (16 MiB), so its file stays
    within a small multiple of that (with the old bound, 16,384 frames, it was never restarted
    here)."""
    db = tmp_path / "steady.db"
    wal = Path(f"{db}-wal")
    events = deposits(20_000)
    largest = 0
    with SQLiteStore(db, synchronous="NORMAL") as store:
        store.checkpoint_in_background()
        for i in range(0, len(events), 5):
            store.append(events[i : i + 5])
            time.sleep(0.0005)
            if i % 500 == 0:
                largest = max(largest, wal.stat().st_size)
        restarts = wal_restarts(db)
        assert [e.seq for e in store.read()] == list(range(1, len(events) + 1))
    assert restarts >= 2
    assert largest < 3 * CHECKPOINT_RESTART_FRAMES * (PAGE_SIZE + 24), largest


def test_a_wal_restart_never_holds_sqlites_write_lock_against_an_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that never pauses: the checkpointer makes the WAL restart over and over, and
    no append ever finds SQLite's write lock taken (with a busy timeout of 0 it would fail at
    once, "database is locked"); an append waits on the store's own lock instead, which wakes
    it the moment the restart's pass is done (SQLite's busy handler sleeps in steps of up to
    100 ms)."""
    caplog.set_level(logging.DEBUG, logger="perps_indexer.store.sqlite")
    db = tmp_path / "w.db"
    events = deposits(30_000)
    with SQLiteStore(db, synchronous="NORMAL", busy_timeout=0) as store:
        store.checkpoint_in_background(every=0.002, restart_frames=8)
        for i in range(0, len(events), 10):
            store.append(events[i : i + 10])
        restarts = wal_restarts(db)
        assert [e.seq for e in store.read()] == list(range(1, len(events) + 1))
    assert restarts >= 5


def test_an_idle_wal_past_the_bound_is_readied_for_a_restart_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the bound with no append coming, the checkpointer readies the restart once, not
    at every pass: until an append restarts the WAL, another round of fsyncs and a held pass
    could only do the same again."""
    caplog.set_level(logging.DEBUG, logger="perps_indexer.store.sqlite")
    db = tmp_path / "idle.db"
    with SQLiteStore(db, synchronous="NORMAL") as store:
        store.checkpoint_in_background(every=0.005, restart_frames=2)
        append_in_batches(store, deposits(2_000), size=100)
        deadline = time.monotonic() + 10

        def passes(count: int) -> None:
            before = store.checkpoints
            while store.checkpoints < before + count:
                assert time.monotonic() < deadline, "the checkpointer stopped"
                time.sleep(0.005)

        # A restart may have been readied while the appends went on (and an append then
        # restarted the WAL): the one that counts is readied after the last append.
        passes(20)
        readied = caplog.text.count("the next append restarts it")
        assert readied >= 1, "the restart was never readied"
        passes(20)  # twenty more passes with no append
        assert caplog.text.count("the next append restarts it") == readied
        restarts = wal_restarts(db)
        store.append(deposits(2_001)[2_000:])  # this append restarts the WAL
        assert wal_restarts(db) == restarts + 1


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="reads Linux's /proc/locks")
def test_closing_a_store_keeps_another_connections_locks_on_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpointer fsyncs the database file through a descriptor of its own before a
    restart. Closing any descriptor of a file drops every POSIX lock the process holds on it,
    so that descriptor is never closed: another connection of the process keeps its lock,
    which tells other processes the WAL is in use."""
    caplog.set_level(logging.DEBUG, logger="perps_indexer.store.sqlite")
    db = tmp_path / "two.db"
    with SQLiteStore(db, synchronous="NORMAL") as other:
        store = SQLiteStore(db, synchronous="NORMAL")
        store.checkpoint_in_background(every=0.005, restart_frames=2)
        append_in_batches(store, deposits(2_000), size=100)
        deadline = time.monotonic() + 10
        while "the next append restarts it" not in caplog.text:  # the descriptor is open
            assert time.monotonic() < deadline, "the restart was never readied"
            time.sleep(0.005)
        store.close()
        assert other.last_seq() == 2_000
        inode, pid = os.stat(db).st_ino, os.getpid()
        held = [
            line
            for line in Path("/proc/locks").read_text().splitlines()
            if f" {pid} " in line and line.split()[5].endswith(f":{inode}")
        ]
        assert held, "the process lost its locks on the database file"


def test_a_wal_held_open_by_a_reader_is_reported_and_restarted_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection's read transaction pins the WAL: no pass can copy past its snapshot,
    so the WAL cannot be restarted and grows with every append. Once it has stayed far past
    its bound for WAL_WARN_PASSES passes, the checkpointer says so, once (not at every pass),
    with the WAL's size at the last pass in :attr:`wal_frames`; once the reader is done, the
    WAL is restarted again."""
    caplog.set_level(logging.WARNING, logger="perps_indexer.store.sqlite")
    db = tmp_path / "pinned.db"
    events = deposits(20_000)
    with SQLiteStore(db, synchronous="NORMAL") as store:
        store.append(events[:100])
        store.checkpoint_in_background(every=0.005, restart_frames=2)
        deadline = time.monotonic() + 10
        with closing(sqlite3.connect(db, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM segments").fetchone()[0] > 0
            restarts = wal_restarts(db)
            i = 100
            while store.wal_frames < WAL_WARN_FACTOR * 2:  # far past: not said at once
                assert time.monotonic() < deadline, "the WAL never grew"
                store.append(events[i : i + 10])
                i += 10
                time.sleep(0.002)
            passes = store.checkpoints
            while "read transaction open" not in caplog.text:
                assert time.monotonic() < deadline, "the checkpointer never warned"
                store.append(events[i : i + 10])
                i += 10
                time.sleep(0.002)
            assert store.checkpoints - passes >= WAL_WARN_PASSES - 2
            assert wal_restarts(db) == restarts  # pinned: never restarted meanwhile
            warning = caplog.records[-1]
            assert warning.levelno == logging.WARNING
            assert f"{db}: the WAL holds" in warning.getMessage()
            for _ in range(20):  # more growth and passes: not said again within the minute
                store.append(events[i : i + 10])
                i += 10
                time.sleep(0.005)
            assert caplog.text.count("read transaction open") == 1
            reader.execute("COMMIT")
        while wal_restarts(db) == restarts:
            assert time.monotonic() < deadline, "the WAL was not restarted after the reader"
            assert i < len(events), "the WAL was not restarted after the reader"
            store.append(events[i : i + 10])
            i += 10
            time.sleep(0.005)
        assert [e.seq for e in store.read()] == list(range(1, i + 1))


def test_one_large_transaction_is_no_cause_for_the_wal_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot of the read models is one large transaction: the WAL is far past its bound
    until a pass has copied it and the next append restarts it, however long a quiet server
    takes to make one. Not a WAL held open: no warning."""
    caplog.set_level(logging.WARNING, logger="perps_indexer.store.sqlite")
    db = tmp_path / "burst.db"
    events = deposits(12_000)
    with SQLiteStore(db, synchronous="NORMAL") as store:
        store.checkpoint_in_background(every=0.005, restart_frames=2)
        store.append(events[:10_000])  # one transaction of many pages
        deadline = time.monotonic() + 20
        while store.wal_frames < WAL_WARN_FACTOR * 2:
            assert time.monotonic() < deadline, "no pass saw the large WAL"
            time.sleep(0.002)
        restarts, passes, i = wal_restarts(db), store.checkpoints, 10_000
        while store.checkpoints - passes < 2 * WAL_WARN_PASSES:  # quiet: no append
            assert time.monotonic() < deadline, "the checkpointer stopped"
            time.sleep(0.01)
        assert store.wal_frames >= WAL_WARN_FACTOR * 2  # still waiting for an append
        assert wal_restarts(db) == restarts
        passes = store.checkpoints
        while store.checkpoints - passes < 2 * WAL_WARN_PASSES:
            assert time.monotonic() < deadline, "the checkpointer stopped"
            store.append(events[i : i + 1])
            i += 1
            time.sleep(0.005)
        assert wal_restarts(db) > restarts
        assert store.wal_frames < WAL_WARN_FACTOR * 2
    assert "the WAL holds" not in caplog.text
