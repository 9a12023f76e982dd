"""Every answer's events, kept for a while, so that a client that lost its connection (a mobile
network, a sleeping laptop, a reloaded page) can pick the answer up where it left off.

A reconnect lands on whichever worker accepts it, so the record cannot live in one process:
- a spool directory on local disk serves every worker of one instance (always written: it is
  cheap, and it is what a resume falls back on when Redis fails);
- with `REDIS_URL`, a Redis stream per answer serves every instance: `XADD` with a length cap and
  an expiry; the resumes of one worker that follow live answers share one blocking `XREAD`
  (redisfollow.py).

A record is a sequence of items, made and read only here: its `Owner` first, then an `Event`
for each of Dify's data events (its bytes, without an id), a `Ping` for each read that held
pings (so that a follower can tell a silent Dify from a dead producer), a `Cut` once the record
can no longer give the whole answer (it outgrew `RESUME_MAX_BYTES`, a spool write failed, or
some of it never reached Redis), and its `End` last, which names the last event, so that a
resume decides from the record's last bytes alone whether there is anything to send. Writes to
Redis are batched across every answer of the process by one flusher, so recording costs one
round trip per batch, not per event. A record is read in bounded pieces, as fast as its client
reads it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import redis

from .eventids import is_stream_id, parse_event_id
from .redisconn import RedisConn
from .redisfollow import RedisFollow
from .settings import ConfigError

__all__ = ["Answers", "Cut", "End", "Event", "Ping", "Recorder", "Source", "parse_event_id"]

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how often a follower of the local spool looks for more
FLUSH_SECONDS = 0.01  # how long events wait in memory before the flusher writes them
# How often what is queued for Redis is sent: each answer's share becomes one stream entry (or a
# few, of at most ENTRY_BYTES), so a streaming answer costs one XADD per this interval, not one
# per spool write. Only a resume on another instance reads Redis (the spool serves this one).
REDIS_SEND_SECONDS = 0.2
ENTRY_BYTES = 64 * 1024  # what one Redis entry holds at most (bar one large event)
READ_BYTES = 64 * 1024  # what a resume reads of the spool at a time
READ_ENTRIES = 2  # what a resume reads of a Redis stream at a time (entries of ENTRY_BYTES)
SWEEP_EVERY_SECONDS = 60.0
# How often a running answer's Redis key has its expiry set again. Its expiry is the window plus
# this, so a key outlives its answer's end by at least the window: one EXPIRE per answer every
# so often, where one per write doubled the commands sent for a slow answer.
EXPIRE_EVERY_SECONDS = 30.0
REDIS_PREFIX = "dify-proxy:answer:"
MAX_ENTRIES = 100_000  # a Redis stream's length cap; the byte cap (RESUME_MAX_BYTES) comes first

# -- record items --------------------------------------------------------------------------


class Owner(NamedTuple):
    user: str


class Event(NamedTuple):
    seq: int
    data: bytes  # Dify's bytes, without an id


class Ping(NamedTuple):
    pass


class Cut(NamedTuple):
    """The record cannot give the whole answer from here on."""


class End(NamedTuple):
    reason: str
    last: int  # the number of the answer's last event


Item = Owner | Event | Ping | Cut | End

# Each item is a head, `<kind> <number> <size>\n`, and `size` bytes of body.
_HEAD = re.compile(rb"([oeptx]) ([0-9]{1,12}) ([0-9]{1,12})\n", re.ASCII)
_HEAD_MAX = 28
_PING = b"p 0 0\n"
_CUT = b"t 0 0\n"
# A record's last bytes when it has ended: its end, after a cut if it had one. End reasons are
# identifiers (completed, upstream_error, ...); any other still reads back, at the cost of
# reading the record to its end.
_TAIL = re.compile(rb"(t 0 0\n)?x ([0-9]{1,12}) ([0-9]{1,12})\n([A-Za-z0-9_.-]{0,64})\Z", re.ASCII)
_TAIL_BYTES = 512
INCOMPLETE_ENDS = frozenset({"abandoned"})  # stopped because nobody came back: not whole


class Torn(Exception):
    """Bytes that are not a record: a write cut short (a full disk), or not ours."""


def _encode(item: Item) -> bytes:
    """One item's bytes (the recorder writes events and pings inline, the same way)."""
    if isinstance(item, Event):
        return b"e %d %d\n%b" % (item.seq, len(item.data), item.data)
    if isinstance(item, Ping):
        return _PING
    if isinstance(item, Cut):
        return _CUT
    kind, number, text = (
        (b"o", 0, item.user) if isinstance(item, Owner) else (b"x", item.last, item.reason)
    )
    body = text.encode()
    return b"%b %d %d\n%b" % (kind, number, len(body), body)


