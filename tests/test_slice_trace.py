"""bench/slice_trace.py: a fan-out cycle split into its sends and the rest, from the server's
system calls as ``perf script`` prints them (the lines below have its exact layout)."""

from __future__ import annotations

import slice_trace  # bench/, on pytest's pythonpath


def line(tid: int, t: float, event: str, args: str) -> str:
    comm = "python" if tid == 100 else "checkpoint e.db"  # a thread name may hold a space
    return f"{comm:>16} {tid:>6} [000] {t:>12.6f}: syscalls:{event}: {args}"


def submit(tid: int, t: float, n: int, ring: int = 0x12) -> str:
    args = f"fd: {ring:#010x}, to_submit: {n:#010x}, min_complete: {n:#010x}, flags: 0x00000001"
    return line(tid, t, "sys_enter_io_uring_enter", args)


def wait(tid: int, t: float, timeout: int) -> str:
    """The event loop's epoll_pwait: timeout 0 is a yield, anything else (-1: forever) blocks."""
    args = (
        f"epfd: 0x00000003, events: 0x7fff319e89b0, maxevents: 0x00000400, "
        f"timeout: {timeout & 0xFFFFFFFF:#010x}, sigmask: 0x00000000, sigsetsize: 0x00000008"
    )
    return line(tid, t, "sys_enter_epoll_pwait", args)


def returned(tid: int, t: float, n: int) -> str:
    return line(tid, t, "sys_exit_io_uring_enter", f"{n:#x}")


def pwrite(tid: int, t: float) -> str:
    return line(tid, t, "sys_enter_pwrite64", "fd: 0x0000000d, buf: 0x7ffe, count: 0x00004000")


def write(tid: int, t: float) -> str:
    return line(tid, t, "sys_enter_write", "fd: 0x00000413, buf: 0x7fc8, count: 0x000000ce")


LOOP, CHECKPOINTER = 100, 101

TRACE = "\n".join(
    [
        submit(LOOP, 10.000000, 100),
        returned(LOOP, 10.000500, 100),  # 100 sends in 0.5 ms: 5 µs each
        write(LOOP, 10.000550),  # a reply
        pwrite(LOOP, 10.000600),  # a commit: an order turn
        submit(LOOP, 10.000800, 100),  # gap 0.3 ms, with a commit and one write
        returned(LOOP, 10.001400, 100),  # 6 µs each
        pwrite(CHECKPOINTER, 10.001450),  # the checkpointer's copy: not a commit
        submit(LOOP, 10.001500, 10),  # gap 0.1 ms, without
        returned(LOOP, 10.001600, 10),  # a slice's tail: too few sends to count per send
        "",
        "some line perf prints that is not a tracepoint",
    ]
)


def test_sends_and_gaps_are_told_apart_and_only_the_loops_writes_count() -> None:
    trace = slice_trace.parse(TRACE)
    assert [round(us, 3) for us in trace.per_send_us] == [5.0, 6.0]
    assert trace.sends == [100, 100]
    assert round(trace.send_ms, 3) == 1.2  # every submission's time, the tail's too
    gaps = [(round(g.ms, 3), g.commit, g.replies) for g in trace.gaps]
    assert gaps == [(0.3, True, 1), (0.1, False, 0)]


def test_the_summary_reports_the_cost_of_an_order_turn() -> None:
    text = "\n".join(slice_trace.summary("t.data", slice_trace.parse(TRACE)))
    assert "submissions 2, 100 sends each" in text
    assert "traced time: sends 75%, between submissions 25%" in text  # 1.2 ms against 0.4
    assert "gaps with a commit: 1, mean 0.300 ms" in text
    assert "gaps without: 1, mean 0.100 ms" in text


def test_a_trace_without_submissions_says_so() -> None:
    text = slice_trace.summary("t.data", slice_trace.parse(write(LOOP, 1.0)))
    assert text == ["t.data: no io_uring submissions of 20 sends or more"]


def test_rounds_group_submissions_by_sends_and_end_at_an_idle_gap() -> None:
    rows = [
        # a round of 300 sends in three slices: 0.3 + 0.3 + 0.3 ms of sends, 0.1 + 0.2 between
        submit(LOOP, 1.0000, 100),
        returned(LOOP, 1.0003, 100),
        submit(LOOP, 1.0004, 100),
        returned(LOOP, 1.0007, 100),
        submit(LOOP, 1.0009, 100),
        returned(LOOP, 1.0012, 100),
        # idle for 5 ms: the next round starts afresh; its first 200 sends, then idle again,
        # leave it short (left out)
        submit(LOOP, 1.0062, 100),
        returned(LOOP, 1.0065, 100),
        submit(LOOP, 1.0066, 100),
        returned(LOOP, 1.0069, 100),
        # a full round after that idle gap
        submit(LOOP, 1.0200, 150),
        returned(LOOP, 1.0205, 150),
        submit(LOOP, 1.0206, 150),
        returned(LOOP, 1.0211, 150),
    ]
    found = slice_trace.rounds(slice_trace.parse("\n".join(rows)), sends=300, idle_ms=1.2)
    got = [(round(r.ms, 3), round(r.send_ms, 3), round(r.between_ms, 3)) for r in found]
    assert got == [(1.2, 0.9, 0.3), (1.1, 1.0, 0.1)]


def test_the_summary_reports_rounds() -> None:
    text = "\n".join(slice_trace.summary("t.data", slice_trace.parse(TRACE), round_sends=200))
    assert "rounds of 200 sends: 1; ms p50 / p90 / p99:" in text
    assert "the whole round: 1.40 / 1.40 / 1.40" in text  # 10.000000 to 10.001400
    assert "in its sends: 1.10 / 1.10 / 1.10" in text
    assert "between its submissions: 0.30 / 0.30 / 0.30" in text


def test_with_the_loops_waits_a_round_ends_where_the_loop_blocked_not_at_a_long_gap() -> None:
    rows = [
        submit(LOOP, 2.0000, 100),
        returned(LOOP, 2.0005, 100),
        wait(LOOP, 2.0006, 0),  # a yield between slices
        submit(LOOP, 2.0007, 1, ring=0x05),  # libuv's own ring (a batched epoll_ctl): not ours
        returned(LOOP, 2.00071, 1),
        submit(LOOP, 2.0030, 100),  # a busy gap of 2.5 ms (an order, a stall): same round
        returned(LOOP, 2.0035, 100),
        # round 1 done (200 sends). Then the loop blocks: it had nothing more to send.
        wait(LOOP, 2.0036, -1),
        submit(LOOP, 2.0037, 100),  # 0.2 ms later, but after a blocking wait
        returned(LOOP, 2.0042, 100),
        wait(LOOP, 2.0043, 10),  # blocks again (a timer's timeout): the half round is left out
        submit(LOOP, 2.0044, 100),
        returned(LOOP, 2.0049, 100),
        submit(LOOP, 2.0050, 100),
        returned(LOOP, 2.0055, 100),
    ]
    trace = slice_trace.parse("\n".join(rows))
    assert trace.waits == 3
    found = slice_trace.rounds(trace, sends=200, idle_ms=1.2)
    got = [(round(r.ms, 3), round(r.send_ms, 3), round(r.between_ms, 3)) for r in found]
    assert got == [(3.5, 1.0, 2.5), (1.1, 1.0, 0.1)]
