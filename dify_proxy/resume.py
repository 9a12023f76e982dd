"""A resumed answer: what a client that reconnected with its last event id reads.

The record (answers.py) holds Dify's events as the original stream relayed them. A resume sends
the ones after the client's id, with their ids, then follows the record while the answer is
still running (on this worker or any other, since the record is shared), then ends the way the
answer ended. It tells the answer's reader, every SEEN_EVERY_SECONDS, that a client is reading,
so that the answer is not abandoned after RESUME_GRACE.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import sse
from .answers import Source
from .relay import SEEN_EVERY_SECONDS, StreamStats, final_error


def follow(
    source: Source,
    stream_id: str,
    after: int,
    *,
    heartbeat_interval: float,
    give_up_after: float,
    stats: StreamStats,
    mark_seen: Callable[[], None],
) -> Iterator[bytes] | None:
    """A resumed stream: the recorded events after `after`, then the live ones, then the end
    the answer had; or None when the record cannot give the whole rest (it outgrew the cap, or
    the answer was abandoned), which the caller answers with a 204.

    What is recorded now is read before answering, so that decision comes before any byte.
    """
    closed = threading.Event()
    items = source.items(stop=closed.is_set)
    recorded: list[tuple[Any, ...]] = []
    for item in items:
        if item is None:
            break
        if item[0] == "t" or (item[0] == "x" and item[1] == "abandoned"):
            return None
        recorded.append(item)
        if item[0] == "x":
            break
    stats.replayed = sum(1 for item in recorded if item[0] == "e" and item[1] > after)
    if not stats.replayed and recorded and recorded[-1][0] == "x":
        # The client saw the whole answer: an EventSource reconnecting after the end. The 204
        # tells it to stop; an empty stream would bring it back every few seconds.
        return None
    mark_seen()
    return _follow(
        recorded,
        items,
        stream_id,
        after,
        heartbeat_interval,
        give_up_after,
        stats,
        mark_seen,
        closed,
    )


def _follow(
    recorded: list[tuple[Any, ...]],
    items: Iterator[tuple[Any, ...] | None],
    stream_id: str,
    after: int,
    heartbeat_interval: float,
    give_up_after: float,
    stats: StreamStats,
    mark_seen: Callable[[], None],
    closed: threading.Event,
) -> Iterator[bytes]:
    sid = stream_id.encode()
    written_at = seen_at = heard_at = time.monotonic()
    try:
        yield b""  # the response head, at once

        def framed(batch: list[tuple[Any, ...]]) -> bytes:
            out = []
            for item in batch:
                if item[0] == "e" and item[1] > after:
                    stats.events += 1
                    out.append(sse.with_id(item[2], b"%b-%d" % (sid, item[1])))
            return b"".join(out)

        data = framed(recorded)
        if data:
            stats.first_event = time.perf_counter()
            stats.bytes += len(data)
            yield data
        if recorded and recorded[-1][0] == "x":
            stats.end = recorded[-1][1]
            return
        batch: list[tuple[Any, ...]] = []
        for item in items:
            now = time.monotonic()
            if now - seen_at >= SEEN_EVERY_SECONDS:
                mark_seen()
                seen_at = now
            if item is not None:
                heard_at = now
                if item[0] in ("t", "x"):
                    data = framed(batch)
                    if data:
                        yield data
                    if item[0] == "t" or item[1] in ("abandoned", "resume_failed"):
                        stats.end = "resume_incomplete"
                        yield _resume_failed(stats)
                    else:
                        stats.end = item[1]
                    return
                batch.append(item)
                continue
            data = framed(batch)
            batch = []
            if data:
                if stats.first_event is None:
                    stats.first_event = time.perf_counter()
                stats.bytes += len(data)
                written_at = now
                yield data
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
    except GeneratorExit:
        stats.end = "client_gone"
        raise
    finally:
        closed.set()


def _resume_failed(stats: StreamStats) -> bytes:
    return final_error(
        stats,
        503,
        "resume_incomplete",
        "The rest of this answer can no longer be resumed; please ask again.",
    )