def _decode(data: bytes) -> tuple[list[Item], bytes]:
    """Whole items from the front of `data`, and the unfinished rest; Torn if it is no record."""
    items: list[Item] = []
    at = 0
    size = len(data)
    while at < size:
        head = _HEAD.match(data, at)
        if head is None:
            if size - at >= _HEAD_MAX or b"\n" in data[at:]:
                raise Torn
            break
        body_end = head.end() + int(head.group(3))
        if body_end > size:
            break
        body = data[head.end() : body_end]
        kind = head.group(1)
        if kind == b"e":
            items.append(Event(int(head.group(2)), body))
        elif kind == b"p":
            items.append(Ping())
        elif kind == b"t":
            items.append(Cut())
        else:
            try:
                text = body.decode()
            except UnicodeDecodeError:
                raise Torn from None
            items.append(Owner(text) if kind == b"o" else End(text, int(head.group(2))))
        at = body_end
    return items, data[at:]


def _ending(tail: bytes) -> Cut | End | None:
    """What a record's last bytes say: it has ended (End), it cannot be resumed (Cut, also for
    an ending that leaves the answer incomplete), or it is still being written (None)."""
    if tail.endswith(_CUT):
        return Cut()
    match = _TAIL.search(tail)
    if match is None or int(match.group(3)) != len(match.group(4)):
        return None
    reason = match.group(4).decode("ascii")
    if match.group(1) or reason in INCOMPLETE_ENDS:
        return Cut()
    return End(reason, int(match.group(2)))


# -- writing -------------------------------------------------------------------------------


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
        self._last = 0
        self.truncated = False
        self._torn = False  # a spool write fell short: the spool needs its Cut
        self._spooled = 0  # the bytes of whole items on the spool
        self._redis = answers.redis is not None
        self._fd: int | None = None
        # Appended to by the reader, emptied by whoever flushes: a deque, whose append and
        # popleft are atomic, so recording an event takes no lock. Flushes take one, so that
        # two of them (the flusher's and the end's) never write the same record out of order.
        self._pending: collections.deque[bytes] = collections.deque()
        self._flush_lock = threading.Lock()
        self._queued = False  # in the flusher's queue
        try:  # kept open while the answer runs: no open and close per write
            self._fd = os.open(
                self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600
            )
        except OSError as exc:
            log.warning("answer spool open failed: %s", type(exc).__name__)
        self._pending.append(_encode(Owner(owner)))
        self.flush()

    def events(self, events: list[tuple[int, bytes]], size: int, pinged: bool = False) -> None:
        """Record a batch: Dify's data events as (number, bytes), `size` their bytes, and
        whether pings came with them. Past the byte cap the record is marked cut, and keeps
        nothing more but its end: a resume that meets the mark gets the 204 (or an error
        event)."""
        if self.truncated:
            return
        self._bytes += size
        pending = self._pending
        if self._bytes > self._answers.max_bytes:
            self.truncated = True
            pending.append(_CUT)
        else:
            for seq, event in events:
                pending.append(b"e %d %d\n" % (seq, len(event)))
                pending.append(event)
            if events:
                self._last = events[-1][0]
            if pinged:
                pending.append(_PING)
        if not self._queued:  # the flusher clears this before it takes what is pending
            self._queued = True
            self._answers.flush_soon(self)

    def end(self, reason: str) -> None:
        end = _encode(End(reason, self._last))
        self._pending.append(end)
        self.flush()
        with self._flush_lock:
            if self._torn and self._fd is not None:
                # One more try: a torn record must still say, at its end, that it is cut.
                with contextlib.suppress(OSError):
                    os.write(self._fd, _CUT + end)
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
                out = _CUT + data if self._torn else data
                try:
                    written = os.write(self._fd, out)
                except OSError as exc:
                    log.warning("answer spool write failed: %s", type(exc).__name__)
                    written = -1
                if written == len(out):
                    self._torn = False
                    self._spooled += written
                    self._queue_redis(data)
                    return
                with contextlib.suppress(OSError):  # drop the torn piece, where that works
                    os.ftruncate(self._fd, self._spooled)
                if not self._torn:
                    # A short write (a full disk) tore the record: whatever follows cannot be
                    # read as items. It gets a Cut (on the spool with the next write that
                    # succeeds, and in Redis), so that a resume gets the 204 or an error event,
                    # never a 500 or an answer with a hole in it.
                    self._torn = True
                    if not self.truncated:
                        self.truncated = True
                        self._pending.append(_CUT)
                        self._answers.flush_soon(self)
            self._queue_redis(data)

    def _queue_redis(self, data: bytes) -> None:
        if self._redis:
            self._answers.queue_redis(self.stream_id, data)


