"""How long an append waits while the background checkpointer restarts the WAL.

    python bench/restart_stall.py [--commands 8000] [--restart-frames 4000] [--group 2]

Scenario 2's commands (:mod:`command_cost`'s market buys, each filling 5 resting asks) run
through :meth:`Venue.flush` every ``--group`` commands with a short pause after each flush,
a writer that never stops for long, with checkpoints on their thread as the server runs them
(every 0.05 s) and the WAL restarted past ``--restart-frames`` frames (the server's default
is 16,384; fewer restarts sooner). Every flush is timed. Before c282f94 the checkpointer
restarted the WAL with ``wal_checkpoint(RESTART)`` and the flush after it took 30-150 ms;
now it should stay near the others. (The first flush, cold, and one more about 1.6 s in take
10-12 ms with the old store and the new alike.)

Prints one JSON object: the WAL's restarts (its header's checkpoint sequence number), the
flushes' p50 / p99 / max in ms, and every flush over ``--slow`` ms with its time since the
first command (ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as b
import command_cost as cc
from perps_indexer.store.sqlite import CHECKPOINT_EVERY, SQLiteStore

ACCOUNTS = 10_000


def run(args: argparse.Namespace) -> dict[str, Any]:
    db = cc.prefilled(Path(args.db), ACCOUNTS, args.commands)
    with tempfile.TemporaryDirectory(prefix="bench-restart-stall-") as tmp:
        path = Path(tmp) / "run.db"
        shutil.copyfile(db, path)
        with SQLiteStore(path, synchronous="NORMAL") as store:
            store.checkpoint_in_background(CHECKPOINT_EVERY, restart_frames=args.restart_frames)
            venue = cc.counting_venue(store, cc.CountingHub(False))
            gc.freeze()
            orders = cc.market_buys(args.commands, ACCOUNTS)
            flushes: list[int] = []  # ns
            slow: list[tuple[int, float]] = []
            started = time.perf_counter_ns()
            for n, order in enumerate(orders, 1):
                venue._run(order)
                if n % args.group == 0 or n == args.commands:
                    at = time.perf_counter_ns()
                    venue.flush()
                    flushes.append(time.perf_counter_ns() - at)
                    if flushes[-1] > args.slow * 1e6:
                        slow.append(((at - started) // 10**6, round(flushes[-1] / 1e6, 1)))
                    time.sleep(args.pause)
            seconds = (time.perf_counter_ns() - started) / 1e9
            restarts = b.wal_restarts(path)
    return {
        "commands": args.commands,
        "seconds": round(seconds, 2),
        "restarts": restarts,
        "flush_ms": b.summary_ms(flushes),
        "slow_flushes": slow,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=8_000)
    parser.add_argument("--restart-frames", type=int, default=4_000)
    parser.add_argument("--group", type=int, default=2, help="commands per flush")
    parser.add_argument("--pause", type=float, default=0.0008, help="seconds after a flush")
    parser.add_argument("--slow", type=float, default=5.0, help="list flushes over this (ms)")
    parser.add_argument("--db", default=str(Path(tempfile.gettempdir()) / "perps-restart-stall.db"))
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
