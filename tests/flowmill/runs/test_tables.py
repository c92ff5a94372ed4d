"""flowmill.runs.tables: cell formatting (the tables themselves are checked through the CLI in test_commands.py)."""

from __future__ import annotations

from flowmill.runs import tables


def test_formatting() -> None:
    assert [tables.format_duration(s) for s in (0, 42, 125, 3700, 90061)] == ["0s", "42s", "2m 05s", "1h 01m", "1d 01h"]
    assert tables.format_number(0.123456) == "0.1235"
    assert tables.format_number(12345.0) == "1.234e+04"
    assert tables.format_number(None) == "—"
