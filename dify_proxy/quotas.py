"""Per-user concurrent-stream and upload leases and daily token budgets, shared through Redis.

Several instances with several workers each serve one user, so these counts live in Redis when
`REDIS_URL` is set. Leases expire unless renewed, so a worker killed mid-stream frees its slot
within one lease period. When Redis fails, chat keeps working: counts fall back to this process
(limits degrade to per-process) while `RedisConn` says Redis is failing.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import UTC, datetime

import redis

from .redisconn import RedisConn

log = logging.getLogger(__name__)

# Drop expired leases (and, given a group, the group's other leases: they are replaced), then
# take one if the user has a free slot. Redis's own clock decides expiry, so instances with
# skewed clocks agree.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[4] ~= '' then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(member, 1, string.len(ARGV[4])) == ARGV[4] then
      redis.call('ZREM', KEYS[1], member)
    end
  end
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""
_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


class Quotas:
    def __init__(
        self,
        conn: RedisConn | str | None,
        max_streams: int,
        lease_seconds: float,
        daily_token_budget: int,
        max_uploads: int = 2,
        count_tokens: bool | None = None,
        max_resumes: int = 0,
    ) -> None:
        self.max_resumes = max_resumes
        self.max_streams = max_streams
        self.max_uploads = max_uploads
        self.lease_seconds = lease_seconds
        self.daily_token_budget = daily_token_budget
        # Whether tokens are counted at all: whenever any user has a budget (a plan's counts),
        # so that a user whose plan changes mid-day is judged on the whole day.
        self.count_tokens = daily_token_budget > 0 if count_tokens is None else count_tokens
        # A URL (or None) is for a Quotas of its own, as in tests; the app shares its RedisConn.
        self.conn = conn if isinstance(conn, RedisConn) else RedisConn(conn)
        self._lock = threading.Lock()
        self._local_leases: dict[tuple[str, str], dict[str, float]] = {}
        self._local_tokens: dict[tuple[str, str], int] = {}

    def _redis(self) -> redis.Redis | None:
        return self.conn.get()

    def _failed(self, exc: Exception) -> None:
        self.conn.failed(exc)

    # -- concurrent streams and uploads ------------------------------------------------------

    def acquire_stream(self, user: str, max_streams: int | None = None) -> str | None:
        """A lease id, or None when the user already has `max_streams` open (this user's
        maximum, their plan's; by default the instance's)."""
        limit = self.max_streams if max_streams is None else max_streams
        return self._acquire("streams", user, limit)

    def renew_stream(self, user: str, lease: str) -> None:
        self._renew("streams", user, lease)

    def release_stream(self, user: str, lease: str) -> None:
        self._release("streams", user, lease)

    def acquire_resume(self, user: str, stream_id: str) -> str | None:
        """A lease id, or None when the user already has `max_resumes` open. A resume of an
        answer replaces the user's other resumes of it: a client that reconnects has left the
        previous connection, whether or not that one has noticed yet."""
        return self._acquire("resumes", user, self.max_resumes, group=stream_id)

    def renew_resume(self, user: str, lease: str) -> bool:
        """Whether the resume still holds its lease (not replaced by a newer one)."""
        return self._renew("resumes", user, lease)

    def release_resume(self, user: str, lease: str) -> None:
        self._release("resumes", user, lease)

    def acquire_upload(self, user: str) -> str | None:
        """A lease id, or None when the user already has `max_uploads` bodies coming in."""
        return self._acquire("uploads", user, self.max_uploads)

    def renew_upload(self, user: str, lease: str) -> None:
        self._renew("uploads", user, lease)

    def release_upload(self, user: str, lease: str) -> None:
        self._release("uploads", user, lease)

    def acquire_hold(self, user: str, limit: int, seconds: float) -> str | None:
        """A cost budget's hold on an answer in flight (see budgets.py), or None when the user
        already has `limit` of them; `limit` 0 is none at all, unlike the streams'."""
        if limit <= 0:
            return None
        return self._acquire("cost-holds", user, limit, seconds=seconds)

    def release_hold(self, user: str, hold: str) -> None:
        self._release("cost-holds", user, hold)

    def _acquire(
        self, kind: str, user: str, limit: int, group: str = "", seconds: float | None = None
    ) -> str | None:
        if limit <= 0:
            return "unlimited"
        seconds = seconds or self.lease_seconds
        prefix = f"{group}:" if group else ""
        lease = prefix + secrets.token_hex(8)
        client = self._redis()
        if client is not None:
            try:
                got = client.eval(
                    _ACQUIRE, 1, _leases_key(kind, user), limit, seconds, lease, prefix
                )
                return f"r:{lease}" if got else None
            except redis.RedisError as exc:
                self._failed(exc)
        now = time.monotonic()
        with self._lock:
            leases = self._local_leases.setdefault((kind, user), {})
            for key in [
                k
                for k, expiry in leases.items()
                if expiry <= now or (prefix and k.startswith(prefix))
            ]:
                del leases[key]
            if len(leases) >= limit:
                return None
            leases[lease] = now + seconds
        return f"l:{lease}"

    def _renew(self, kind: str, user: str, lease: str) -> bool:
        """Renew a lease; whether it was still held (a Redis failure gives it the benefit of
        the doubt)."""
        flavour, _, lease_id = lease.partition(":")
        if flavour == "r":
            client = self._redis()
            if client is not None:
                try:
                    return bool(
                        client.eval(
                            _RENEW, 1, _leases_key(kind, user), self.lease_seconds, lease_id
                        )
                    )
                except redis.RedisError as exc:
                    self._failed(exc)
        elif flavour == "l":
            with self._lock:
                leases = self._local_leases.get((kind, user), {})
                if lease_id not in leases:
                    return False
                leases[lease_id] = time.monotonic() + self.lease_seconds
        return True

    def _release(self, kind: str, user: str, lease: str) -> None:
        flavour, _, lease_id = lease.partition(":")
        if flavour == "r":
            client = self._redis()
            if client is not None:
                try:
                    client.zrem(_leases_key(kind, user), lease_id)
                except redis.RedisError as exc:
                    self._failed(exc)  # the lease expires by itself
        elif flavour == "l":
            with self._lock:
                leases = self._local_leases.get((kind, user), {})
                leases.pop(lease_id, None)
                if not leases:
                    self._local_leases.pop((kind, user), None)

    # -- daily token budget ------------------------------------------------------------------

    def over_budget(self, user: str, budget: int | None = None) -> bool:
        """Whether the user has used up `budget` tokens today (their plan's; by default the
        instance's); 0 is no budget."""
        budget = self.daily_token_budget if budget is None else budget
        return budget > 0 and self.tokens_used(user) >= budget

    def tokens_used(self, user: str) -> int:
        day = _today()
        client = self._redis()
        if client is not None:
            try:
                return int(client.get(_tokens_key(user, day)) or 0)
            except redis.RedisError as exc:
                self._failed(exc)
        with self._lock:
            return self._local_tokens.get((user, day), 0)

    def add_tokens(self, user: str, tokens: int) -> None:
        if not self.count_tokens or tokens <= 0:
            return
        day = _today()
        client = self._redis()
        if client is not None:
            try:
                key = _tokens_key(user, day)
                with client.pipeline() as pipe:
                    pipe.incrby(key, tokens).expire(key, 2 * 86400).execute()
                return
            except redis.RedisError as exc:
                self._failed(exc)
        with self._lock:
            for old in [k for k in self._local_tokens if k[1] != day]:
                del self._local_tokens[old]
            self._local_tokens[(user, day)] = self._local_tokens.get((user, day), 0) + tokens


def _leases_key(kind: str, user: str) -> str:
    return f"dify-proxy:{kind}:{user}"


def _tokens_key(user: str, day: str) -> str:
    return f"dify-proxy:tokens:{user}:{day}"


def _today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")
