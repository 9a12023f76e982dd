"""Server-Sent Events on raw bytes.

Network reads carry arbitrary slices of Dify's stream: half an event, several events, half a
UTF-8 character. Framing therefore happens on bytes, on the blank line that ends an event, and
nothing is decoded until an event is whole. CR, LF and CRLF all end a line (WHATWG HTML, 9.2.6);
no UTF-8 continuation byte can be mistaken for either. `str.splitlines` is never used: it also
splits on U+2028, U+0085 and friends, which current Dify writes raw inside its JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A line terminator followed by another one is a blank line: the end of an event. `\r` not
# followed by `\n` is a terminator of its own, so a CRLF is never read as two lines.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_EVENT_KEY = re.compile(rb'"event"\s*:\s*"([^"\\]*)"')
_PING = re.compile(rb"[\r\n]*event: ?ping(?:\r\n|\r|\n)")

FIRST_COMMENT = b": stream open\n\n"
KEEPALIVE = b": keep-alive\n\n"
PING_COMMENT = b": ping\n\n"


def cut_events(buffer: bytes, scan_from: int = 0) -> tuple[list[bytes], bytes]:
    """Split the whole events off the front of `buffer`; return them and the unfinished rest.

    `scan_from` lets a caller that has already scanned most of `buffer` (a large event arriving
    in many reads) skip it, so framing stays linear in the bytes received.
    """
    events = []
    start = 0
    for match in _EVENT_END.finditer(buffer, max(scan_from, 0)):
        events.append(buffer[start : match.end()])
        start = match.end()
    return events, buffer[start:]


def event_type(event: bytes) -> str | None:
    """Dify's event type: the JSON `event` key, "ping" for keep-alives, else None.

    Dify writes `event` as the first key, so a regex finds it without parsing the JSON of every
    delta; a raw `"event"` cannot occur inside a JSON string, where quotes are escaped.
    """
    match = _EVENT_KEY.search(event)
    if match:
        return match.group(1).decode("ascii", "replace")
    if _PING.match(event):
        return "ping"
    return None


def event_data(event: bytes) -> Any:
    """The JSON payload of one whole event (its `data:` lines joined), or None."""
    lines = [line for line in _LINE_END.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    payload = b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)
    try:
        return json.loads(payload)
    except ValueError:
        return None


def event_id(stream_id: bytes, seq: int) -> bytes:
    """An `id:` line to put in front of an event. EventSource clients send the last one back
    when they reconnect, which is how a reconnect is told apart from a new question."""
    return b"id: %b-%d\n" % (stream_id, seq)


def data_event(payload: dict[str, Any]) -> bytes:
    """Encode an event of our own the way current Dify does: compact JSON, raw UTF-8."""
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )
