"""The soak (bench/soak.py) in short: 50 clients churning for 8 s against ``serve --demo``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_soak(tmp_path: Path) -> None:
    soak = load_soak()
    options = soak.SoakOptions(
        clients=50,
        duration=8.0,
        action_interval=0.8,
        settle=1.0,
        check_timeout=10.0,
        rss_limit=None,  # the warm level of an 8 s run is not a plateau; the full soak checks it
        prefill=0,
        quiet=True,
    )
    result = soak.run(options, tmp_path)
    figures = result.figures
    assert result.failures == [], "\n".join(result.failures)
    # The churn really happened: reconnects (with since), unsubscribes, slow readers.
    assert figures["reconnects"] > 0
    assert figures["unsubscribes"] > 0
    assert figures["unsubscribe_acks"] > 0
    assert figures["resume_requests"] > 0
    assert figures["slow_connections"] > 0
    assert figures["data_messages"] > 500
    # Every client was checked against REST, stream by stream.
    assert figures["checked_clients"] >= 45
    assert figures["checked_streams"] >= figures["checked_clients"]
    assert figures["state_mismatches"] == 0
    assert figures["server_log_problems"] == 0
