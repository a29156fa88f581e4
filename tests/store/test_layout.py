"""The segment layout: any event stream round-trips, and version 1 files are converted."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import lz4.block
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perps_indexer import errors
from perps_indexer.engine import Engine
from perps_indexer.events import AnyEvent, to_json
from perps_indexer.markets import default_markets
from perps_indexer.store import event_keys
from perps_indexer.store import sqlite as sqlite_store
from perps_indexer.store.base import BODY_FORMAT, PLAIN_BODY_FORMAT
from perps_indexer.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.store.conftest import TRADER, drive_engine

TEMPLATES = drive_engine()[1]
KEYS = sorted({key for ev in TEMPLATES for key in event_keys(ev)})


def renumbered(picks: list[int]) -> list[AnyEvent]:
    """Real events of every shape, in any order, with seqs 1, 2, …"""
    return [msgspec.structs.replace(TEMPLATES[i], seq=n) for n, i in enumerate(picks, 1)]


def split(events: list[AnyEvent], cuts: list[int]) -> list[list[AnyEvent]]:
    bounds = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


def for_key(
    events: list[AnyEvent], key: str, after: int, before: int | None, newest_first: bool
) -> list[AnyEvent]:
    """What read_for_key must return, worked out from event_keys alone (limit aside)."""
    found = [
        ev
        for ev in events
        if key in event_keys(ev) and ev.seq > after and (before is None or ev.seq < before)
    ]
    return found[::-1] if newest_first else found


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, len(TEMPLATES) - 1), min_size=12, max_size=80),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    segment_events=st.integers(1, 9),
    read_chunk=st.integers(1, 4),
    index_lag=st.integers(1, 30),
    index_chunk=st.integers(1, 30),
    limit=st.none() | st.integers(0, 12),
    newest_first=st.booleans(),
    data=st.data(),
)
def test_any_stream_round_trips_through_any_batching(
    picks: list[int],
    cuts: list[int],
    segment_events: int,
    read_chunk: int,
    index_lag: int,
    index_chunk: int,
    limit: int | None,
    newest_first: bool,
    data: st.DataObject,
) -> None:
    events = renumbered(picks)
    # Bounds inside the stream mostly, and sometimes just past either end.
    after = data.draw(st.integers(0, len(events) + 1), label="after")
    before = data.draw(st.none() | st.integers(after, len(events) + 2), label="before")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.db"
        with SQLiteStore(path, synchronous="NORMAL") as store:
            store.segment_events = segment_events
            store.read_chunk = read_chunk
            store.index_lag = index_lag  # the index lags, wholly or partly, or is complete
            store.index_chunk = index_chunk  # and catches up in steps of any size
            for batch in split(events, cuts):
                store.append(batch)
            assert list(store.read()) == events
            tail = [ev for ev in events if ev.seq > after]
            assert list(store.read(after, limit)) == (tail if limit is None else tail[:limit])
            for key in KEYS:
                expected = for_key(events, key, after, before, newest_first)
                got = store.read_for_key(
                    key, after=after, before=before, limit=limit, newest_first=newest_first
                )
                assert got == (expected if limit is None else expected[:limit])
        # Reopened, without the interned keys in memory.
        with SQLiteStore(path) as store:
            assert store.read_for_key(KEYS[0]) == for_key(events, KEYS[0], 0, None, False)
            assert [to_json(ev) for ev in store.read()] == [to_json(ev) for ev in events]


# ---------------------------------------------------------------------- version 1 files

# The version 1 layout and statements, as perps-indexer wrote them (kept here verbatim so that
# the conversion is tested against real version 1 files, not against today's code).
V1_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS events ("
    "seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, type TEXT NOT NULL, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS event_keys ("
    "key TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (key, seq))",
    "CREATE TABLE IF NOT EXISTS snapshots ("
    "name TEXT PRIMARY KEY, seq INTEGER NOT NULL, data BLOB NOT NULL)",
)


def write_v1(path: Path, events: list[AnyEvent]) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("schema_version", "1"), ("body_format", "json"), ("market_spec_hash", "abc")],
        )
        conn.executemany(
            "INSERT INTO events (seq, ts, type, body) VALUES (?, ?, ?, ?)",
            [(ev.seq, ev.ts, type(ev).__struct_config__.tag, to_json(ev)) for ev in events],
        )
        conn.executemany(
            "INSERT INTO event_keys (key, seq) VALUES (?, ?)",
            [(key, ev.seq) for ev in events for key in event_keys(ev)],
        )
        conn.execute(
            "INSERT INTO snapshots (name, seq, data) VALUES (?, ?, ?)", ("engine", 3, b"\x00v1")
        )


def tables(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def test_a_version_1_file_is_converted_when_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, events = drive_engine()
    path = tmp_path / "v1.db"
    write_v1(path, events)
    with SQLiteStore(path) as store:
        store.segment_events = 5  # conversion and later appends use the store's segment size
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert store.get_meta("body_format") == BODY_FORMAT
        assert store.get_meta("market_spec_hash") == "abc"
        assert store.load_snapshot("engine") == (3, b"\x00v1")
        assert list(store.read()) == events
        for key in KEYS:
            assert store.read_for_key(key) == for_key(events, key, 0, None, False)
        more = engine.deposit(TRADER, 5, ts=10**7)
        store.append(more)
        assert store.read_for_key(TRADER, limit=1, newest_first=True) == more
    assert "converted the event store from schema v1 to v2 (24 events)" in caplog.text
    assert {"events", "event_keys"}.isdisjoint(tables(path))
    with SQLiteStore(path) as reopened:
        assert list(reopened.read()) == events + more
        assert Engine.replay(default_markets(), reopened.read()).state() == engine.state()


@pytest.mark.parametrize("damage", ["hole", "junk"])
def test_a_damaged_version_1_file_is_refused_and_left_as_it_was(
    tmp_path: Path, damage: str
) -> None:
    events = drive_engine()[1]
    path = tmp_path / "v1.db"
    write_v1(path, events)
    with closing(sqlite3.connect(path)) as conn, conn:
        if damage == "hole":
            conn.execute("DELETE FROM events WHERE seq = 7")
        else:
            conn.execute("UPDATE events SET body = ? WHERE seq = 7", (b"{junk",))
    error = errors.SequenceGap if damage == "hole" else errors.IntegrityError
    with pytest.raises(error):
        SQLiteStore(path)
    assert {"events", "event_keys"} <= tables(path)
    assert "segments" not in tables(path)
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        (count,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
    assert version == ("1",)
    assert count == len(events) - (damage == "hole")


# ---------------------------------------------------------------------- plain bodies


def bodies(path: Path) -> dict[int, tuple[bytes, bytes]]:
    """Each segment's (ends, body), by its first seq."""
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT first_seq, ends, body FROM segments").fetchall()
    return {first: (ends, body) for first, ends, body in rows}


