"""The same work under several Python interpreters, in turns: which one to run the server on.

    python bench/interpreters.py PYTHON [PYTHON ...] [--rounds 3] [--commands 4000]
        [--accounts 10000] [--ingest-commands 20000]

Each ``PYTHON`` is the interpreter of a virtual environment with this package installed
(``PYTHON -m pip install -e .``, then ``PYTHON setup.py build_ext --inplace`` for the C
extension). Every round runs each interpreter in turn, pinned to the server's CPU, on:

- ``probe``: the suite's host probe (a fixed pure-Python loop), operations a second;
- ``command``: ``command_cost.py --group 2``, CPU microseconds a scenario-2 command (a market
  order filling 5 asks: engine, SQLite commit, projections, the 23 account messages);
- ``ingest``: ``ingest.py --sync NORMAL --batches 100 --checkpoints inline``, events a second.

In turns, because this machine's speed moves by a third within minutes (BENCHMARKS.md): a
comparison of runs made apart measures the host as much as the interpreter. The figures are
medians over the rounds. Each interpreter is described by how it was built
(:func:`benchlib.interpreter`: the version, the ``configure`` options that bear on speed, and
whether ``libpython`` is a shared library or linked in). The probe is the interpreter's speed
as much as the host's: the suite's host speeds compare only between runs of one interpreter.

Prints a table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import benchlib as b
from suite import calibrate

DESCRIBE = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); import benchlib; "
    "print(json.dumps(benchlib.interpreter()))"
)
"""Run by each interpreter: :func:`benchlib.interpreter` of itself."""


def pinned(cmd: list[str]) -> str:
    """Run ``cmd`` on the server's CPU from the repository's root; its standard output."""
    proc = b.run_pinned(cmd, cwd=b.ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def run_bench(python: str, script: str, *args: object) -> Any:
    """bench/``script`` with ``args`` on ``python``, pinned: the JSON it printed last."""
    out = pinned([python, str(b.BENCH / script), *map(str, args)])
    return json.loads(out.strip().splitlines()[-1])


def measure(python: str, args: argparse.Namespace) -> dict[str, float]:
    """One turn of one interpreter: the three figures."""
    probe = calibrate(python)
    cost = run_bench(
        python,
        "command_cost.py",
        *("--commands", args.commands, "--prefill-for", args.commands),
        *("--accounts", args.accounts, "--group", 2),
    )
    ingest = run_bench(
        python,
        "ingest.py",
        *("--commands", args.ingest_commands, "--sync", "NORMAL"),
        *("--batches", 100, "--checkpoints", "inline"),
    )["ingest"][0]
    return {
        "probe_ops_s": probe,
        "command_us": cost["us_per_command"],
        "ingest_events_s": ingest["events_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pythons", nargs="+", help="interpreters of venvs with the package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commands", type=int, default=4_000, help="command_cost's commands")
    parser.add_argument("--accounts", type=int, default=10_000, help="command_cost's accounts")
    parser.add_argument("--ingest-commands", type=int, default=20_000)
    args = parser.parse_args()
    for name in ("rounds", "commands", "accounts", "ingest_commands"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    pythons = [str(Path(p)) for p in args.pythons]
    described = [json.loads(pinned([p, "-c", DESCRIBE, str(b.BENCH)])) for p in pythons]
    # By position, not by path: the same interpreter given twice is two columns (a check of
    # how far apart two columns of one interpreter land).
    turns: list[list[dict[str, float]]] = [[] for _ in pythons]
    for n in range(1, args.rounds + 1):
        for python, mine in zip(pythons, turns, strict=True):
            print(f"round {n}/{args.rounds}: {python} ...", file=sys.stderr, flush=True)
            mine.append(measure(python, args))
    figures = ("probe_ops_s", "command_us", "ingest_events_s")
    results = [
        {
            "python": python,
            **about,
            "turns": mine,
            **{f: statistics.median(t[f] for t in mine) for f in figures},
        }
        for python, about, mine in zip(pythons, described, turns, strict=True)
    ]
    base = results[0]
    print(
        "| python | version (installation; build) | probe ops/s | µs a scenario-2 command "
        "| ingest events/s (batch 100) |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for r in results:
        ratio = r["command_us"] / base["command_us"]
        print(
            f"| `{r['python']}` | {b.describe_interpreter(r)} | {r['probe_ops_s']:,.0f} "
            f"| {r['command_us']:.0f} ({ratio:.2f} x) | {r['ingest_events_s']:,.0f} |"
        )
    print(json.dumps({"interpreters": results, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
