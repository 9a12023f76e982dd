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
_DATA_LINE = re.compile(rb"(?:^|[\r\n])data:")

# Dify's own keep-alive. The proxy sends nothing Dify could not have sent itself, so a client
# written for Dify sees nothing new: no comment lines, and `id:` lines only for clients that
# asked for them (see `with_id`).
PING = b"event: ping\n\n"


def cut_events(buffer: bytes, scan_from: int = 0) -> tuple[list[bytes], bytes]:
    """Split the whole events off the front of `buffer`; return them and the unfinished rest.

    `scan_from` lets a caller that has already scanned most of `buffer` (a large event arriving
    in many reads) skip it, so framing stays linear in the bytes received.
    """
    if b"\r" not in buffer:
        # Dify's own framing, LF only: `bytes.split` finds the blank lines at memchr speed,
        # where the regex steps through every byte (about 1 us of the relay's 16 us per event).
        first = buffer.find(b"\n\n", max(scan_from, 0))
        if first < 0:
            return [], buffer
        if first == len(buffer) - 2:  # one whole event: what a read of Dify's stream holds
            return [buffer], b""
        *events, rest = buffer.split(b"\n\n")
        return [event + b"\n\n" for event in events], rest
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


def is_data_event(event: bytes) -> bool:
    """Whether the block has a `data:` line, the ones an SSE reader dispatches as a message."""
    return _DATA_LINE.search(event) is not None


def with_id(event: bytes, event_id: bytes) -> bytes:
    """The event with an `id:` line added as its last line, just before the blank line.

    Last, not first: a reader that looks only at lines starting `data: ` skips it either way,
    but one that parses a network chunk as `data: {json}` (LobeChat's Dify provider) needs the
    chunk to start with Dify's `data:` line. SSE readers apply an id at dispatch, wherever the
    line stands. Dify's bytes stay as they are, line endings included.
    """
    return _with_last_line(event, b"id: " + event_id)


def with_retry(event: bytes, milliseconds: int) -> bytes:
    """The event with a `retry:` line added last, which sets how soon an EventSource
    reconnects (with the event's id, to whichever instance answers)."""
    return _with_last_line(event, b"retry: %d" % milliseconds)


def _with_last_line(event: bytes, line: bytes) -> bytes:
    """`line` inserted before the blank line that ends a whole event, whatever its line ends."""
    end = 2 if event.endswith(b"\r\n") else 1  # the blank line: "\r\n", "\n" or a lone "\r"
    return b"%b%b\n%b" % (event[:-end], line, event[-end:])


def opening(event_id: bytes) -> bytes:
    """What an id-using client gets first: a ping carrying the stream's first id.

    A drop before Dify's first event is then a reconnect too. It rides on `event: ping`
    rather than a comment or an empty block, which fetch-event-source and httpx-sse would hand
    over as an empty message that `JSON.parse` fails on. Its empty `data:` line (no space, so
    readers of `data: ` lines pass it by) is there because event-source-polyfill only keeps
    the id of an event that has data; a spec reader dispatches it as a `ping` event, as it
    does Dify's own pings.
    """
    return b"event: ping\ndata:\nid: " + event_id + b"\n\n"


def data_event(payload: dict[str, Any]) -> bytes:
    """Encode an event of our own the way current Dify does: compact JSON, raw UTF-8."""
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )
