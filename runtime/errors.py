"""Error text for one-line messages, shared by the learner side and the device side
(standard library only)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None, *, typed: bool = False) -> str:
    """The first line of `exc`'s message, cut to `limit` characters; the exception's type
    name when the message is empty. `typed` prefixes the type name to a message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(exc).__name__}: {line}" if typed else line
