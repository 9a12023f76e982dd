"""Every answer's events, kept for a while, so that a client that lost its connection (a mobile
network, a sleeping laptop, a reloaded page) can pick the answer up where it left off.

A reconnect lands on whichever worker accepts it, so the record cannot live in one process:
- a spool directory on local disk serves every worker of one instance (always written: it is
  cheap, and it is what a resume falls back on when Redis fails);
- with `REDIS_URL`, a Redis stream per answer serves every instance: `XADD` with a length cap and
  an expiry, and a blocking `XREAD` to follow an answer that is still streaming.

A record is a sequence of items: `("o", owner)` first, then `("e", seq, event)` for each data
event (Dify's bytes, without an id), `("p",)` for each ping (so that a follower can tell a silent
Dify from a dead producer), `("t",)` once the answer outgrew `RESUME_MAX_BYTES`, and `("x",
reason)` last. Writes to Redis are batched across every answer of the process by one flusher,
so recording costs one round trip per batch, not per event.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

log = logging.getLogger(__name__)

Item = tuple[Any, ...]
LAST_EVENT_ID = re.compile(r"([A-Za-z0-9_-]{22})-(\d{1,9})")
POLL_SECONDS = 0.05  # how often a follower of the local spool looks for more
FLUSH_SECONDS = 0.01  # how long events wait in memory before the flusher writes them
# How often what is queued for Redis is sent: each answer's share becomes one stream entry, so
# a streaming answer costs one XADD per this interval, not one per spool write. Only a resume on
# another instance reads Redis (the spool serves this one), and that much later.
REDIS_SEND_SECONDS = 0.2
BLOCK_MS = 300  # a follower's XREAD wait; under the Redis client's socket timeout
SWEEP_EVERY_SECONDS = 60.0
# How often a running answer's Redis key has its expiry set again. Its expiry is the window plus
# this, so a key outlives its answer's end by at least the window: one EXPIRE per answer every
# so often, where one per write doubled the commands sent for a slow answer.
EXPIRE_EVERY_SECONDS = 30.0
REDIS_PREFIX = "dify-proxy:answer:"
MAX_ENTRIES = 100_000  # a Redis stream's length cap; the byte cap (RESUME_MAX_BYTES) comes first


def parse_event_id(value: str) -> tuple[str, int] | None:
    """`<stream id>-<n>` from a Last-Event-ID, or None for anything else."""
    match = LAST_EVENT_ID.fullmatch(value.strip())
    return (match.group(1), int(match.group(2))) if match else None


class Recorder:
    """The writing end of one answer's record.

    Events are kept in memory and written by the process's flusher every FLUSH_SECONDS: under a
    fast stream that is one spool write and one Redis entry per tick, not per network read
    (a write per read was an eighth of the relay's CPU). The owner goes out at once, so that the
    record exists as soon as the answer's first byte does, and the end goes out at once, so
    that a record that says it has ended holds every event.
    """

    def __init__(self, answers: Answers, stream_id: str, owner: str) -> None:
        self._answers = answers
        self.stream_id = stream_id
        self._path = answers.spool_path(stream_id)
        self._bytes = 0
        self.truncated = False
        self._redis = answers.redis is not None
        self._fd: int | None = None
        # Appended to by the reader, emptied by whoever flushes: a deque, whose append and
        # popleft are atomic, so recording an event takes no lock. Flushes take one, so that
        # two of them (the flusher's and the end's) never write the same record out of order.
        self._pending: collections.deque[bytes] = collections.deque()
        self._flush_lock = threading.Lock()
        self._queued = False  # in the flusher's queue
        try:  # kept open while the answer runs: no open and close per write
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("answer spool open failed: %s", type(exc).__name__)
        self._pending.append(_encode(("o", owner)))
        self.flush()

    def events(self, items: list[bytes], size: int) -> None:
        """Record a batch of items: each event as its `event_head` then its bytes, each ping as
        `PING_ITEM`; `size` is the bytes of Dify's events among them. Past the byte cap the
        record is marked cut, and keeps nothing more but its end: a resume that meets the mark
        gets the 204 (or an error event)."""
        if self.truncated:
            return
        self._bytes += size
        if self._bytes > self._answers.max_bytes:
            self.truncated = True
            items = [_encode(("t",))]
        self._pending.extend(items)
        if not self._queued:  # the flusher clears this before it takes what is pending
            self._queued = True
            self._answers.flush_soon(self)

    def end(self, reason: str) -> None:
        self._pending.append(_encode(("x", reason)))
        self.flush()
        with self._flush_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def seen_at(self) -> float:
        """When a resumed client last showed it is still reading (0 if none ever did)."""
        return self._answers.seen_at(self.stream_id)

    def flush(self) -> None:
        """Write what is pending, in order: to the spool now, and queued for Redis."""
        with self._flush_lock:
            self._queued = False
            pending, parts = self._pending, []
            while pending:
                parts.append(pending.popleft())
            if not parts:
                return
            data = b"".join(parts)
            if self._fd is not None:
                try:
                    os.write(self._fd, data)
                except OSError as exc:
                    log.warning("answer spool write failed: %s", type(exc).__name__)
            if self._redis:
                self._answers.queue_redis(self.stream_id, data)


_instances: list[Answers] = []


def flush_all(timeout: float = 2.0) -> None:
    """Write what every Answers of this process holds, to the spool and to Redis (a worker about
    to exit)."""
    for answers in _instances:
        answers.flush(timeout)


class Answers:
    """Where records live: the spool directory, and Redis when configured."""

    def __init__(
        self,
        spool_dir: str,
        window: float,
        max_bytes: int,
        redis_client: redis.Redis | None = None,
        on_redis_error: Callable[[Exception], None] = lambda exc: None,
        redis_usable: Callable[[], bool] = lambda: True,
    ) -> None:
        os.makedirs(spool_dir, mode=0o700, exist_ok=True)
        self.spool_dir = spool_dir
        self.window = window
        self.max_bytes = max_bytes
        self.redis = redis_client
        self._on_redis_error = on_redis_error
        self._redis_usable = redis_usable
        self._due: collections.deque[Recorder] = collections.deque()  # with events to write
        self._pending: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()  # for Redis
        self._wake = threading.Event()
        self._send_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._swept_at = 0.0
        self._lock = threading.Lock()
        # Answers with items that never reached Redis: False until a "t" marker was sent.
        self._broken: dict[str, bool] = {}
        self._expiry_set: dict[str, float] = {}  # by Redis key: when its expiry was last set
        _instances.append(self)

    # -- writing ---------------------------------------------------------------------------

    def record(self, stream_id: str, owner: str) -> Recorder:
        self._sweep()
        return Recorder(self, stream_id, owner)

    def spool_path(self, stream_id: str) -> str:
        return os.path.join(self.spool_dir, stream_id)

    def flush_soon(self, recorder: Recorder) -> None:
        """Have the flusher write `recorder`'s events within FLUSH_SECONDS."""
        self._due.append(recorder)
        self._wake_flusher()

    def queue_redis(self, stream_id: str, data: bytes) -> None:
        """Queue one batch, already encoded: it becomes one stream entry."""
        self._pending.put((stream_id, data))
        self._wake_flusher()

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            with self._lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_forever, daemon=True)
                    self._flusher.start()
        if not self._wake.is_set():
            self._wake.set()

    def _flush_forever(self) -> None:
        sent_at = 0.0
        while True:
            # With something queued for Redis, wake up in time to send it even if no more comes.
            self._wake.wait(None if self._pending.empty() else REDIS_SEND_SECONDS)
            self._wake.clear()
            time.sleep(FLUSH_SECONDS)  # what comes meanwhile goes in the same writes
            while self._due:
                self._due.popleft().flush()
            if time.monotonic() - sent_at >= REDIS_SEND_SECONDS:
                sent_at = time.monotonic()
                self._send_redis()

    def _send_redis(self) -> None:
        """Send what is queued, an answer's batches joined into one entry (in their order)."""
        with self._send_lock:  # a worker's last flush and the flusher never interleave
            while self.redis is not None and not self._pending.empty():
                joined: dict[str, list[bytes]] = {}
                with contextlib.suppress(queue.Empty):
                    while len(joined) < 2000:
                        stream_id, data = self._pending.get_nowait()
                        joined.setdefault(stream_id, []).append(data)
                self._flush([(stream_id, b"".join(parts)) for stream_id, parts in joined.items()])

    def _flush(self, batch: list[tuple[str, bytes]]) -> None:
        """One pipeline for everything queued: an `XADD` per batch of an answer, and an `EXPIRE`
        for each answer new to Redis or not renewed for EXPIRE_EVERY_SECONDS."""
        assert self.redis is not None
        if not self._redis_usable():
            for stream_id, _ in batch:
                self._broken.setdefault(stream_id, False)
            return
        pipe = self.redis.pipeline(transaction=False)
        keys = set()
        for stream_id, data in batch:
            if stream_id in self._broken:
                # Some of this answer never reached Redis: say so once, so that a resume from
                # Redis gets the 204 instead of an answer with a hole in it.
                if self._broken[stream_id]:
                    if any(item[0] == "x" for item in _decode(data)[0]):
                        del self._broken[stream_id]  # its end: nothing more will come
                    continue
                self._broken[stream_id] = True
                data = _encode(("t",))
            key = REDIS_PREFIX + stream_id
            keys.add(key)
            pipe.xadd(key, {"b": data}, maxlen=MAX_ENTRIES, approximate=True)
        ttl = max(1, int(self.window + EXPIRE_EVERY_SECONDS))
        now = time.monotonic()
        renewed = [
            key
            for key in keys
            if now - self._expiry_set.get(key, -EXPIRE_EVERY_SECONDS) >= EXPIRE_EVERY_SECONDS
        ]
        for key in renewed:
            pipe.expire(key, ttl)
            self._expiry_set[key] = now
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._on_redis_error(exc)
            for key in renewed:
                del self._expiry_set[key]
            for stream_id, _ in batch:
                self._broken.setdefault(stream_id, False)

    def flush(self, timeout: float = 2.0) -> None:
        """Write what is held now, to the spool and to Redis (a worker about to exit); wait at
        most `timeout` for a send of the flusher's that is under way."""
        while self._due:
            self._due.popleft().flush()
        if self._send_lock.acquire(timeout=timeout):
            self._send_lock.release()
            self._send_redis()

    # -- attaching ---------------------------------------------------------------------------

    def mark_seen(self, stream_id: str) -> None:
        """A resumed client is reading: the producer's grace starts again from now."""
        path = self.spool_path(stream_id) + ".seen"
        with contextlib.suppress(OSError):
            with open(path, "a"):
                pass
            os.utime(path)
        if self.redis is not None and self._redis_usable():
            try:
                self.redis.set(REDIS_PREFIX + stream_id + ":seen", time.time(), ex=60)
            except redis.RedisError as exc:
                self._on_redis_error(exc)

    def seen_at(self, stream_id: str) -> float:
        seen = 0.0
        with contextlib.suppress(OSError):
            seen = os.stat(self.spool_path(stream_id) + ".seen").st_mtime
        if self.redis is not None and self._redis_usable():
            try:
                value = self.redis.get(REDIS_PREFIX + stream_id + ":seen")
                seen = max(seen, float(value or 0))
            except (redis.RedisError, ValueError) as exc:
                if isinstance(exc, redis.RedisError):
                    self._on_redis_error(exc)
        return seen

    # -- reading -----------------------------------------------------------------------------

    def find(self, stream_id: str, owner: str) -> Source | None:
        """The record of `owner`'s answer, or None: unknown, expired, someone else's, or too
        long to resume. The caller answers all of these alike, so none reveals that an id
        exists."""
        source: Source | None = None
        if os.path.exists(self.spool_path(stream_id)):
            source = _SpoolSource(self, stream_id)
        elif self.redis is not None and self._redis_usable():
            source = _RedisSource(self, stream_id)
        if source is None:
            return None
        try:
            first = source.first()
        except redis.RedisError as exc:
            self._on_redis_error(exc)
            return None
        if first is None or first[0] != "o" or first[1] != owner or source.expired():
            return None
        return source

    def _sweep(self) -> None:
        """Delete spool files older than the window, and forget answers whose Redis expiry was
        last set long ago; at most once a minute per process."""
        now = time.time()
        if now - self._swept_at < SWEEP_EVERY_SECONDS:
            return
        self._swept_at = now
        renewed_before = time.monotonic() - 2 * EXPIRE_EVERY_SECONDS
        for key, at in list(self._expiry_set.items()):
            if at < renewed_before:
                del self._expiry_set[key]
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.spool_dir):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > self.window:
                        os.unlink(entry.path)


