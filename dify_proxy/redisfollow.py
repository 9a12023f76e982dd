"""One blocking `XREAD` per worker for every live answer its resumes follow through Redis.

A resume on another instance than its answer's follows the answer's Redis stream. If each did
its own blocking read, each would hold a Redis connection for as long as it follows, and a
reconnect storm would exhaust Redis's clients (and with them the per-user limits). Here one
reader, started while anyone follows, reads every followed stream in one command and keeps
each stream's latest entries, which every follower of that stream takes from memory.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import redis

from .redisconn import RedisConn

BLOCK_MS = 250  # the reader's XREAD wait: under the client's socket timeout, and the producer
# sends every REDIS_SEND_SECONDS (0.2 s), so a live stream returns sooner
WAIT_SECONDS = 0.5  # how long a follower waits for news before it hears "nothing new"
KEEP_ENTRIES = 16  # a stream's latest entries kept for its followers (about 3 s of it)
FORGET_AFTER_SECONDS = 5.0  # a stream nobody has waited on this long is no longer read

Entry = tuple[bytes, dict[bytes, Any]]  # as XRANGE gives them: id, fields


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


class _Followed:
    __slots__ = ("last", "start", "entries", "waited_at", "failed")

    def __init__(self, after: bytes) -> None:
        self.last = after  # the reader's position
        self.start = _order(after)  # the kept entries are all those after this
        self.entries: collections.deque[tuple[tuple[int, int], Entry]] = collections.deque()
        self.waited_at = time.monotonic()
        self.failed = False


class RedisFollow:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn
        self._changed = threading.Condition()
        self._streams: dict[bytes, _Followed] = {}
        self._reader: threading.Thread | None = None

    def wait(self, key: bytes, after: bytes, timeout: float = WAIT_SECONDS) -> list[Entry] | None:
        """The entries of stream `key` after id `after`, waiting up to `timeout` for some ([]
        when none came); None when the follower is behind what is kept (it reads on with
        XRANGE). Raises redis.ConnectionError when Redis failed."""
        position = _order(after)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                followed = self._streams.get(key)
                if followed is None:
                    followed = self._streams[key] = _Followed(after)
                    if self._reader is None:
                        self._reader = threading.Thread(target=self._read, daemon=True)
                        self._reader.start()
                followed.waited_at = time.monotonic()
                if followed.failed:
                    raise redis.ConnectionError("the followers' reader failed")
                if position < followed.start:
                    return None
                newer = [entry for order, entry in followed.entries if order > position]
                left = deadline - time.monotonic()
                if newer or left <= 0:
                    return newer
                self._changed.wait(left)

    def followed(self) -> int:
        """How many streams the reader reads (for tests and metrics)."""
        return len(self._streams)

    def _read(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                for key in [k for k, f in self._streams.items() if f.failed]:
                    del self._streams[key]  # reported; a later follower starts afresh
                for key, followed in list(self._streams.items()):
                    if now - followed.waited_at > FORGET_AFTER_SECONDS:
                        del self._streams[key]
                if not self._streams:
                    self._reader = None
                    return
                positions = {key: followed.last for key, followed in self._streams.items()}
            client = self._conn.get()
            try:
                if client is None:
                    raise redis.ConnectionError("redis is in its back-off")
                found = client.xread(positions, count=KEEP_ENTRIES, block=BLOCK_MS)
            except redis.RedisError as exc:
                if client is not None:
                    self._conn.failed(exc)
                with self._changed:
                    for key in positions:
                        if key in self._streams:
                            self._streams[key].failed = True
                    self._changed.notify_all()
                time.sleep(BLOCK_MS / 1000)
                continue
            if not found:
                continue
            with self._changed:
                for key, entries in found:
                    followed = self._streams.get(key)
                    if followed is None or not entries:
                        continue
                    for entry_id, fields in entries:
                        followed.entries.append((_order(entry_id), (entry_id, fields)))
                    followed.last = entries[-1][0]
                    while len(followed.entries) > KEEP_ENTRIES:
                        followed.start = followed.entries.popleft()[0]
                self._changed.notify_all()
