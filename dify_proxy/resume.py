"""A resumed answer: what a client that reconnected with its last event id reads.

The record (answers.py) holds Dify's events as the original stream relayed them. A resume sends
the ones after the client's id, with their ids, then follows the record while the answer is
still running (on this worker or any other, since the record is shared), then ends the way the
answer ended. It reads the record a piece at a time and only as fast as its client reads, so
that a resume costs a bounded amount of memory however long the answer. It tells the answer's
reader, every SEEN_EVERY_SECONDS, that a client is reading, so that the answer is not abandoned
after RESUME_GRACE.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from . import sse
from .answers import Cut, End, Event, Source
from .eventids import event_id
from .relay import (
    RECONNECT_AFTER_MS,
    RESTARTING_MESSAGE,
    SEEN_EVERY_SECONDS,
    StreamStats,
    final_error,
    following,
)

WRITE_BYTES = 64 * 1024  # what a resume writes at a time, at most (bar one large event)


def follow(
    source: Source,
    stream_id: str,
    after: int,
    *,
    heartbeat_interval: float,
    give_up_after: float,
    stats: StreamStats,
    mark_seen: Callable[[], None],
    still_wanted: Callable[[], bool] = lambda: True,
    on_end: Callable[[StreamStats], None] = lambda stats: None,
) -> Iterator[bytes] | None:
    """A resumed stream: the recorded events after `after`, then the live ones, then the end
    the answer had; or None when there is nothing to give, which the caller answers with a 204:
    the record cannot give the whole rest (it outgrew the cap, or the answer was abandoned), or
    the client saw the whole answer (an EventSource reconnecting after the end: the 204 tells
    it to stop, where an empty stream would bring it back every few seconds).

    That is decided from the record's end alone, before any byte. `still_wanted` is asked
    every SEEN_EVERY_SECONDS; once it says no (a newer resume of the answer took over), the
    stream ends. `on_end` runs once the stream is over, however it ended.
    """
    ending = source.ending
    if isinstance(ending, Cut) or (isinstance(ending, End) and ending.last <= after):
        source.close()
        return None
    stats.replayed = 0
    return _follow(
        source, stream_id.encode(), after, heartbeat_interval, give_up_after, stats, mark_seen,
        still_wanted, on_end,
    )  # fmt: skip


def _follow(
    source: Source,
    sid: bytes,
    after: int,
    heartbeat_interval: float,
    give_up_after: float,
    stats: StreamStats,
    mark_seen: Callable[[], None],
    still_wanted: Callable[[], bool],
    on_end: Callable[[StreamStats], None],
) -> Iterator[bytes]:
    closed = threading.Event()
    end_now, unregister = following()  # set at a drain's deadline
    items = source.items(stop=lambda: closed.is_set() or end_now.is_set())
    last = after
    out: list[bytes] = []
    size = 0

    def written() -> bytes:
        nonlocal out, size
        data = b"".join(out)
        out, size = [], 0
        if stats.first_event is None:
            stats.first_event = time.perf_counter()
        stats.bytes += len(data)
        return data

    try:
        yield b""  # the response head, at once
        mark_seen()
        written_at = seen_at = heard_at = time.monotonic()
        for item in items:
            now = time.monotonic()
            if now - seen_at >= SEEN_EVERY_SECONDS:
                seen_at = now
                mark_seen()
                if not still_wanted():
                    stats.end = "replaced"
                    return
            if item is None:
                if out:
                    written_at = now
                    yield written()
                elif now - written_at >= heartbeat_interval:
                    written_at = now
                    yield sse.PING
                if now - heard_at > give_up_after:  # its worker died without an ending
                    stats.end = "upstream_dropped"
                    yield final_error(
                        stats,
                        502,
                        "upstream_dropped",
                        "The chat service closed the stream early; the answer is incomplete.",
                    )
                    return
                continue
            heard_at = now
            if type(item) is Event:
                if item.seq > after:
                    stats.events += 1
                    stats.replayed += 1  # type: ignore[operator]
                    last = item.seq
                    out.append(sse.with_id(item.data, event_id(sid, item.seq)))
                    size += len(out[-1])
                    if size >= WRITE_BYTES:
                        written_at = now
                        yield written()
            elif type(item) is Cut:
                if out:
                    yield written()
                stats.end = "resume_incomplete"
                yield final_error(
                    stats,
                    503,
                    "resume_incomplete",
                    "The rest of this answer can no longer be resumed; please ask again.",
                )
                return
            elif type(item) is End:
                if out:
                    yield written()
                stats.end = item.reason
                return
        if end_now.is_set():
            # The worker is stopping: say so, with the last id sent and a `retry:`, so that
            # the client comes back soon, to whichever instance, for the rest.
            if out:
                yield written()
            stats.end = "server_restarting"
            final = final_error(stats, 503, "server_restarting", RESTARTING_MESSAGE)
            yield sse.with_retry(sse.with_id(final, event_id(sid, last)), RECONNECT_AFTER_MS)
    except GeneratorExit:
        stats.end = "client_gone"
        raise
    finally:
        closed.set()
        unregister()
        source.close()
        on_end(stats)