class Source:
    """A record being read: the items after a given event, then live ones until the end."""

    def first(self) -> Item | None:
        raise NotImplementedError

    def expired(self) -> bool:
        raise NotImplementedError

    def items(self, stop: Callable[[], bool]) -> Iterator[Item | None]:
        """Every item in order; None whenever nothing new has come for a moment (so the
        caller can send a keep-alive or give up). Ends after the `x` item."""
        raise NotImplementedError


class _SpoolSource(Source):
    def __init__(self, answers: Answers, stream_id: str) -> None:
        self.path = answers.spool_path(stream_id)
        self.window = answers.window

    def first(self) -> Item | None:
        with open(self.path, "rb") as f:
            items, _ = _decode(f.read(4096))
        return items[0] if items else None

    def expired(self) -> bool:
        """Ended more than the window ago, or silent for that long (its worker died)."""
        return time.time() - os.stat(self.path).st_mtime > self.window

    def items(self, stop: Callable[[], bool]) -> Iterator[Item | None]:
        with open(self.path, "rb") as f:
            pending = b""
            while not stop():
                data = f.read()
                if not data:
                    yield None
                    time.sleep(POLL_SECONDS)
                    continue
                items, pending = _decode(pending + data)
                for item in items:
                    yield item
                    if item[0] == "x":
                        return


