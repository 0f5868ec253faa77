"""runtime.errors.first_line: the one-line form of an exception every message uses."""

from __future__ import annotations

from runtime.errors import first_line


def test_first_line_keeps_the_first_line_stripped() -> None:
    assert first_line(ValueError("  bad value\n  at line 2\n")) == "bad value"


def test_an_empty_message_gives_the_type_name() -> None:
    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError("  \n"), 10, typed=True) == "OSError"


def test_limit_and_type_prefix() -> None:
    assert first_line(RuntimeError("x" * 500), 200) == "x" * 200
    assert first_line(RuntimeError("boom\nmore"), typed=True) == "RuntimeError: boom"
