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
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
from urllib3.exceptions import ReadTimeoutError

from . import sse
from .answers import Recorder
from .eventids import event_id, new_stream_id

log = logging.getLogger(__name__)

READ_SIZE = 65536
YIELD_EVERY_SECONDS = 0.005
SEEN_EVERY_SECONDS = 1.0  # how often a resumed client tells the answer it is still reading
_open: dict[queue.Queue, _Answer] = {}  # every answer still running or still being read
_done_lock = threading.Lock()
_draining = threading.Event()
_waiting: set[Any] = set()  # requests waiting for Dify's response head
_following: set[threading.Event] = set()  # each open resume's "end now" (resume.py)
RECONNECT_AFTER_MS = 1000  # the `retry:` hint on a restart's final event
RESTARTING_MESSAGE = (
    "The server is restarting; the answer is incomplete. Reconnect to get what was recorded, "
    "or ask again."
)
# After the proxy asks Dify to stop an answer nobody reads, it reads on this long for Dify's
# last events and their usage report, so that the tokens are counted; then it hangs up.
STOP_READ_SECONDS = 5.0
# How an event ends Dify's stream, when it is the last such event: a chat answer ends with
# `message_end`, a chatflow's with `workflow_finished` after it, a workflow app's with
# `workflow_finished`, and a run that waits for a person with `workflow_paused` (a clean end: no
# error event, no stop, which would abort the run once the form is answered). A
# `workflow_started` (a paused run resumed on the same stream, `continue_on_pause`) makes an
# earlier pause no ending.
ENDINGS: dict[str, str | None] = {
    "message_end": "completed",
    "workflow_finished": "completed",
    "workflow_paused": "paused",
    "error": "upstream_error",
    "workflow_started": None,
}
CLEAN_ENDINGS = frozenset({"completed", "paused", "upstream_error"})  # nothing to stop
# The events whose JSON is read (besides an answer's first): the few that carry a new id to
# bind, a form, or the usage. Every other event goes through unparsed.
NOTED_EVENTS = frozenset(
    {
        "message_end",
        "workflow_finished",
        "workflow_started",
        "human_input_required",
        "workflow_paused",
    }
)


@dataclass
class StreamStats:
    """What the request log line reports about a stream; filled in as it runs."""

    started: float = field(default_factory=time.perf_counter)
    stream_id: bytes = field(default_factory=new_stream_id)
    first_event: float | None = None
    events: int = 0
    bytes: int = 0
    end: str = "running"
    task_id: str | None = None
    workflow_run_id: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    usage: dict[str, Any] | None = None
    answer_end: str = "running"  # how the answer ended, which may be after the client left
    replayed: int | None = None  # on a resume: events sent again from the record


@dataclass(frozen=True)
class _End:
    reason: str
    final: bytes = b""


@dataclass
class _Answer:
    """One answer being read from Dify, shared by its reader, its client and its linger."""

    upstream: requests.Response
    stats: StreamStats
    ids: bool
    recorder: Recorder | None
    bind: Callable[[Any], None] | None = None
    await_task_id: bool = True
    handoff: queue.Queue = field(default_factory=queue.Queue)
    attached: bool = True  # the original client is still reading
    ending: tuple[str, int, str, str] | None = None  # an ending imposed from outside (drain)
    reason: str = "running"  # how the answer (not the client's stream) ended
    reader: threading.Thread | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    done: int = 0  # reader and client: on_end runs when both are through
    stop_asked: bool = False  # Dify was told to stop this answer already


