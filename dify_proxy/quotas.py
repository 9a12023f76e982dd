"""Per-user concurrent-stream leases and daily token budgets, shared through Redis.

Several instances with several workers each serve one user, so these counts live in Redis when
`REDIS_URL` is set. Leases expire unless renewed, so a worker killed mid-stream frees its slot
within one lease period. When Redis fails, chat keeps working: counts fall back to this process
(limits degrade to per-process), the failure is logged once per interval, and `/readyz` says so.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import UTC, datetime

import redis

log = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS = 0.5
REDIS_RETRY_SECONDS = 5.0  # after a failure, use local counts this long before trying again
ERROR_LOG_INTERVAL_SECONDS = 60.0

# Drop expired leases, then take one if the user has a free slot. Redis's own clock decides
# expiry, so instances with skewed clocks agree.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


class Quotas:
    def __init__(
        self,
        redis_url: str | None,
        max_streams: int,
        lease_seconds: float,
        daily_token_budget: int,
    ) -> None:
        self.max_streams = max_streams
        self.lease_seconds = lease_seconds
        self.daily_token_budget = daily_token_budget
        self.redis = (
            redis.Redis.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
            if redis_url
            else None
        )
        self._lock = threading.Lock()
        self._local_leases: dict[str, dict[str, float]] = {}
        self._local_tokens: dict[tuple[str, str], int] = {}
        self._retry_at = 0.0
        self._logged_at = -ERROR_LOG_INTERVAL_SECONDS
        self.redis_error: str | None = None

    # -- Redis with a local fallback ---------------------------------------------------------

    def _redis(self) -> redis.Redis | None:
        """The client to use now, or None for local counts (no Redis, or it failed recently)."""
        if self.redis is None or time.monotonic() < self._retry_at:
            return None
        return self.redis

    def redis_usable(self) -> bool:
        """Whether Redis is configured and not in its back-off after a failure."""
        return self._redis() is not None

    def redis_failed(self, exc: Exception) -> None:
        """Another user of the same Redis (the answer records) saw it fail."""
        self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._retry_at = now + REDIS_RETRY_SECONDS
        self.redis_error = type(exc).__name__
        if now - self._logged_at >= ERROR_LOG_INTERVAL_SECONDS:
            self._logged_at = now
            log.error(
                "redis unavailable (%s): per-user limits fall back to this process",
                self.redis_error,
            )

    def check_redis(self) -> bool:
        """For /readyz: ping now, whatever the back-off says."""
        if self.redis is None:
            return True
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            self._failed(exc)
            return False
        self.redis_error = None
        return True

    # -- concurrent streams ------------------------------------------------------------------

    def acquire_stream(self, user: str) -> str | None:
        """A lease id, or None when the user already has `max_streams` open."""
        if self.max_streams <= 0:
            return "unlimited"
        lease = secrets.token_hex(8)
        client = self._redis()
        if client is not None:
            try:
                got = client.eval(
                    _ACQUIRE, 1, _streams_key(user), self.max_streams, self.lease_seconds, lease
                )
                return f"r:{lease}" if got else None
            except redis.RedisError as exc:
                self._failed(exc)
        now = time.monotonic()
        with self._lock:
            leases = self._local_leases.setdefault(user, {})
            for key in [k for k, expiry in leases.items() if expiry <= now]:
                del leases[key]
            if len(leases) >= self.max_streams:
                return None
            leases[lease] = now + self.lease_seconds
        return f"l:{lease}"

    def renew_stream(self, user: str, lease: str) -> None:
        kind, _, lease_id = lease.partition(":")
        if kind == "r":
            client = self._redis()
            if client is not None:
                try:
                    client.eval(_RENEW, 1, _streams_key(user), self.lease_seconds, lease_id)
                except redis.RedisError as exc:
                    self._failed(exc)
        elif kind == "l":
            with self._lock:
                leases = self._local_leases.get(user, {})
                if lease_id in leases:
                    leases[lease_id] = time.monotonic() + self.lease_seconds

    def release_stream(self, user: str, lease: str) -> None:
        kind, _, lease_id = lease.partition(":")
        if kind == "r":
            client = self._redis()
            if client is not None:
                try:
                    client.zrem(_streams_key(user), lease_id)
                except redis.RedisError as exc:
                    self._failed(exc)  # the lease expires by itself
        elif kind == "l":
            with self._lock:
                leases = self._local_leases.get(user, {})
                leases.pop(lease_id, None)
                if not leases:
                    self._local_leases.pop(user, None)

    # -- daily token budget ------------------------------------------------------------------

    def over_budget(self, user: str) -> bool:
        return self.daily_token_budget > 0 and self.tokens_used(user) >= self.daily_token_budget

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
        if self.daily_token_budget <= 0 or tokens <= 0:
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


def _streams_key(user: str) -> str:
    return f"dify-proxy:streams:{user}"


def _tokens_key(user: str, day: str) -> str:
    return f"dify-proxy:tokens:{user}:{day}"


def _today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")
