"""Progress on rank 0: a bar on a terminal, plain lines in a file."""

from __future__ import annotations

import io
import logging

import pytest

from flowmill.train.progress import Progress, duration

METRICS = {"train/loss": 0.123456, "train/lr": 1e-3, "train/grad_norm": 0.5, "train/samples_per_s": 812.4}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def lines():
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("flowmill")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_file_gets_one_line_every_n_steps_and_at_the_end(lines):
    stream = io.StringIO()
    progress = Progress(step=0, max_steps=5, every=2, enabled=True, stream=stream)
    for step in range(1, 6):
        progress.update(step, METRICS)
    progress.close()
    assert [line.split(" loss")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert lines[0].startswith("step 2/5 loss 0.1235 lr 1.00e-03 grad_norm 0.5 samples/s 812 elapsed ")
    assert " eta " in lines[0] and stream.getvalue() == ""


def test_a_terminal_gets_the_live_bar_and_no_lines(lines):
    terminal = Terminal()
    progress = Progress(step=3, max_steps=5, every=1, enabled=True, stream=terminal)
    progress.update(4, METRICS)
    progress.close()
    assert lines == [] and "4/5" in terminal.getvalue()


def test_other_ranks_say_nothing(lines):
    terminal = Terminal()
    progress = Progress(step=0, max_steps=2, every=1, enabled=False, stream=terminal)
    progress.update(1, METRICS)
    progress.close()
    assert lines == [] and terminal.getvalue() == ""


@pytest.mark.parametrize("seconds, text", [(4.2, "4s"), (65, "1m05s"), (3725, "1h02m05s")])
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert duration(seconds) == text