def relay(
    upstream: requests.Response,
    *,
    heartbeat_interval: float,
    stop: Callable[[str], None],
    stats: StreamStats,
    ids: bool = False,
    recorder: Recorder | None = None,
    grace: float = 0.0,
    on_tick: Callable[[], None] = lambda: None,
    on_end: Callable[[StreamStats], None] = lambda stats: None,
    bind: Callable[[Any], None] | None = None,
    await_task_id: bool = True,
) -> Iterator[bytes]:
    """Yield the client's bytes: the response head at once, then Dify's events unchanged.

    With `ids`, the first write is a ping carrying the stream's first id, and every data event
    carries its own. With a `recorder`, every event is also recorded for resumes, and a client
    that leaves mid-answer leaves Dify running for `grace` seconds, so that a reconnect gets
    the whole answer. `on_tick` runs at least once per heartbeat interval while the answer runs
    (to renew a lease); `on_end` runs once when both the answer and the client's stream are
    over, however they ended. `bind` is called with each event the relay parses (the first,
    and those in NOTED_EVENTS), before it reaches the client, to bind the ids it carries to
    the user. Without `await_task_id`, a client that leaves before any data event came has the
    stream hung up on at once, not read on until a task id comes to stop (a run that is
    paused, being followed, must not be stopped).
    """
    answer = _Answer(upstream, stats, ids, recorder, bind, await_task_id)
    answer.reader = threading.Thread(target=_read, args=(answer, stop, on_end), daemon=True)
    _open[answer.handoff] = answer
    try:
        # An empty write sends the response head now (gunicorn flushes it before the body), so
        # a browser or a router sees the stream open before Dify's first event.
        yield sse.opening(event_id(stats.stream_id, 0)) if ids else b""
        answer.reader.start()
        while True:
            try:
                item = answer.handoff.get(timeout=heartbeat_interval)
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
                    item = answer.handoff.get_nowait()
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
        answer.attached = False
        if answer.reader.ident is None:
            # The client left before the first write: read on all the same, to learn the task
            # id (and stop the task), and to end the record.
            answer.reader.start()
        if answer.reader.is_alive():
            threading.Thread(
                target=_linger, args=(answer, grace, on_tick, stop), daemon=True
            ).start()
        _done(answer, on_end)


def _done(answer: _Answer, on_end: Callable[[StreamStats], None]) -> None:
    """Called once by the reader and once by the client's stream; the second runs `on_end`."""
    with _done_lock:
        answer.done += 1
        last = answer.done == 2
    if last:
        _open.pop(answer.handoff, None)
        on_end(answer.stats)


def _linger(
    answer: _Answer, grace: float, on_tick: Callable[[], None], stop: Callable[[str], None]
) -> None:
    """After the client left mid-answer: keep reading Dify while a reconnect may still come.

    The grace starts when the client left and again whenever a resumed client shows it is
    reading. Once it runs out, Dify is asked to stop while the reader reads on: Dify then ends
    the stream with its usage report (`message_end`), and the tokens the answer used count
    against the user's budget. If the stream has not ended `STOP_READ_SECONDS` later, Dify's
    connection is closed, which ends the reader (see `_usage_estimate`). Dify's task id comes
    with its first event, so until then the reader reads on (within the read timeout): a stop
    call needs the id.
    """
    recorder = answer.recorder
    deadline = time.monotonic() + (grace if recorder is not None else 0.0)
    while not answer.finished.is_set():
        if recorder is not None:
            seen = recorder.seen_at()
            if seen:
                # A resumed client shows itself every SEEN_EVERY seconds; a few missed marks,
                # not one late one, mean it has gone too.
                keep = max(grace, 3 * SEEN_EVERY_SECONDS)
                deadline = max(deadline, time.monotonic() - (time.time() - seen) + keep)
        if time.monotonic() >= deadline and (answer.stats.task_id or not answer.await_task_id):
            answer.reason = "abandoned"
            if answer.stats.task_id is None:
                # A followed run that sent nothing but pings (still paused): leave it be.
                _hang_up(answer.upstream)
                return
            read_until = time.monotonic() + STOP_READ_SECONDS
            answer.stop_asked = True
            stop(answer.stats.task_id)
            if not answer.finished.wait(max(0.0, read_until - time.monotonic())):
                _hang_up(answer.upstream)
            return
        on_tick()
        answer.finished.wait(min(0.5, max(0.05, deadline - time.monotonic())))


class ServerRestarting(BaseException):
    """Thrown into a request still waiting for Dify's response head when the drain deadline
    comes. A BaseException, like GreenletExit, so that no library's `except Exception` on the
    way up can swallow it."""


def draining() -> bool:
    """Whether this worker has been told to stop: new questions then get a 503 at once."""
    return _draining.is_set()


def waiting_for_dify(handle: Any) -> Callable[[], None]:
    """Register a request that waits for Dify's response head (its greenlet); returns the
    call that unregisters it. The drain interrupts those still waiting at its deadline."""
    _waiting.add(handle)
    return lambda: _waiting.discard(handle)


def following() -> tuple[threading.Event, Callable[[], None]]:
    """Register a resume that is being streamed: the drain waits for it as for an answer, and
    at its deadline sets the event, on which the resume ends with `server_restarting`. Returns
    the event and the call that unregisters it."""
    flag = threading.Event()
    _following.add(flag)
    return flag, lambda: _following.discard(flag)


def drain(
    deadline: float, interrupt: Callable[[Any], None] = lambda handle: None
) -> dict[str, int]:
    """Let open answers finish for `deadline` seconds, then end the rest with a final error
    event saying the server is restarting (recorded, so a client can resume elsewhere).

    Called when a worker is told to stop (a deploy's SIGTERM). Most answers finish within a few
    seconds, and a cut answer is one that somebody asks, and pays for, again. Requests still
    waiting for Dify's first byte at the deadline are interrupted with `interrupt`, which
    turns them into a 503 before any streaming. Returns how many answers finished, were
    ended at the deadline, or were interrupted before streaming.
    """
    _draining.set()
    until = time.monotonic() + deadline
    running = [answer for answer in _open.values() if not answer.finished.is_set()]
    while time.monotonic() < until:
        if (
            not _waiting
            and not _following
            and all(answer.finished.is_set() for answer in list(_open.values()))
        ):
            break
        time.sleep(0.1)
    ended = [answer for answer in _open.values() if not answer.finished.is_set()]
    for answer in ended:
        answer.ending = (
            "server_restarting",
            503,
            "server_restarting",
            RESTARTING_MESSAGE,
        )
        _hang_up(answer.upstream)
    interrupted = list(_waiting)
    for handle in interrupted:
        interrupt(handle)
    for flag in list(_following):
        flag.set()
    for answer in ended:
        answer.finished.wait(2.0)
    until = time.monotonic() + 2.0
    while _following and time.monotonic() < until:
        time.sleep(0.05)
    return {
        "finished": sum(1 for answer in running if answer not in ended),
        "ended_at_deadline": len(ended),
        "interrupted": len(interrupted),
    }


def _read(
    answer: _Answer, stop: Callable[[str], None], on_end: Callable[[StreamStats], None]
) -> None:
    """Frame Dify's bytes into whole events, record them, and hand them to the client."""
    stats = answer.stats
    try:
        end = _read_events(answer)
    finally:
        answer.upstream.close()
    if stats.usage is None and end.reason not in ("completed", "paused"):
        stats.usage = _usage_estimate(stats.events - (1 if end.final else 0))
    if end.final:
        seq = stats.events
        restarting = end.reason == "server_restarting"  # come back soon, to whichever instance
        if answer.recorder is not None:
            # A resumed copy needs its `retry:` line too.
            recorded = sse.with_retry(end.final, RECONNECT_AFTER_MS) if restarting else end.final
            answer.recorder.events([(seq, recorded)], len(recorded))
        if answer.ids:
            final = sse.with_id(end.final, event_id(stats.stream_id, seq))
            if restarting:
                final = sse.with_retry(final, RECONNECT_AFTER_MS)
            end = _End(end.reason, final)
    if answer.recorder is not None:
        answer.recorder.end(end.reason)
    if answer.attached:
        answer.handoff.put(end)
    answer.reason = stats.answer_end = end.reason
    answer.finished.set()
    _done(answer, on_end)
    if stats.task_id and end.reason not in CLEAN_ENDINGS and not answer.stop_asked:
        stop(stats.task_id)  # last: a slow Dify must not hold up the stream's ending


