"""Where the server's fan-out cycle goes, read from its system calls: the sends, and the rest.

    python bench/slice_trace.py TRACE.data [TRACE.data ...]

``TRACE.data`` is a ``perf record`` of five syscall tracepoints of the server's process (what
``suite.py --profile DIR --profiler trace`` and ``rate_sweep.py --trace DIR`` record; tracepoints
need no hardware counters, which this VM lacks):

    perf record -e syscalls:sys_enter_io_uring_enter,syscalls:sys_exit_io_uring_enter,\\
        syscalls:sys_enter_pwrite64,syscalls:sys_enter_write,syscalls:sys_enter_epoll_pwait \\
        -p PID -o TRACE.data -- sleep 4

With io_uring (the default) the fan-out submits a slice's sends in one ``io_uring_enter``, which
returns when all have completed: its length over its sends is what one send costs the server's
core, the receiver's loopback processing included. Between two submissions is everything else:
the slice's Python, the loop's turn, and in some of them an order turn (the REST lane's requests,
the engine, the commit, whose WAL writes are the ``pwrite64`` calls, the projections and the
book's push). Gaps are split by whether they held a commit, so the cost of an order turn is the
difference of the two means, robust to the host's swings in a way that a p99 is not. Reply
writes (``write``) are counted per gap.

Prints, per file: sends per submission, µs per send (p10/p50/p90/p99), the gaps between
submissions with and without a commit (count, mean, p99), each side's share of the traced time,
the rounds of ``--round`` sends (one push to each subscriber: the whole round, its sends and the
time between its submissions, p50/p90/p99), and the mean per 100 ms (µs per send | gap per
slice) to show slow spells. A server running
``--no-io-uring`` makes one ``send`` a connection; it is not read here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from benchlib import percentile

EVENTS = (
    "syscalls:sys_enter_io_uring_enter,syscalls:sys_exit_io_uring_enter,"
    "syscalls:sys_enter_pwrite64,syscalls:sys_enter_write,syscalls:sys_enter_epoll_pwait"
)
"""The tracepoints to record (``perf record -e``). The event loop's waits tell a round's end:
the fan-out loop only waits with a timeout (blocks) when no round is pending; between slices
it yields with a zero timeout."""

LINE = re.compile(r"\s(\d+)\s+\[\d+\]\s+(\d+\.\d+):\s+syscalls:(\w+):(.*)")
"""``comm tid [cpu] time: syscalls:event: arguments``, as ``perf script`` prints a tracepoint."""
SUBMIT = re.compile(r"to_submit: (0x[0-9a-f]+)")
RING = re.compile(r"fd: (0x[0-9a-f]+)")
TIMEOUT = re.compile(r"timeout: (0x[0-9a-f]+)")
MIN_SENDS = 20
"""Submissions with fewer sends (a slice's tail) are left out of the per-send figure: a fixed
cost per call would weigh on them."""
ROUND_SENDS = 1_000
"""Sends in a round by default: one push to each of scenario 6's 1,000 subscribers."""
IDLE_MS = 1.2
"""In a trace without the event loop's waits (recorded before they were traced), a gap between
submissions longer than this ends a round: the server went idle (at a low order rate a round
ends before the next order), and what came before is not part of it."""


@dataclass
class Gap:
    """The time between one submission's return and the next one's start."""

    ms: float
    commit: bool  # the store wrote its WAL in it: an order turn
    replies: int


class Submission(NamedTuple):
    """One ``io_uring_enter`` of the loop's thread."""

    began: float  # entered (seconds)
    ended: float  # returned
    sends: int
    ring: int  # the ring's descriptor
    blocked: int  # how many times the loop had blocked in a wait before it


@dataclass
class Trace:
    per_send_us: list[float] = field(default_factory=list)
    sends: list[int] = field(default_factory=list)
    send_ms: float = 0.0
    gaps: list[Gap] = field(default_factory=list)
    series: dict[int, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    submissions: list[Submission] = field(default_factory=list)
    waits: int = 0
    """The event loop's waits seen (none in a trace recorded without them)."""


@dataclass
class Round:
    """Consecutive submissions that made one push to every subscriber."""

    ms: float  # from the first submission's start to the last one's return
    send_ms: float  # inside the submissions
    between_ms: float  # between them: the slices' Python, the loop's turns, the orders


def rounds(trace: Trace, sends: int = ROUND_SENDS, idle_ms: float = IDLE_MS) -> list[Round]:
    """The fan-out's submissions grouped into rounds of ``sends`` sends. A round ends early
    where the loop blocked in a wait (it had nothing to send), or, in a trace without the
    waits, at a gap longer than ``idle_ms``; a round cut short so, or by the trace's ends, is
    left out. The fan-out's ring is the one most submissions went to: libuv submits on a ring
    of its own (its batched ``epoll_ctl``), which is not the fan-out's."""
    if not trace.submissions:
        return []
    ring = Counter(sub.ring for sub in trace.submissions).most_common(1)[0][0]
    out: list[Round] = []
    group: list[Submission] = []
    count = 0  # the group's sends
    for sub in trace.submissions:
        if sub.ring != ring:
            continue
        if not group:
            idle = False
        elif trace.waits:
            idle = sub.blocked > group[-1].blocked  # the loop blocked since the last one
        else:
            idle = (sub.began - group[-1].ended) * 1e3 > idle_ms
        if idle:
            group, count = [], 0  # the server was idle: a round does not span it
        group.append(sub)
        count += sub.sends
        if count >= sends:
            whole = (group[-1].ended - group[0].began) * 1e3
            inside = sum(one.ended - one.began for one in group) * 1e3
            out.append(Round(whole, inside, whole - inside))
            group, count = [], 0
    return out


def read(path: str) -> Trace:
    """The trace in a ``perf record`` file (``perf script`` prints it)."""
    script = ["perf", "script", "-i", path]
    return parse(subprocess.run(script, capture_output=True, text=True, check=True).stdout)


def parse(text: str) -> Trace:
    """The trace in ``perf script``'s output of the tracepoints of :data:`EVENTS` (a trace
    recorded before the event loop's waits were among them reads as one without waits)."""
    trace = Trace()
    entered: tuple[float, int, int] | None = None
    blocked = 0  # the loop's waits with a timeout so far
    returned: float | None = None
    commit, replies = False, 0
    start: float | None = None
    loop = ""
    for line in text.splitlines():
        match = LINE.search(line)
        if not match:
            continue
        tid, t, event, args = match.group(1), float(match.group(2)), match.group(3), match.group(4)
        start = t if start is None else start
        if event == "sys_enter_io_uring_enter":
            loop = tid  # the event loop's thread: the checkpointer's writes are not commits
            found, ring = SUBMIT.search(args), RING.search(args)
            entered = (
                t,
                int(found.group(1), 16) if found else 0,
                int(ring.group(1), 16) if ring else -1,
            )
            if returned is not None:
                gap = Gap((t - returned) * 1e3, commit, replies)
                trace.gaps.append(gap)
                trace.series[int((t - start) * 10)][2] += gap.ms
            commit, replies = False, 0
        elif event == "sys_exit_io_uring_enter" and entered is not None:
            began, n, fd = entered
            trace.send_ms += (t - began) * 1e3
            trace.submissions.append(Submission(began, t, n, fd, blocked))
            if n >= MIN_SENDS:
                us = (t - began) * 1e6 / n
                trace.per_send_us.append(us)
                trace.sends.append(n)
                bucket = trace.series[int((began - start) * 10)]
                bucket[0] += 1
                bucket[1] += us
            returned, entered = t, None
        elif event == "sys_enter_epoll_pwait" and tid in (loop, ""):
            trace.waits += 1
            timeout = TIMEOUT.search(args)
            blocked += timeout is not None and int(timeout.group(1), 16) != 0
        elif tid != loop:
            continue
        elif event == "sys_enter_pwrite64":
            commit = True
        elif event == "sys_enter_write":
            replies += 1
    return trace


def summary(path: str, trace: Trace, round_sends: int = ROUND_SENDS) -> list[str]:
    if not trace.per_send_us:
        return [f"{path}: no io_uring submissions of {MIN_SENDS} sends or more"]
    out = [f"{path}:"]
    sends = sum(trace.sends) / len(trace.sends)
    quartiles = " / ".join(f"{percentile(trace.per_send_us, p):.2f}" for p in (10, 50, 90, 99))
    out.append(f"  submissions {len(trace.sends):,}, {sends:.0f} sends each on average")
    out.append(f"  µs a send p10 / p50 / p90 / p99: {quartiles}")
    gap_ms = sum(g.ms for g in trace.gaps)
    total = trace.send_ms + gap_ms
    out.append(
        f"  traced time: sends {trace.send_ms / total:.0%}, "
        f"between submissions {gap_ms / total:.0%}"
    )
    for label, commit in (("with a commit", True), ("without", False)):
        gaps = [g for g in trace.gaps if g.commit is commit]
        if not gaps:
            continue
        mean = sum(g.ms for g in gaps) / len(gaps)
        replies = sum(g.replies for g in gaps) / len(gaps)
        p99 = percentile([g.ms for g in gaps], 99)
        out.append(
            f"  gaps {label}: {len(gaps):,}, mean {mean:.3f} ms, p99 {p99:.3f}, "
            f"{replies:.1f} writes each"
        )
    whole = rounds(trace, round_sends)
    if whole:
        out.append(f"  rounds of {round_sends:,} sends: {len(whole):,}; ms p50 / p90 / p99:")
        for label, values in (
            ("the whole round", [r.ms for r in whole]),
            ("in its sends", [r.send_ms for r in whole]),
            ("between its submissions", [r.between_ms for r in whole]),
        ):
            figures = " / ".join(f"{percentile(values, p):.2f}" for p in (50, 90, 99))
            out.append(f"    {label}: {figures}")
    row = [f"{v[1] / v[0]:.1f}|{v[2] / v[0]:.2f}" for _, v in sorted(trace.series.items()) if v[0]]
    out.append("  per 100 ms, µs a send | ms between submissions per slice:")
    out.append("    " + " ".join(row))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help="perf.data files of the four tracepoints")
    parser.add_argument(
        "--round",
        type=int,
        default=ROUND_SENDS,
        help=f"sends in a round: the subscribers of the stream (default {ROUND_SENDS:,})",
    )
    args = parser.parse_args()
    for path in args.traces:
        print("\n".join(summary(path, read(path), args.round)))


if __name__ == "__main__":
    main()
