"""Freshness at several order rates, ours beside the bare feed, in turns (scenario 6's setup).

    .venv/bin/python bench/rate_sweep.py [--rates 100,500,1000] [--rounds 2] [--kinds ours,bare]
        [--commit HEAD] [--trace DIR] [--skip 1.0] [--json FILE] [--quick]

Each row is scenario 6's judged setup at one paced rate: a fresh server (ours, ``python -m
perps_indexer serve``, or the bare feed, bench/bare_fresh.py), 1,000 ``orderbook`` subscribers
(bench/fleet.c's, 50 of them recording with the kernel's receive stamps, and 20 in a probe
process), 32 REST posters at ``--rate`` orders a second, one 10-second window. The rows go in
turns (every kind at every rate, then again), so that the host's slow spells fall on all of
them alike. Servers on CPU 0, everything else on CPU 1, as in bench/suite.py.

Per row: the order rate reached, messages delivered a second, the server's CPU and its time
per message, freshness p50/p99 read by the fleet and at its sockets, the p99 counting only
orders posted ``--skip`` seconds or more into the window (the first half second is slow for any
server: fresh connections), and the host's speed just after. With ``--trace DIR`` the first 4 s
of each window are recorded as ``suite.py --profiler trace`` does, and the rounds of 1,000 sends
are summarised (bench/slice_trace.py): the whole round, its sends and the time between them.

Prints one line a row and a table at the end; ``--json`` keeps the rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as b
import slice_trace
import suite

SUBSCRIBERS = 1_000
PROBES = 20
POSTERS = 32


def one_row(ctx: suite.Context, kind: str, rate: float, name: str, skip: float) -> dict[str, Any]:
    n = 20 if ctx.quick else SUBSCRIBERS
    probes = 5 if ctx.quick else PROBES
    if kind == "ours":
        server = b.start_server("ours", ctx.db(name))
    else:
        server = b.start_server("bare-fresh", None, "--message", str(suite.bare_payload(ctx)))
    extra = ["--rate", f"{rate:.1f}", "--concurrency", str(POSTERS)]
    with suite.running(server.proc):
        run, _ = suite.book_run(
            ctx,
            server,
            n,
            name,
            extra,
            ctx.profile is not None,
            probes=probes,
            fleet=True,
            stamps=True,
        )
    problems = suite.lost(run, n)
    ctx.failures += [f"{name}: {p}" for p in problems]
    messages = suite.delivered(run)
    read = b.summary_ms(suite.freshness(run.drive, run.subs["logs"]))
    late = run.drive["t_start"] + int(skip * 1e9)  # the commands posted this late or later
    late_read = b.summary_ms(suite.freshness(run.drive, run.subs["logs"], late))
    row: dict[str, Any] = {
        "kind": kind,
        "rate": rate,
        "orders_per_s": suite.order_rate(run),
        "messages_per_s": messages,
        "server_cpu": run.server_cpu,
        "us_per_message": run.server_cpu / messages * 1e6 if messages else None,
        "freshness_ms": read,
        "socket_freshness_ms": suite.socket_freshness(run),
        f"p99_after_{skip:g}s": late_read["p99"],
        "host": 0 if ctx.quick else suite.calibrate(),
        "problems": problems,
    }
    if ctx.profile is not None:
        path = ctx.profile / f"{name}.trace.data"
        if path.exists():
            found = slice_trace.rounds(slice_trace.read(str(path)), n)
            row["rounds"] = {
                part: {
                    f"p{q}": b.percentile([getattr(r, part) for r in found], q) for q in (50, 99)
                }
                for part in ("ms", "send_ms", "between_ms")
            } | {"count": len(found)}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,500,1000", help="orders a second, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="times through every row")
    parser.add_argument("--kinds", default="ours,bare", help="ours, bare (bench/bare_fresh.py)")
    parser.add_argument("--commit", help="run perps_indexer as of this commit (exported)")
    parser.add_argument("--trace", help="record the server's system calls here (4 s a row)")
    parser.add_argument("--skip", type=float, default=1.0, help="seconds left out of a late p99")
    parser.add_argument("--json", help="where to write the rows")
    parser.add_argument("--quick", action="store_true", help="20 subscribers, half-second windows")
    parser.add_argument("--server-args", default="", help="extra arguments for our server")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - {"ours", "bare"}:
        parser.error(f"--kinds: no such server {', '.join(sorted(unknown))}")
    rates = [float(r) for r in args.rates.split(",")]
    b.SERVER_ARGS[:] = args.server_args.split()
    b.raise_nofile()
    b.pin(b.LOAD_CPU)  # the orchestrator is load, not server
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="perps-sweep-") as tmp:
        if args.commit:
            b.SRC[0] = Path(suite.export_commit(args.commit, Path(tmp)))
        profile = Path(args.trace) if args.trace else None
        ctx = suite.Context(args.quick, Path(tmp), profile, profiler="trace")
        for turn, rate, kind in itertools.product(range(args.rounds), rates, kinds):
            row = one_row(ctx, kind, rate, f"sweep-{kind}-{rate:g}-{turn}", args.skip)
            row["turn"] = turn
            rows.append(row)
            fresh = row["freshness_ms"]
            print(
                f"{time.strftime('%H:%M:%S')} {kind} at {rate:g}/s: {row['orders_per_s']:.0f}/s, "
                f"{row['messages_per_s']:,.0f} messages/s, p50 {fresh['p50']:.1f} p99 "
                f"{fresh['p99']:.1f} ms",
                flush=True,
            )
    print(
        "\n| server | orders/s | messages/s | CPU | µs/message | p99 read (socket) | "
        f"p99 after {args.skip:g} s | host |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        socket = row["socket_freshness_ms"]
        at_socket = f" ({socket['p99']:.1f})" if socket else ""
        per = row["us_per_message"]
        print(
            f"| {row['kind']} | {row['orders_per_s']:,.0f} | {row['messages_per_s']:,.0f} | "
            f"{row['server_cpu']:.0%} | {per:.2f} | {row['freshness_ms']['p99']:.1f}{at_socket} | "
            f"{row[f'p99_after_{args.skip:g}s']:.1f} | {row['host']:,} |"
            if per is not None
            else f"| {row['kind']} | {row['orders_per_s']:,.0f} | 0 | - | - | - | - | - |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "failures": ctx.failures}, indent=1))
    for failure in ctx.failures:
        print(f"problem: {failure}", file=sys.stderr)
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