def _read_events(answer: _Answer) -> _End:
    """Read until Dify's stream ends; the ending to give the client (its final event unframed)."""
    upstream, stats, ids, recorder = answer.upstream, answer.stats, answer.ids, answer.recorder
    sid = stats.stream_id
    pending = b""
    ending: str | None = None
    yielded_at = 0.0
    try:
        for data in _network_reads(upstream):
            scan_from = len(pending) - 3
            events, pending = sse.cut_events(pending + data, scan_from)
            if not events:
                continue
            out = []
            records: list[tuple[int, bytes]] = []
            size = 0
            pinged = False
            for event in events:
                # Dify's events carry their type in the JSON, so one search tells most of them
                # apart from pings; only a block without it needs a look for a `data:` line.
                kind = sse.event_type(event)
                if kind == "ping" or (kind is None and not sse.is_data_event(event)):
                    pinged = True
                    out.append(event)  # Dify's pings, and anything else, exactly as sent
                    continue
                stats.events += 1
                seq = stats.events
                if stats.task_id is None or kind in NOTED_EVENTS:
                    data = sse.event_data(event)
                    _note_ids(stats, data)
                    if answer.bind is not None:
                        answer.bind(data)
                if kind in ENDINGS:
                    ending = ENDINGS[kind]
                if recorder is not None:
                    records.append((seq, event))
                    size += len(event)
                out.append(sse.with_id(event, event_id(sid, seq)) if ids else event)
            if recorder is not None and (records or pinged):
                recorder.events(records, size, pinged)
            if answer.attached:
                answer.handoff.put(b"".join(out))
            # While Dify sends faster than we read, the socket never blocks, and a greenlet
            # only switches when it blocks: without this the writer would wait for the whole
            # burst. Every few milliseconds, not every read, so bursts still go out in big writes.
            now = time.monotonic()
            if now - yielded_at >= YIELD_EVERY_SECONDS:
                time.sleep(0)
                yielded_at = now
    except Exception as exc:  # noqa: BLE001 -- a silent Dify, a reset, a broken chunk, our close
        if answer.ending is None and answer.reason != "abandoned":
            if isinstance(exc, ReadTimeoutError):
                return _failed_ending(
                    stats,
                    "timeout",
                    504,
                    "upstream_timeout",
                    "The chat service went silent; the answer is incomplete.",
                )
            log.info("dify stream broke: %s", type(exc).__name__)
    if answer.ending is not None:
        return _failed_ending(stats, *answer.ending)
    if answer.reason == "abandoned":
        return _End("abandoned")
    if ending is not None:
        return _End(ending)
    return _failed_ending(
        stats,
        "upstream_dropped",
        502,
        "upstream_dropped",
        "The chat service closed the stream early; the answer is incomplete.",
    )


def _network_reads(upstream: requests.Response) -> Iterator[bytes]:
    """Dify's body as it arrives, without waiting for more than is there.

    A chunked body (Dify's) is read a chunk at a time with urllib3's `read_chunked`, which
    enters urllib3's error handling once, where `read1` enters it for every chunk; Dify writes
    an event per chunk, and that wrapper was the relay's largest cost (the relay went from 13.0
    to 9.2 us per event). Any other body is read with `read1`, which returns what has arrived.
    """
    raw = upstream.raw
    if raw.chunked and raw.supports_chunked_reads():
        yield from raw.read_chunked(decode_content=True)
        return
    while data := raw.read1(READ_SIZE):
        yield data


def _note_ids(stats: StreamStats, data: Any) -> None:
    if not isinstance(data, dict):
        return
    stats.task_id = stats.task_id or _str(data.get("task_id"))
    stats.conversation_id = stats.conversation_id or _str(data.get("conversation_id"))
    stats.message_id = stats.message_id or _str(data.get("message_id"))
    stats.workflow_run_id = stats.workflow_run_id or _str(data.get("workflow_run_id"))
    event = data.get("event")
    if event == "message_end":
        usage = (data.get("metadata") or {}).get("usage")
        stats.usage = usage if isinstance(usage, dict) else None
    elif event in ("workflow_finished", "workflow_paused") and stats.usage is None:
        # A workflow app has no message_end; a chatflow's usage came with its message_end.
        run = data.get("data")
        tokens = run.get("total_tokens") if isinstance(run, dict) else None
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            stats.usage = {"total_tokens": tokens}


def _usage_estimate(dify_events: int) -> dict[str, Any] | None:
    """The tokens of an answer that did not complete and brought no usage report (stopped and
    not ended in time, dropped, timed out, cut by a restart): one per event Dify sent. A
    model's stream sends about a token per `message` event, and the prompt's tokens are
    unknown, so it is a floor."""
    if dify_events <= 0:
        return None
    return {"total_tokens": dify_events, "estimated": True}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _failed_ending(stats: StreamStats, reason: str, status: int, code: str, message: str) -> _End:
    """The ending of a stream that failed: `reason` for the logs, and `final_error`'s event."""
    return _End(reason, final_error(stats, status, code, message))


def final_error(stats: StreamStats, status: int, code: str, message: str) -> bytes:
    """End the client's stream the way Dify ends a failed one: a final `error` data event.

    Its status is the truthful one (502, 503, 504), not the 400 that Dify's own web template
    looks for: a front end detects the failure by the `error` event type (see the README).
    """
    stats.events += 1
    return sse.data_event(
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
