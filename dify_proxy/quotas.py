"""Per-user concurrent-stream and upload leases and daily token budgets, shared through Redis.

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
from typing import Any
from urllib.parse import parse_qs, urlsplit

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


def redis_options(url: str) -> dict[str, Any]:
    """Connection options for `redis.from_url`, shared with the rate limiter's storage.

    Heroku Redis (and other managed Redis) serves `rediss://` with a self-signed certificate and
    documents that clients must not verify it; verifying would make every limit silently fall
    back to per-process counts. So `rediss://` skips verification unless the URL itself says
    otherwise (`?ssl_cert_reqs=required`, which redis-py reads from the URL and prefers).
    """
    options: dict[str, Any] = {
        "socket_timeout": REDIS_TIMEOUT_SECONDS,
        "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
    }
    parts = urlsplit(url)
    if parts.scheme == "rediss" and "ssl_cert_reqs" not in parse_qs(parts.query):
        options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    return options


class Quotas:
    def __init__(
        self,
        redis_url: str | None,
        max_streams: int,
        lease_seconds: float,
        daily_token_budget: int,
        max_uploads: int = 2,
        count_tokens: bool | None = None,
    ) -> None:
        self.max_streams = max_streams
        self.max_uploads = max_uploads
        self.lease_seconds = lease_seconds
        self.daily_token_budget = daily_token_budget
        # Whether tokens are counted at all: whenever any user has a budget (a plan's counts),
        # so that a user whose plan changes mid-day is judged on the whole day.
        self.count_tokens = daily_token_budget > 0 if count_tokens is None else count_tokens
        self.redis = (
            redis.Redis.from_url(redis_url, **redis_options(redis_url)) if redis_url else None
        )
        self._lock = threading.Lock()
        self._local_leases: dict[tuple[str, str], dict[str, float]] = {}
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
        return self._acquire("cost-holds", user, limit, seconds)

    def release_hold(self, user: str, hold: str) -> None:
        self._release("cost-holds", user, hold)

    def _acquire(
        self, kind: str, user: str, limit: int, seconds: float | None = None
    ) -> str | None:
        if limit <= 0:
            return "unlimited"
        seconds = seconds or self.lease_seconds
        lease = secrets.token_hex(8)
        client = self._redis()
        if client is not None:
            try:
                got = client.eval(_ACQUIRE, 1, _leases_key(kind, user), limit, seconds, lease)
                return f"r:{lease}" if got else None
            except redis.RedisError as exc:
                self._failed(exc)
        now = time.monotonic()
        with self._lock:
            leases = self._local_leases.setdefault((kind, user), {})
            for key in [k for k, expiry in leases.items() if expiry <= now]:
                del leases[key]
            if len(leases) >= limit:
                return None
            leases[lease] = now + seconds
        return f"l:{lease}"

    def _renew(self, kind: str, user: str, lease: str) -> None:
        flavour, _, lease_id = lease.partition(":")
        if flavour == "r":
            client = self._redis()
            if client is not None:
                try:
                    client.eval(_RENEW, 1, _leases_key(kind, user), self.lease_seconds, lease_id)
                except redis.RedisError as exc:
                    self._failed(exc)
        elif flavour == "l":
            with self._lock:
                leases = self._local_leases.get((kind, user), {})
                if lease_id in leases:
                    leases[lease_id] = time.monotonic() + self.lease_seconds

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
