"""bench/suite.py's freshness: from each command's post to a client's first message that
includes it, for every command or only those posted from a given time."""

from __future__ import annotations

import suite  # bench/, on pytest's pythonpath

# Three commands, posted at 100, 200 and 300 ns, whose events end at seqs 2, 5 and 6.
DRIVE = {"log": [[100, 2, 0], [200, 5, 0], [300, 6, 0]]}
# A client's messages (seq, arrival): the first holds command 1, the second commands 2 and 3.
LOGS = {"a": [[2, 150], [6, 380]]}


def test_every_command_is_timed_to_the_first_message_that_includes_it() -> None:
    assert suite.freshness(DRIVE, LOGS) == [50, 180, 80]


def test_commands_posted_before_the_cutoff_are_left_out() -> None:
    assert suite.freshness(DRIVE, LOGS, posted_after=200) == [180, 80]
    assert suite.freshness(DRIVE, LOGS, posted_after=301) == []