class _RedisSource(Source):
    def __init__(self, answers: Answers, stream_id: str) -> None:
        assert answers.redis is not None
        self.redis = answers.redis
        self.key = REDIS_PREFIX + stream_id

    def first(self) -> Item | None:
        entries = self.redis.xrange(self.key, count=1)
        items = _decode(entries[0][1][b"b"])[0] if entries else []
        return items[0] if items else None

    def expired(self) -> bool:
        return False  # Redis expires the key itself

    def items(self, stop: Callable[[], bool]) -> Iterator[Item | None]:
        last = "0-0"
        while not stop():
            try:
                found = self.redis.xread({self.key: last}, count=500, block=BLOCK_MS)
            except redis.RedisError:
                yield ("x", "resume_failed")
                return
            if not found:
                yield None
                continue
            for entry_id, fields in found[0][1]:
                last = entry_id
                for item in _decode(fields[b"b"])[0]:
                    yield item
                    if item[0] == "x":
                        return


def event_head(seq: int, event: bytes) -> bytes:
    """The head of the record's item for one of Dify's data events (its number and size),
    which the event's own bytes follow."""
    return b"e %d %d\n" % (seq, len(event))


def _encode(item: Item) -> bytes:
    kind = item[0]
    if kind == "e":
        return event_head(item[1], item[2]) + item[2]
    if kind in ("o", "x"):
        text = item[1].encode()
        return b"%b 0 %d\n%b" % (kind.encode(), len(text), text)
    return b"%b 0 0\n" % kind.encode()


PING_ITEM = _encode(("p",))


def _decode(data: bytes) -> tuple[list[Item], bytes]:
    """Whole items from the front of `data`, and the unfinished rest."""
    items: list[Item] = []
    at = 0
    while True:
        head_end = data.find(b"\n", at)
        if head_end < 0:
            break
        kind, seq, size = data[at:head_end].split(b" ")
        body_end = head_end + 1 + int(size)
        if body_end > len(data):
            break
        body = data[head_end + 1 : body_end]
        items.append(_make(kind.decode(), int(seq), body))
        at = body_end
    return items, data[at:]


def _make(kind: str, seq: int, body: bytes) -> Item:
    if kind == "e":
        return ("e", seq, body)
    if kind in ("o", "x"):
        return (kind, body.decode())
    return (kind,)
