"""What some tests need from the machine beyond the venv, and the make target that sets it up.

Such a test, run where its need is missing, skips with a reason made by ``skip_reason``; the run
then ends with the one line of ``summary_line``: how many tests each need skipped, and the
command that sets it up (``sudo make ...`` for a user who is not root). ``make test`` run as root
sets everything up first, so nothing of this is skipped there.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

CLUSTER = "the local SLURM cluster"
CHROMIUM = "Chromium"
ROOT = "root"
# Each need and the command that provides it, run by root.
SETUP_COMMANDS = {CLUSTER: "make slurm-up", CHROMIUM: "make chromium", ROOT: "make test"}


def setup_command(need: str) -> str:
    """The command that provides ``need``, as the user running the tests types it."""
    return SETUP_COMMANDS[need] if os.geteuid() == 0 else f"sudo {SETUP_COMMANDS[need]}"


def skip_reason(need: str, why: str) -> str:
    """The reason of a test skipped for lack of ``need`` (``why``: what is missing)."""
    return f"needs {need} ({why}); run `{setup_command(need)}`"


def summary_line(reasons: Iterable[str]) -> str | None:
    """One line for the skip reasons of a run: the tests each need skipped and its command; None when none did."""
    counts = Counter(need for reason in reasons for need in SETUP_COMMANDS if reason.startswith(f"needs {need} ("))
    if not counts:
        return None
    parts = [f"{count} test{'s' if count > 1 else ''} that need{'' if count > 1 else 's'} {need} (`{setup_command(need)}`)"
             for need, count in counts.items()]
    return f"flowmill: skipped {', '.join(parts)}"
