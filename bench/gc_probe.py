"""Run ``perps-indexer`` (the same ``perps_indexer.cli.main``) and time its garbage collections.

    python bench/gc_probe.py serve --port 0 ...      (what suite.py --gc-probe starts)

``gc.callbacks`` times every collection; when the server exits (SIGTERM), one line
``gcprobe {...}`` on stderr gives, per generation, the collections, their total and longest
pause in ms, and the ten longest pauses with their time (``time.monotonic()``) and
generation. Nothing else changes: the server runs as ``python -m perps_indexer`` runs it,
unless the environment sets ``GC_EXPERIMENT`` (see :func:`experiment`).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

_started: list[float] = [0.0]
_pauses: list[tuple[float, float, int, int]] = []  # (ms, when, generation, collected)


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        ms = (time.perf_counter() - _started[0]) * 1000
        _pauses.append((ms, time.monotonic(), info["generation"], info["collected"]))


def report() -> dict[str, Any]:
    out: dict[str, Any] = {"objects_tracked": len(gc.get_objects())}
    for generation in (0, 1, 2):
        mine = [p[0] for p in _pauses if p[2] == generation]
        out[f"gen{generation}"] = {
            "count": len(mine),
            "total_ms": round(sum(mine), 1),
            "max_ms": round(max(mine, default=0), 1),
        }
    out["longest"] = [
        {"ms": round(ms, 1), "at": round(at, 3), "gen": g, "collected": c}
        for ms, at, g, c in sorted(_pauses, reverse=True)[:10]
    ]
    # Every pause of 1 ms or more, in time order: what fell inside a measured window.
    out["over_1ms"] = [
        {"ms": round(ms, 1), "at": round(at, 3), "gen": g} for ms, at, g, _ in _pauses if ms >= 1
    ]
    return out


def experiment(setting: str) -> None:
    """``GC_EXPERIMENT="freeze,THRESHOLD0,THRESHOLD1,THRESHOLD2"``: an experiment, not the
    server's behaviour: ``gc.freeze()`` once the server has started (everything built by then,
    the replayed state included, is never scanned again) and ``gc.set_threshold``."""
    parts = setting.split(",")
    if parts[0] == "freeze":
        from perps_indexer.server.app import Server

        start = Server.start

        async def start_then_freeze(self: Server) -> None:
            await start(self)
            gc.collect()
            gc.freeze()

        Server.start = start_then_freeze  # type: ignore[method-assign]
        parts = parts[1:]
    if parts:
        gc.set_threshold(*(int(x) for x in parts))


def main() -> int:
    import os

    from perps_indexer.cli import main as cli_main

    if os.environ.get("GC_EXPERIMENT"):
        experiment(os.environ["GC_EXPERIMENT"])
    gc.callbacks.append(_callback)
    try:
        return cli_main(sys.argv[1:])
    finally:
        gc.callbacks.remove(_callback)
        sys.stderr.write("gcprobe " + json.dumps(report()) + "\n")
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