_instances: list[Answers] = []


def flush_all(timeout: float = 2.0) -> None:
    """Write what every Answers of this process holds, to the spool and to Redis (a worker about
    to exit)."""
    for answers in _instances:
        answers.flush(timeout)


class _Broken:
    """An answer some of whose items never reached Redis."""

    __slots__ = ("marked", "ended", "touched")

    def __init__(self) -> None:
        self.marked = False  # its Cut is in Redis
        self.ended = False
        self.touched = time.monotonic()


class Answers:
    """Where records live: the spool directory, and Redis when configured."""

    def __init__(
        self,
        spool_dir: str,
        window: float,
        max_bytes: int,
        conn: RedisConn | None = None,
    ) -> None:
        self.spool_dir = _own_spool_dir(spool_dir)
        self.window = window
        self.max_bytes = max_bytes
        self._conn = conn if conn is not None and conn.client is not None else None
        self.redis = self._conn.client if self._conn is not None else None
        self.follow = RedisFollow(self._conn) if self._conn is not None else None
        self._due: collections.deque[Recorder] = collections.deque()  # with events to write
        self._pending: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()  # for Redis
        self._wake = threading.Event()
        self._send_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._swept_at = 0.0
        self._lock = threading.Lock()
        self._broken: dict[str, _Broken] = {}
        self._expiry_set: dict[str, float] = {}  # by Redis key: when its expiry was last set
        _instances.append(self)

    # -- writing ---------------------------------------------------------------------------

    def record(self, stream_id: str, owner: str) -> Recorder:
        if self._flusher is None:
            self._wake_flusher()  # it also sweeps, on a timer
        self._sweep()
        return Recorder(self, stream_id, owner)

    def spool_path(self, stream_id: str) -> str:
        return os.path.join(self.spool_dir, stream_id)

    def flush_soon(self, recorder: Recorder) -> None:
        """Have the flusher write `recorder`'s events within FLUSH_SECONDS."""
        self._due.append(recorder)
        self._wake_flusher()

    def queue_redis(self, stream_id: str, data: bytes) -> None:
        """Queue one batch, already encoded: it becomes (part of) one stream entry."""
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
            # With something for Redis, wake up in time to send it even if no more comes;
            # otherwise at least once per sweep, so records go when their window is over.
            waiting = not self._pending.empty() or any(
                not b.marked for b in list(self._broken.values())
            )
            self._wake.wait(REDIS_SEND_SECONDS if waiting else SWEEP_EVERY_SECONDS)
            self._wake.clear()
            time.sleep(FLUSH_SECONDS)  # what comes meanwhile goes in the same writes
            while self._due:
                self._due.popleft().flush()
            if time.monotonic() - sent_at >= REDIS_SEND_SECONDS:
                sent_at = time.monotonic()
                self._send_redis()
            self._sweep()

    def _send_redis(self) -> None:
        """Send what is queued, an answer's batches joined into entries (in their order)."""
        with self._send_lock:  # a worker's last flush and the flusher never interleave
            if self.redis is None:
                return
            while True:
                joined: dict[str, list[bytes]] = {}
                with contextlib.suppress(queue.Empty):
                    while len(joined) < 2000:
                        stream_id, data = self._pending.get_nowait()
                        joined.setdefault(stream_id, []).append(data)
                if not joined and not any(not b.marked for b in self._broken.values()):
                    return
                self._flush(
                    [
                        (stream_id, entry)
                        for stream_id, parts in joined.items()
                        for entry in _entries(parts)
                    ]
                )
                if not joined:
                    return

    def _flush(self, batch: list[tuple[str, bytes]]) -> None:
        """One pipeline for everything queued: an `XADD` per entry, a Cut for each answer with
        items lost to an outage, and an `EXPIRE` for each answer new to Redis or not renewed
        for EXPIRE_EVERY_SECONDS."""
        assert self._conn is not None and self.redis is not None
        now = time.monotonic()
        self._forget_broken(now)
        if not self._conn.usable():
            self._lost(batch)
            return
        pipe = self.redis.pipeline(transaction=False)
        keys = set()
        marking: list[str] = []
        for stream_id, data in batch:
            broken = self._broken.get(stream_id)
            if broken is not None:
                broken.touched = now
                broken.ended = broken.ended or _TAIL.search(data) is not None
                if broken.marked and broken.ended:
                    del self._broken[stream_id]  # nothing more will come
                continue  # what follows a hole is no use: only its Cut goes
            keys.add(REDIS_PREFIX + stream_id)
            pipe.xadd(REDIS_PREFIX + stream_id, {"b": data}, maxlen=MAX_ENTRIES, approximate=True)
        for stream_id, broken in self._broken.items():
            if not broken.marked:
                # Some of this answer never reached Redis: say so, so that a resume from Redis
                # gets the 204 instead of an answer with a hole in it.
                marking.append(stream_id)
                keys.add(REDIS_PREFIX + stream_id)
                pipe.xadd(REDIS_PREFIX + stream_id, {"b": _CUT}, maxlen=MAX_ENTRIES)
        ttl = max(1, int(self.window + EXPIRE_EVERY_SECONDS))
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
            self._conn.failed(exc)
            for key in renewed:
                del self._expiry_set[key]
            self._lost(batch)
            return
        for stream_id in marking:
            broken = self._broken[stream_id]
            broken.marked = True
            if broken.ended:
                del self._broken[stream_id]  # nothing more will come

    def _lost(self, batch: list[tuple[str, bytes]]) -> None:
        """These entries never reached Redis: their answers need (again) a Cut there."""
        now = time.monotonic()
        for stream_id, data in batch:
            broken = self._broken.setdefault(stream_id, _Broken())
            broken.marked = False
            broken.touched = now
            broken.ended = broken.ended or _TAIL.search(data) is not None
        for broken in self._broken.values():
            broken.marked = False

    def _forget_broken(self, now: float) -> None:
        """An answer silent for the window is over, and its Redis key gone or going."""
        for stream_id, broken in list(self._broken.items()):
            if now - broken.touched > self.window + EXPIRE_EVERY_SECONDS:
                del self._broken[stream_id]

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
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            os.utime(path)
        client = self._conn.get() if self._conn is not None else None
        if client is not None:
            try:
                client.set(REDIS_PREFIX + stream_id + ":seen", time.time(), ex=60)
            except redis.RedisError as exc:
                self._conn.failed(exc)  # type: ignore[union-attr]

    def seen_at(self, stream_id: str) -> float:
        seen = 0.0
        with contextlib.suppress(OSError):
            seen = os.stat(self.spool_path(stream_id) + ".seen").st_mtime
        client = self._conn.get() if self._conn is not None else None
        if client is not None:
            try:
                value = client.get(REDIS_PREFIX + stream_id + ":seen")
                seen = max(seen, float(value or 0))
            except redis.RedisError as exc:
                self._conn.failed(exc)  # type: ignore[union-attr]
            except ValueError:
                pass
        return seen

    # -- reading -----------------------------------------------------------------------------

    def find(self, stream_id: str, owner: str) -> Source | None:
        """The record of `owner`'s answer, or None: unknown, expired, or someone else's. The
        caller answers all of these alike, and each costs the same (the spool is looked at,
        and Redis asked, whichever it is), so none reveals that an id exists."""
        spool = _SpoolSource.open(self, stream_id)
        from_redis: _RedisSource | None = None
        client = self._conn.get() if self._conn is not None else None
        if client is not None:
            try:
                from_redis = _RedisSource.open(self, client, stream_id)
            except redis.RedisError as exc:
                self._conn.failed(exc)  # type: ignore[union-attr]
        source: Source | None = spool or from_redis
        if source is None or source.owner != owner:
            if spool is not None:
                spool.close()
            return None
        return source

    def _sweep(self) -> None:
        """Delete the records and marks older than the window, and forget answers whose Redis
        expiry was last set long ago; at most once a minute per process.

        Only this proxy's own files: regular files named as records are, never a link (not
        followed either), a directory or anything in one; the spool directory may have been
        given by a careless setting."""
        now = time.time()
        if now - self._swept_at < SWEEP_EVERY_SECONDS:
            return
        self._swept_at = now
        renewed_before = time.monotonic() - 2 * EXPIRE_EVERY_SECONDS
        for key, at in list(self._expiry_set.items()):
            if at < renewed_before:
                del self._expiry_set[key]
        with contextlib.suppress(OSError), os.scandir(self.spool_dir) as entries:
            for entry in entries:
                if not is_stream_id(entry.name.removesuffix(".seen")):
                    continue  # the spool holds records and their `.seen` marks, nothing else
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and now - info.st_mtime > self.window:
                        os.unlink(entry.path)