def write_plain(path: Path, events: list[AnyEvent]) -> dict[int, bytes]:
    """A version 2 file as perps-indexer wrote it before bodies were compressed: today's
    layout, with each body plain JSON and the body format "json"; returns the plain bodies."""
    with SQLiteStore(path) as store:
        store.segment_events = 5
        for i in range(0, len(events), 7):
            store.append(events[i : i + 7])
    plain = {}
    with closing(sqlite3.connect(path)) as conn, conn:
        for first, (ends, body) in bodies(path).items():
            size = int.from_bytes(ends[-4:], "little")
            plain[first] = lz4.block.decompress(body, uncompressed_size=size)
            conn.execute("UPDATE segments SET body = ? WHERE first_seq = ?", (plain[first], first))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'body_format'", (PLAIN_BODY_FORMAT,))
    return plain


def test_a_file_of_plain_bodies_is_compressed_when_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, events = drive_engine()
    path = tmp_path / "plain.db"
    plain = write_plain(path, events)
    assert plain[1].startswith(b'{"type":') and len(plain) > 2
    monkeypatch.setattr(sqlite_store, "COMPRESS_CHUNK", 2)  # several steps
    with SQLiteStore(path) as store:
        assert store.get_meta("body_format") == BODY_FORMAT
        assert list(store.read()) == events
        for key in KEYS:
            assert store.read_for_key(key) == for_key(events, key, 0, None, False)
        more = engine.deposit(TRADER, 5, ts=10**7)
        store.append(more)
    assert f"compressed the event bodies ('json' to 'json+lz4', {len(events)} events)" in (
        caplog.text
    )
    stored = bodies(path)
    for first, body in plain.items():  # the same JSON, now as LZ4 blocks
        assert lz4.block.decompress(stored[first][1], uncompressed_size=len(body)) == body
    with SQLiteStore(path) as reopened:
        assert list(reopened.read()) == events + more
        assert Engine.replay(default_markets(), reopened.read()).state() == engine.state()


def test_a_damaged_file_of_plain_bodies_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    events = drive_engine()[1]
    path = tmp_path / "plain.db"
    plain = write_plain(path, events)
    last = max(plain)
    with closing(sqlite3.connect(path)) as conn, conn:  # one byte more than its offsets say
        conn.execute("UPDATE segments SET body = ? WHERE first_seq = ?", (plain[last] + b" ", last))
    with pytest.raises(errors.IntegrityError, match="is damaged"):
        SQLiteStore(path)
    with closing(sqlite3.connect(path)) as conn:
        (found,) = conn.execute("SELECT value FROM meta WHERE key = 'body_format'").fetchone()
    assert found == PLAIN_BODY_FORMAT
    assert {first: body for first, (_, body) in bodies(path).items()} == {
        **plain,
        last: plain[last] + b" ",
    }


def test_a_plain_body_in_a_converted_file_is_named_as_such(tmp_path: Path) -> None:
    """What a process of an older version appends when it still had the file open at the
    conversion: plain JSON among the compressed bodies. Reading it fails, and says why."""
    events = drive_engine()[1]
    path = tmp_path / "plain.db"
    plain = write_plain(path, events)
    SQLiteStore(path).close()  # converted
    last = max(plain)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE segments SET body = ? WHERE first_seq = ?", (plain[last], last))
    with SQLiteStore(path) as store, pytest.raises(errors.IntegrityError) as caught:
        list(store.read())
    assert f"events {last}..{len(events)} cannot be expanded" in str(caught.value)
    assert "older perps-indexer that still had this file open" in str(caught.value)
