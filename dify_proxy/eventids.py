"""Event ids: `<stream id>-<n>`, made, written and read here only.

A stream id is 128 random bits (the id is all it takes to name an answer in a reconnect), and
`n` counts the answer's data events from 1; `-0` is the opening ping's. The parser accepts only
what `new_stream_id` and `event_id` make, ASCII digits included, so a change of length here is
a change everywhere, not a silent 204 for every resume.
"""

from __future__ import annotations

import re
import secrets

_STREAM_ID_BYTES = 16
_STREAM_ID_CHARS = len(secrets.token_urlsafe(_STREAM_ID_BYTES))
_MAX_DIGITS = 9
_STREAM_ID = rf"[A-Za-z0-9_-]{{{_STREAM_ID_CHARS}}}"
_EVENT_ID = re.compile(rf"({_STREAM_ID})-([0-9]{{1,{_MAX_DIGITS}}})", re.ASCII)
_STREAM_ID_ONLY = re.compile(_STREAM_ID, re.ASCII)


def new_stream_id() -> bytes:
    return secrets.token_urlsafe(_STREAM_ID_BYTES).encode()


def event_id(stream_id: bytes, seq: int) -> bytes:
    return b"%b-%d" % (stream_id, seq)


def parse_event_id(value: str) -> tuple[str, int] | None:
    """The stream id and event number of a Last-Event-ID, or None for anything else."""
    match = _EVENT_ID.fullmatch(value.strip())
    return (match.group(1), int(match.group(2))) if match else None


def is_stream_id(value: str) -> bool:
    return _STREAM_ID_ONLY.fullmatch(value) is not None