def _own_spool_dir(path: str) -> str:
    """The spool directory, which must be private: records hold people's answers.

    A directory that other users can enter, or that is not ours, is refused rather than
    tightened: a careless `RESUME_SPOOL_DIR` (`/tmp`, the app's own directory) is a shared
    directory that a chmod would break for everyone else.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"RESUME_SPOOL_DIR {path} is not a directory")
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"RESUME_SPOOL_DIR {path} must be a directory of this user's that no one else can"
            f" open (it is mode {stat.S_IMODE(info.st_mode):o}): name a new directory, which"
            " the proxy makes with mode 700, or chmod 700 this one"
        )
    return path


def _entries(parts: list[bytes]) -> Iterator[bytes]:
    """An answer's queued batches as entries of at most ENTRY_BYTES (bar one large batch)."""
    entry: list[bytes] = []
    size = 0
    for part in parts:
        if entry and size + len(part) > ENTRY_BYTES:
            yield b"".join(entry)
            entry, size = [], 0
        entry.append(part)
        size += len(part)
    if entry:
        yield b"".join(entry)


# -- reading -------------------------------------------------------------------------------


class Source:
    """A record being read: its owner, how it ended (if it has), then its items in bounded
    pieces, live ones too, until the end."""

    owner: str
    ending: Cut | End | None  # from the record's last bytes, when it was found

    def items(self, stop: Callable[[], bool]) -> Iterator[Item | None]:
        """Every item in order, in pieces; None after each piece and whenever nothing new has
        come for a moment (so the caller can write what it has, send a keep-alive or give up).
        Ends after the End, or with a Cut when the rest cannot be read."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SpoolSource(Source):
    def __init__(self, file, owner: str, ending: Cut | End | None) -> None:  # noqa: ANN001
        self._file = file
        self.owner = owner
        self.ending = ending

    @classmethod
    def open(cls, answers: Answers, stream_id: str) -> _SpoolSource | None:
        """The record, opened once (a sweep may delete its name meanwhile), or None: missing,
        unreadable, or silent for longer than the window (ended then, or its worker died)."""
        try:
            fd = os.open(answers.spool_path(stream_id), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        file = os.fdopen(fd, "rb")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime > answers.window:
                raise Torn
            head = file.read(4096)
            items, _ = _decode(head)
            if not items or not isinstance(items[0], Owner):
                raise Torn
            file.seek(max(0, info.st_size - _TAIL_BYTES))
            ending = _ending(file.read(_TAIL_BYTES))
            file.seek(0)
        except (OSError, Torn):
            file.close()
            return None
        return cls(file, items[0].user, ending)

    def items(self, stop: Callable[[], bool]) -> Iterator[Item | None]:
        pending = b""
        try:
            while not stop():
                data = self._file.read(READ_BYTES)
                if not data:
                    yield None
                    time.sleep(POLL_SECONDS)
                    continue
                try:
                    items, pending = _decode(pending + data)
                except Torn:
                    yield Cut()
                    return
                for item in items:
                    yield item
                    if isinstance(item, (End, Cut)):
                        return
                yield None
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()


class _RedisSource(Source):
    def __init__(self, answers: Answers, key: bytes, owner: str, ending: Cut | End | None) -> None:
        assert answers._conn is not None and answers.follow is not None
        self._conn = answers._conn
        self._follow = answers.follow
        self.key = key
        self.owner = owner
        self.ending = ending

    @classmethod
    def open(cls, answers: Answers, client: redis.Redis, stream_id: str) -> _RedisSource | None:
        """The record's first and last entries, in one round trip."""
        key = (REDIS_PREFIX + stream_id).encode()
        pipe = client.pipeline(transaction=False)
        pipe.xrange(key, count=1)
        pipe.xrevrange(key, count=1)
        first, last = pipe.execute()
        if not first:
            return None
        try:
            items, _ = _decode(first[0][1][b"b"])
        except Torn:
            return None
        if not items or not isinstance(items[0], Owner):
            return None
        data = last[0][1][b"b"] if last else b""
        ending: Cut | End | None = _ending(data[-_TAIL_BYTES:])
        if ending is None and _CUT in data:
            try:
                if any(isinstance(item, Cut) for item in _decode(data)[0]):
                    ending = Cut()
            except Torn:
                ending = Cut()
        return cls(answers, key, items[0].user, ending)

    def items(self, stop: Callable[[], bool]) -> Iterator[Item | None]:
        """Catch up with XRANGE, a few entries at a time; then take what the worker's one
        reader of live streams brings (redisfollow.py)."""
        last = b"0-0"
        live = False
        while not stop():
            try:
                if live:
                    entries = self._follow.wait(self.key, last)
                    if entries is None:  # fell behind what the reader keeps
                        live = False
                        continue
                else:
                    client = self._conn.get()
                    if client is None:
                        raise redis.ConnectionError("redis is in its back-off")
                    try:
                        entries = client.xrange(self.key, min=_next_id(last), count=READ_ENTRIES)
                    except redis.RedisError as exc:
                        self._conn.failed(exc)
                        raise
                    live = len(entries) < READ_ENTRIES
            except redis.RedisError:
                yield Cut()
                return
            for entry_id, fields in entries:
                last = entry_id
                try:
                    items, _ = _decode(fields[b"b"])
                except Torn:
                    yield Cut()
                    return
                for item in items:
                    yield item
                    if isinstance(item, (End, Cut)):
                        return
            yield None


def _next_id(entry_id: bytes) -> bytes:
    """The smallest stream entry id after `entry_id` (XRANGE's start is inclusive)."""
    ms, _, seq = entry_id.partition(b"-")
    return b"%d-%d" % (int(ms), int(seq) + 1)
