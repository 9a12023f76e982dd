"""The stream relay: Dify's events to the client as they arrive, plus keep-alives and endings.

Under WSGI a response generator learns that its client left only when a write fails, and it
cannot write while blocked reading Dify. So a reader (a greenlet under gunicorn's gevent worker,
a thread elsewhere) reads Dify and hands whole events over a queue; the generator waits on that
queue for at most one heartbeat interval and writes a keep-alive when the wait runs out.
That write is where a gone client shows up (GeneratorExit), and the generator's `finally`
closes the upstream response and asks Dify to stop spending tokens.

What the client reads is what Dify sent: its bytes unchanged, its `event: ping` included, and
keep-alives of the proxy's own in the same `event: ping` form. Clients that use event ids (see
`chat.wants_ids`) also get an `id:` line in each data event.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
from urllib3.exceptions import ReadTimeoutError

from . import sse

log = logging.getLogger(__name__)

READ_SIZE = 65536
YIELD_EVERY_SECONDS = 0.005
_open: dict[queue.Queue, tuple[StreamStats, bool]] = {}  # streams relayed now, and their `ids`
TERMINAL_EVENTS = frozenset({"message_end", "error"})


@dataclass
class StreamStats:
    """What the request log line reports about a stream; filled in as it runs."""

    started: float = field(default_factory=time.perf_counter)
    # 128 random bits: the id is all it takes to name an answer in a reconnect.
    stream_id: bytes = field(default_factory=lambda: secrets.token_urlsafe(16).encode())
    first_event: float | None = None
    events: int = 0
    bytes: int = 0
    end: str = "running"
    task_id: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class _End:
    reason: str
    final: bytes = b""


def relay(
    upstream: requests.Response,
    *,
    heartbeat_interval: float,
    stop: Callable[[str], None],
    stats: StreamStats,
    ids: bool = False,
    on_tick: Callable[[], None] = lambda: None,
    on_end: Callable[[StreamStats], None] = lambda stats: None,
) -> Iterator[bytes]:
    """Yield the client's bytes: the response head at once, then Dify's events unchanged.

    With `ids`, the first write is a ping carrying the stream's first id, and every data event
    carries its own. `on_tick` runs at least once per heartbeat interval while the stream is
    open (to renew a lease); `on_end` runs once when it closes, however it ended.
    """
    handoff: queue.Queue[bytes | _End] = queue.Queue()
    reader = threading.Thread(target=_read, args=(upstream, handoff, stats, ids), daemon=True)
    _open[handoff] = (stats, ids)
    try:
        # An empty write sends the response head now (gunicorn flushes it before the body), so
        # a browser or a router sees the stream open before Dify's first event.
        yield sse.opening(_event_id(stats, 0)) if ids else b""
        reader.start()
        while True:
            try:
                item = handoff.get(timeout=heartbeat_interval)
            except queue.Empty:
                on_tick()
                yield sse.PING
                continue
            # Whatever else has arrived meanwhile goes out in the same write: under a burst of
            # events that is one syscall instead of one per network read.
            ready = []
            while isinstance(item, bytes):
                ready.append(item)
                try:
                    item = handoff.get_nowait()
                except queue.Empty:
                    item = None
            if ready:
                data = b"".join(ready)
                if stats.first_event is None:
                    stats.first_event = time.perf_counter()
                stats.bytes += len(data)
                on_tick()
                yield data
            if isinstance(item, _End):
                stats.end = item.reason
                if item.final:
                    yield item.final
                return
    except GeneratorExit:
        stats.end = "client_gone"
        raise
    finally:
        _open.pop(handoff, None)
        if reader.is_alive():
            _hang_up(upstream)  # the reader owns the response and closes it on its way out
        else:
            upstream.close()
        if stats.task_id and stats.end not in ("completed", "upstream_error"):
            threading.Thread(target=stop, args=(stats.task_id,), daemon=True).start()
        on_end(stats)


def drain() -> int:
    """End every open stream with a final error event saying the server is restarting.

    Called when a worker is told to stop (a deploy's SIGTERM), so browsers see why the answer
    ended and can ask again, instead of a silent cut when the graceful timeout runs out.
    """
    streams = list(_open.items())
    for handoff, (stats, ids) in streams:
        handoff.put(
            _upstream_failed(
                stats,
                ids,
                "server_restarting",
                503,
                "server_restarting",
                "The server is restarting; the answer is incomplete. Please ask again.",
            )
        )
    return len(streams)


def _read(upstream: requests.Response, handoff: queue.Queue, stats: StreamStats, ids: bool) -> None:
    """Frame Dify's bytes into whole events and hand them over, one batch per network read."""
    try:
        _read_events(upstream, handoff, stats, ids)
    finally:
        upstream.close()


def _read_events(
    upstream: requests.Response, handoff: queue.Queue, stats: StreamStats, ids: bool
) -> None:
    pending = b""
    terminal: str | None = None
    yielded_at = 0.0
    try:
        while True:
            data = upstream.raw.read1(READ_SIZE)
            if not data:
                break
            scan_from = len(pending) - 3
            events, pending = sse.cut_events(pending + data, scan_from)
            if not events:
                continue
            out = []
            for event in events:
                if sse.is_data_event(event):
                    stats.events += 1
                    kind = sse.event_type(event)
                    if stats.task_id is None or kind == "message_end":
                        _note_ids(stats, sse.event_data(event))
                    if kind in TERMINAL_EVENTS:
                        terminal = kind
                    if ids:
                        event = sse.with_id(event, _event_id(stats, stats.events))
                out.append(event)  # Dify's pings, and anything else, exactly as sent
            handoff.put(b"".join(out))
            # While Dify sends faster than we read, the socket never blocks, and a greenlet
            # only switches when it blocks: without this the writer would wait for the whole
            # burst. Every few milliseconds, not every read, so bursts still go out in big writes.
            now = time.monotonic()
            if now - yielded_at >= YIELD_EVERY_SECONDS:
                time.sleep(0)
                yielded_at = now
    except Exception as exc:  # noqa: BLE001 -- a silent Dify, a reset, a broken chunk, our close
        if stats.end != "running":  # we closed it: the generator has already finished
            return
        if isinstance(exc, ReadTimeoutError):
            handoff.put(
                _upstream_failed(
                    stats,
                    ids,
                    "timeout",
                    504,
                    "upstream_timeout",
                    "The chat service went silent; the answer is incomplete.",
                )
            )
            return
        log.info("dify stream broke: %s", type(exc).__name__)
    if terminal == "message_end":
        handoff.put(_End("completed"))
    elif terminal == "error":
        handoff.put(_End("upstream_error"))
    else:
        handoff.put(
            _upstream_failed(
                stats,
                ids,
                "upstream_dropped",
                502,
                "upstream_dropped",
                "The chat service closed the stream early; the answer is incomplete.",
            )
        )


def _note_ids(stats: StreamStats, data: Any) -> None:
    if not isinstance(data, dict):
        return
    stats.task_id = stats.task_id or _str(data.get("task_id"))
    stats.conversation_id = stats.conversation_id or _str(data.get("conversation_id"))
    stats.message_id = stats.message_id or _str(data.get("message_id"))
    if data.get("event") == "message_end":
        usage = (data.get("metadata") or {}).get("usage")
        stats.usage = usage if isinstance(usage, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _event_id(stats: StreamStats, seq: int) -> bytes:
    return b"%b-%d" % (stats.stream_id, seq)


def _upstream_failed(
    stats: StreamStats, ids: bool, reason: str, status: int, code: str, message: str
) -> _End:
    """End the client's stream the way Dify ends a failed one: a final `error` data event.

    Its status is the truthful one (502, 503, 504), not the 400 that Dify's own web template
    looks for: a front end detects the failure by the `error` event type (see the README).
    """
    stats.events += 1
    event = sse.data_event(
        {
            "event": "error",
            "conversation_id": stats.conversation_id,
            "message_id": stats.message_id,
            "created_at": int(time.time()),
            "status": status,
            "code": code,
            "message": message,
        }
    )
    return _End(reason, sse.with_id(event, _event_id(stats, stats.events)) if ids else event)


def _hang_up(upstream: requests.Response) -> None:
    """Release Dify's connection now, while the reader may be blocked reading it.

    Closing the response from here would race the reader (the buffered reader refuses
    re-entrant calls); shutting the socket down sends Dify a FIN at once and wakes the reader
    with an end of stream, whether it is a greenlet or a thread.
    """
    sock = getattr(getattr(upstream.raw, "connection", None), "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
