"""The server benchmark suite (bench/suite.py) in its quick mode: every scenario runs against
real server processes and produces its figures. Nothing here judges speed."""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

import benchlib  # bench/, on pytest's pythonpath
import command_cost
import ingest
from perps_indexer import commands
from perps_indexer.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def run_script(script: str, *args: str, timeout: float) -> str:
    """Run bench/``script`` with ``args``, which must succeed; what it printed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def run_bench(script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run bench/``script`` with ``args``; its one line of JSON."""
    result: dict[str, Any] = json.loads(run_script(script, *args, timeout=timeout))
    return result


def run_suite(tmp_path: Path, *args: str, timeout: float) -> tuple[str, dict[str, Any]]:
    """bench/suite.py --quick with ``args``: what it printed, and its figures."""
    out = tmp_path / "figures.json"
    stdout = run_script("suite.py", "--quick", "--json", str(out), *args, timeout=timeout)
    result: dict[str, Any] = json.loads(out.read_text())
    return stdout, result


@pytest.mark.slow
def test_suite_quick_runs_every_scenario(tmp_path: Path) -> None:
    stdout, result = run_suite(tmp_path, timeout=170)
    assert result["errors"] == {}
    assert result["failures"] == []
    figures = result["figures"]
    assert sorted(figures) == ["1", "2", "3", "4", "5", "6", "7", "8"]

    for run in figures["1"].values():  # fan-out
        assert run["messages_per_s"] > 0
        assert run["book_changes_per_s"] > 0
        assert 0 < run["server_commits"] <= run["server_commands"]  # group commits
        assert run["latency_ms"]["n"] > 0 and finite(run["latency_ms"]["p99"])
    for run in figures["2"].values():  # per-address streams
        assert run["fills_per_s"] > 0
        assert run["latency_ms"]["n"] > 0 and finite(run["latency_ms"]["p99"])
        assert run["messages_sent"] == run["messages_received"] > 0
    parts = {(r["part"], r["sync"], r["batch"]) for r in figures["3"]["runs"]}  # ingest
    assert ("all", "NORMAL", 1) in parts and ("all", "FULL", 100) in parts
    assert all(r["events_per_s"] > 0 for r in figures["3"]["runs"])
    assert finite(figures["4"]["kib_per_connection"])  # memory
    assert figures["4"]["server_connections"] == figures["4"]["connections"]
    for config in ("history_limit_100", "history_limit_1000"):  # subscribe
        limit = int(config.rsplit("_", 1)[1])
        for key in ("trade_history/cold", "trade_history/warm", "order_history/cold"):
            row = figures["5"][config][key]
            assert row["rows"] == limit and finite(row["p99"])
    freshness = ("naive", "naive_32", "ours", "ours_32", "ours_at_10x_naive", "bare_at_10x_naive")
    fleet = ("ours_at_10x_naive_fleet", "bare_at_10x_naive_fleet")  # bench/fleet.c's clients
    assert sorted(figures["6"]) == sorted(freshness + fleet)
    assert {figures["6"][name]["subscriber_fleet"] for name in fleet} == {"bench/fleet.c"}
    for name in freshness + fleet:
        run = figures["6"][name]
        assert run["orders_per_s"] > 0 and finite(run["freshness_ms"]["p99"])
        assert finite(run["probe_freshness_ms"]["p99"]) and run["probe_clients"] > 0
        assert finite(run["reply_ms"]["p99"])
        socket = run["socket_freshness_ms"]  # only the C fleet stamps arrivals at the socket
        if name in fleet:
            # A message reaches the socket before the fleet reads it: never later, and
            # every stamped message counted.
            assert socket["n"] == run["freshness_ms"]["n"] > 0
            assert 0 <= socket["p99"] <= run["freshness_ms"]["p99"]
            assert socket["max"] <= run["freshness_ms"]["max"]
        else:
            assert socket is None
    bare = [v for k, v in figures["7"].items() if k != "message_bytes"]  # bare limit
    assert {r["transport"] for r in bare} == {
        "picows",
        "picows-asyncio",
        "aiohttp",
        "aiohttp-direct",
        "aiohttp-batch",
        "aiohttp-batch-send",
        "aiohttp-batch/100",
    }
    assert all(r["messages_per_s"] > 0 for r in bare)
    pairs = figures["8"]["pairs"]  # fan-out and bare picows in turns
    assert pairs and all(p["ours_per_s"] > 0 and p["picows_per_s"] > 0 for p in pairs)
    assert all(finite(p["ours_client_sleeps_per_s"]) for p in pairs)
    assert finite(figures["8"]["median_ratio_best"])
    assert "Targets:" in stdout and "pairs in turns (scenario 8)" in stdout
    hosts = result["machine"]["hosts"]  # the time stolen from the server's CPU, per scenario
    assert sorted(hosts) == sorted(figures)
    assert all(0 <= host["steal"] <= 1 and "speed" not in host for host in hosts.values())
    assert "each scenario's host: 1: " in stdout
    about = benchlib.interpreter()  # the suite ran on this interpreter: the same build
    assert result["machine"]["interpreter"] == about
    assert f"Python {benchlib.describe_interpreter(about)}, commit" in stdout


@pytest.mark.slow
def test_fleet_fanout_runs_scenario_8_with_subscribers_in_c(tmp_path: Path) -> None:
    """``--fleet-fanout``: both rows of scenario 8 read by bench/fleet.c, and its verdict
    line says it is not the judged setup."""
    stdout, result = run_suite(tmp_path, "--only", "8", "--fleet-fanout", timeout=120)
    s8 = result["figures"]["8"]
    assert s8["subscriber_fleet"] == "bench/fleet.c"
    assert all(p["ours_per_s"] > 0 and p["picows_per_s"] > 0 for p in s8["pairs"])
    assert all(p["picows_load_cpu"] > 0 and p["ours_load_cpu"] > 0 for p in s8["pairs"])
    assert "not judged: a sensitivity check" in stdout


@pytest.mark.parametrize("background", [False, True])
def test_order_cost_changes_the_book_with_every_order(background: bool) -> None:
    """bench/order_cost.py runs the book driver's orders and cancels through the REST layer;
    each one changes the watched book, so each makes one message of it. Four makers reach
    their depth of 12 resting orders within the warm-up, so cancels and places alternate."""
    args = ["--orders", "120", "--warmup", "60", "--makers", "4"]
    args += ["--background"] if background else []
    result = run_bench("order_cost.py", *args)
    assert result["orders"] == 120 and result["book_messages"] == 120
    assert result["cancels"] == 60  # at its depth, a maker cancels its oldest, then places
    assert result["book_message_bytes"] > 1_000  # a book some dozen levels deep
    assert finite(result["cpu_us_per_order"]) and result["cpu_us_per_order"] > 0


def test_restart_stall_times_flushes_across_wal_restarts(tmp_path: Path) -> None:
    """bench/restart_stall.py drives scenario 2's commands past several WAL restarts (a bound
    of 50 frames) and times every flush."""
    args = ["--commands", "1000", "--restart-frames", "50", "--db", str(tmp_path / "p.db")]
    result = run_bench("restart_stall.py", *args, timeout=120)
    assert result["restarts"] >= 1
    assert result["flush_ms"]["n"] == 500
    assert 0 < result["flush_ms"]["p50"] <= result["flush_ms"]["p99"] <= result["flush_ms"]["max"]


def test_command_cost_runs_started_together_share_one_prefilled_log(tmp_path: Path) -> None:
    """Two bench/command_cost.py runs started at once on a log not built yet, as the module's
    callgrind recipe starts them: each builds the log under a name of its own and moves it
    into place whole, so both succeed with the same messages and events, digest for digest,
    and only the log and its marker are left. (Before, both built it in place, and a run
    under callgrind, 50 times slower, read the log while the other rebuilt it.)"""
    db = tmp_path / "prefill.db"
    args = ["--accounts", "200", "--commands", "40", "--prefill-for", "40", "--check"]
    args += ["--db", str(db)]
    cmd = [sys.executable, str(ROOT / "bench" / "command_cost.py"), *args]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
    first, second = (json.loads(out) for out, _ in outs)
    timings = ("seconds", "cpu_s", "us_per_command")
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in second.items() if k not in timings
    }
    assert first["events"] == 40 * 6 and first["prefill_rounds"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefill.db", "prefill.json"]


def test_ingest_cancels_the_oldest_quote_still_resting() -> None:
    """A maker's cancel skips its quotes that takers have filled since they rested (before,
    it sent them, and 86 % of the stream's cancels were rejected); one with none resting
    sends an id the engine does not know, as before."""
    quotes = {3: deque([11, 12, 13])}
    command = ingest.build(("cancel", 3, False, 0, 0), quotes, {12, 13})
    assert isinstance(command, commands.CancelOrders)
    assert command.order_ids == (12,) and command.address == ingest.MAKERS[3]
    assert list(quotes[3]) == [13]
    command = ingest.build(("cancel", 3, False, 0, 0), quotes, set())
    assert isinstance(command, commands.CancelOrders)
    assert command.order_ids == (7 << 64,) and not quotes[3]


def test_command_cost_builds_the_same_prefilled_log_every_time(tmp_path: Path) -> None:
    """What makes runs started together agree: a log built later holds the same events (the
    real clock would stamp each build differently, and a run's messages carry the stamps)."""
    logs = []
    for name in ("first.db", "second.db"):
        db = command_cost.prefilled(tmp_path / name, accounts=50, commands_=10)
        with SQLiteStore(db) as store:
            logs.append(list(store.read()))
    assert logs[0] and logs[0] == logs[1]


def test_command_cost_parts_split_the_time_and_change_no_message(tmp_path: Path) -> None:
    """``--parts`` times the store, the projections and each account topic's messages; the
    parts and the rest add up to the run's wall-clock time, and the run makes the same
    messages and events as one without the timers, and as one without the streams read
    first (``--cold``)."""
    args = ["--accounts", "200", "--commands", "40", "--prefill-for", "40", "--check"]
    args += ["--db", str(tmp_path / "prefill.db")]
    plain = run_bench("command_cost.py", *args, timeout=120)
    timed = run_bench("command_cost.py", *args, "--parts", timeout=120)
    # --cold leaves the rows' JSON to the first push: the same messages, made later.
    cold = run_bench("command_cost.py", *args, "--cold", timeout=120)
    for key in ("messages", "message_bytes", "messages_sha256", "events_sha256"):
        assert timed[key] == plain[key] == cold[key]
    parts = timed["parts_us"]
    topics = parts["messages_by_topic"]
    assert sorted(topics) == ["open_orders", "order_history", "positions", "trade_history"]
    assert all(t["us_a_message"] > 0 for t in topics.values())
    assert sum(t["us_a_command"] for t in topics.values()) == pytest.approx(parts["messages"])
    assert all(parts[name] > 0 for name in ("store", "projections", "messages", "other"))
    total = sum(parts[name] for name in ("store", "projections", "messages", "other"))
    assert total == pytest.approx(timed["seconds"] / 40 * 1e6)


@pytest.mark.skipif(shutil.which("perf") is None, reason="the sweep's --trace records with perf")
def test_rate_sweep_runs_both_servers_and_reads_their_rounds(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    args = ["--quick", "--rates", "40", "--rounds", "1", "--skip", "0.1", "--json", str(out)]
    printed = run_script("rate_sweep.py", *args, "--trace", str(tmp_path / "t"), timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [row["kind"] for row in rows] == ["ours", "bare"]
    for row in rows:
        assert row["problems"] == []
        assert 20 <= row["orders_per_s"] <= 60  # paced at 40 a second
        assert row["messages_per_s"] > 0 and finite(row["us_per_message"])
        assert finite(row["freshness_ms"]["p99"]) and finite(row["p99_after_0.1s"])
        assert row["socket_freshness_ms"]["p99"] <= row["freshness_ms"]["p99"]
        assert row["rounds"]["count"] > 0  # 20 subscribers: a round is a submission of 20
        assert row["rounds"]["ms"]["p50"] >= row["rounds"]["send_ms"]["p50"] > 0
    assert printed.count("| ours |") == 1 and printed.count("| bare |") == 1


def test_interpreters_runs_each_interpreter_in_turns_and_describes_its_build() -> None:
    """bench/interpreters.py on this interpreter, twice (two columns of one table): every
    round has each one's three figures, and the build it reports is this process's own."""
    out = run_script(
        "interpreters.py",
        sys.executable,
        sys.executable,
        "--rounds",
        "2",
        "--commands",
        "40",
        "--accounts",
        "200",
        "--ingest-commands",
        "300",
        timeout=240,
    )
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["rounds"] == 2 and len(result["interpreters"]) == 2
    about = benchlib.interpreter()
    assert about["version"] == platform.python_version() and about["base"] == sys.base_prefix
    for row in result["interpreters"]:
        assert {key: row[key] for key in about} == about
        assert len(row["turns"]) == 2
        for turn in row["turns"]:
            assert all(finite(v) and v > 0 for v in turn.values()), turn
        assert row["command_us"] == statistics.median(t["command_us"] for t in row["turns"])
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 2 + 2 and "(1.00 x)" in table[2]


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--commands", "-1"]])
def test_interpreters_refuses_counts_below_one(bad: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "interpreters.py"), sys.executable, *bad],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
