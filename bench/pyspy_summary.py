"""Summarise a py-spy profile recorded with ``--format raw`` (what suite.py ``--profile`` does).

    python bench/pyspy_summary.py PROFILE.txt [--top 25]

Prints where the samples fall: by part of the server (inclusive: a sample counts for the
innermost part on its stack, so the shares add up to 100 %), then the functions with the most
samples of their own (self) and on the stack (inclusive).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

# Innermost match wins: each sample goes to the deepest frame that matches one of these,
# searched from the top of the stack down. Order matters only within one frame.
PARTS: list[tuple[str, re.Pattern[str]]] = [
    ("SQLite commit (store.append)", re.compile(r"store/sqlite\.py|store/base\.py")),
    ("engine (matching, events)", re.compile(r"perps_indexer/engine/|perps_indexer/commands\.py")),
    ("projections and row/message encoding", re.compile(r"projections\.py|wire\.py|units\.py")),
    ("hub publish and session outbox", re.compile(r"session\.py")),
    ("venue glue (execute/record)", re.compile(r"venue\.py")),
    ("REST handlers (rest.py)", re.compile(r"server/rest\.py")),
    ("WebSocket writer (app.py _write_loop, send_frame)", re.compile(r"_write_loop|send_frame")),
    ("WebSocket reader / handler (app.py)", re.compile(r"server/app\.py")),
    ("aiohttp HTTP server (parse, dispatch, respond)", re.compile(r"aiohttp/")),
    ("asyncio event loop (tasks, select, transports)", re.compile(r"asyncio/|selectors\.py")),
]


def parse(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            # py-spy puts the thread (and with --idle, "process") first; drop non-frames.
            frames = [fr for fr in frames if "(" in fr]
            stacks.append((frames, int(count)))
    return stacks


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in PARTS:
            if pattern.search(frame):
                return name
    return "other"


def short(frame: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (file.py)``."""
    match = re.match(r"(.*) \((.*?):?(\d*)\)$", frame)
    if not match:
        return frame
    name, file, _ = match.groups()
    file = re.sub(r".*/(site-packages|src|lib/python3\.\d+)/", "", file)
    return f"{name} ({file})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    stacks = parse(args.profile)
    total = sum(count for _, count in stacks)
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        parts[part_of(frames)] += count
        if frames:
            own[short(frames[-1])] += count
        for name in {short(fr) for fr in frames}:
            inclusive[name] += count
    print(f"{total} samples\n\nby part (innermost part on the stack):")
    for name, count in parts.most_common():
        print(f"  {count / total:6.1%}  {name}")
    print("\nself:")
    for name, count in own.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")
    print("\ninclusive:")
    for name, count in inclusive.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
