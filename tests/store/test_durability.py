"""Acknowledged appends survive the writer being killed with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from perps_indexer.engine import Engine
from perps_indexer.markets import default_markets
from perps_indexer.store import event_keys
from perps_indexer.store.sqlite import SQLiteStore

# Appends batches of real events forever, printing each batch's last seq once append returned.
WRITER = textwrap.dedent(
    """
    import sys
    from perps_indexer.engine import Engine
    from perps_indexer.markets import default_markets
    from perps_indexer.store.sqlite import SQLiteStore

    path, synchronous, checkpoints = sys.argv[1], sys.argv[2], sys.argv[3]
    engine = Engine(default_markets())
    store = SQLiteStore(path, synchronous=synchronous)
    if checkpoints == "background":  # as the server: killed in the middle of some, too
        store.checkpoint_in_background(every=0.005)
    n = 0
    while True:
        batch = []
        for _ in range(25):
            n += 1
            batch += engine.deposit(hex(n % 7 + 1), n, ts=n)
        store.append(batch)
        print(batch[-1].seq, flush=True)
    """
)
ACKS_BEFORE_KILL = 30


@pytest.mark.parametrize("checkpoints", ["inline", "background"])
@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_acknowledged_appends_survive_sigkill(
    tmp_path: Path, synchronous: str, checkpoints: str
) -> None:
    path = tmp_path / "events.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    acks: list[int] = []
    with subprocess.Popen(
        [sys.executable, str(script), str(path), synchronous, checkpoints],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as writer:
        assert writer.stdout is not None
        deadline = time.monotonic() + 60
        while len(acks) < ACKS_BEFORE_KILL and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            acks.append(int(line))
        # Killed while it keeps appending: most likely in the middle of a transaction.
        writer.send_signal(signal.SIGKILL)
        _, stderr = writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    assert len(acks) == ACKS_BEFORE_KILL, stderr
    assert acks == sorted(acks)

    with SQLiteStore(path) as store:
        events = list(store.read())  # read() itself refuses a hole
        assert store.first_seq() == 1
        assert store.last_seq() >= acks[-1]
        assert [ev.seq for ev in events] == list(range(1, store.last_seq() + 1))
        stored = {ev.seq for ev in events}
        assert all(ack in stored for ack in acks)
        # Whole batches or nothing: the log ends on a batch boundary.
        assert store.last_seq() % 25 == 0
        Engine.replay(default_markets(), events)
        # The key index lagged the log when the writer died: what it lacks is rebuilt.
        for (address,) in {event_keys(ev) for ev in events[:7]}:
            mine = [ev for ev in events if event_keys(ev) == (address,)]
            assert len(mine) > 1
            assert store.read_for_key(address) == mine
