"""Configuration, read once from the environment (and `.env`) and validated at start-up.

A deploy with a typo in a variable should fail at boot with one line naming the variable,
not at 2 a.m. on the first request. Everything else reads the frozen `Settings`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from dotenv import load_dotenv

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The grammar of the `limits` package, checked here without importing it: the master process
# must not import anything that loads `ssl` before gevent patches it.
# The values `.env.example` ships with: a copied example must not start a server that accepts
# tokens signed with a published "secret" (tests/unit/test_settings.py keeps these in step).
PLACEHOLDERS = {
    "DIFY_API_KEY": "app-your-dify-app-key",
    "SUPABASE_JWT_SECRET": "your-supabase-legacy-jwt-secret",
    "SUPABASE_URL": "https://your-project-ref.supabase.co",
}
# HS256 with a shorter key is guessable offline from one token (RFC 7518 3.2 asks for at least
# 256 bits); Supabase's generated secrets are 40 characters or more.
MIN_JWT_SECRET_BYTES = 32
_RATE_ITEM = re.compile(r"\s*\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day|month|year)s?\s*")


class ConfigError(Exception):
    """A missing or malformed variable; the message names it and never echoes a secret."""


@dataclass(frozen=True)
class Settings:
    dify_api_key: str
    dify_api_url: str = "https://api.dify.ai/v1"
    supabase_jwt_secret: str | None = None
    supabase_url: str | None = None
    supabase_jwt_audience: str = "authenticated"
    dify_connect_timeout: float = 5.0
    dify_read_timeout: float = 25.0
    heartbeat_interval: float = 15.0
    log_level: str = "INFO"
    cors_origins: tuple[str, ...] = ()
    supabase_auth_cookie: str | None = None
    enable_demo: bool = False
    dev_tokens: bool = False
    app_info_ttl: float = 60.0
    max_upload_bytes: int = 15 * 1024 * 1024
    rate_limit: str | None = "20/minute"
    redis_url: str | None = None
    max_streams_per_user: int = 3
    stream_lease_seconds: float = 60.0
    daily_token_budget: int = 0
    metrics_token: str | None = None
    resume_window: float = 300.0
    resume_max_bytes: int = 4 * 1024 * 1024
    resume_grace: float = 20.0
    resume_spool_dir: str | None = None
    ownership_ttl: float = 7 * 86400.0

    def __repr__(self) -> str:  # keeps the key and the secret out of any accidental log line
        return f"Settings(dify_api_url={self.dify_api_url!r}, supabase_url={self.supabase_url!r})"

    @property
    def jwks_url(self) -> str | None:
        return f"{self.supabase_url}/auth/v1/.well-known/jwks.json" if self.supabase_url else None

    @property
    def jwt_issuer(self) -> str | None:
        return f"{self.supabase_url}/auth/v1" if self.supabase_url else None


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    if value and value == PLACEHOLDERS.get(name):
        raise ConfigError(f"{name} is still the example's placeholder; set your own value")
    return value or None


def _jwt_secret(env: Mapping[str, str]) -> str | None:
    secret = _text(env, "SUPABASE_JWT_SECRET")
    if secret is not None and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise ConfigError(
            f"SUPABASE_JWT_SECRET is too short (under {MIN_JWT_SECRET_BYTES} bytes); use the "
            "project's JWT secret from Supabase > Project Settings > JWT Keys"
        )
    return secret


def _url(
    env: Mapping[str, str], name: str, example: str, default: str | None = None, path: bool = True
) -> str | None:
    """Messages never repeat the value: a key pasted into the wrong variable stays secret."""
    value = _text(env, name) or default
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL such as {example}")
    if not path and parts.path.strip("/"):
        raise ConfigError(f"{name} must be the project URL without a path, such as {example}")
    return value.rstrip("/")


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name} must be a whole number, 0 or more")
    return int(raw)


def _rate_limit(env: Mapping[str, str]) -> str | None:
    raw = _text(env, "RATE_LIMIT")
    if raw is None:
        return Settings.rate_limit
    if raw.lower() in ("off", "0", "none"):
        return None
    if not all(_RATE_ITEM.fullmatch(item) for item in raw.split(";")):
        raise ConfigError("RATE_LIMIT must look like 20/minute;300/day, or be off")
    return raw


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (_text(env, name) or "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"{name} must be 1 or 0")
    return raw in ("1", "true", "yes")


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Exact origins (scheme://host[:port]); a typo here would silently refuse a front end."""
    origins = []
    for item in (_text(env, name) or "").split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ConfigError(
                f"{name} must list origins like https://app.example.com, comma-separated"
            )
        origins.append(origin)
    return tuple(origins)


def _auth_cookie(env: Mapping[str, str], supabase_url: str | None) -> str | None:
    """`@supabase/ssr`'s default cookie name, `sb-<project-ref>-auth-token`."""
    name = _text(env, "SUPABASE_AUTH_COOKIE")
    if name:
        return name
    if supabase_url:
        return f"sb-{urlsplit(supabase_url).hostname.split('.')[0]}-auth-token"
    return None


def _seconds(env: Mapping[str, str], name: str, default: float, zero_ok: bool = False) -> float:
    """A positive number of seconds; with `zero_ok`, 0 too (it turns a cache off)."""
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, such as 15 or 0.5") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        kind = "zero or a positive" if zero_ok else "a positive"
        raise ConfigError(f"{name} must be {kind} number of seconds, such as 15 or 0.5")
    return value


def _byte_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name} must be a positive whole number of bytes, such as 15728640")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from `environ` (default: `os.environ` after loading `.env`).

    Real environment variables win over `.env`, as on Heroku, where `.env` is absent.
    """
    if environ is None:
        load_dotenv(override=False)
        environ = os.environ
    env = environ

    api_key = _text(env, "DIFY_API_KEY")
    if api_key is None:
        raise ConfigError("DIFY_API_KEY is required (the Dify app's API key, app-...)")

    secret = _jwt_secret(env)
    supabase_url = _url(env, "SUPABASE_URL", "https://<project-ref>.supabase.co", path=False)
    if secret is None and supabase_url is None:
        raise ConfigError(
            "SUPABASE_JWT_SECRET or SUPABASE_URL is required to verify Supabase sessions"
        )

    log_level = (_text(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")

    dify_api_url = _url(env, "DIFY_API_URL", "https://api.dify.ai/v1", Settings.dify_api_url)
    dev_tokens = _flag(env, "DEV_TOKENS")
    if dev_tokens and urlsplit(dify_api_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("DEV_TOKENS is only for the local Dify stand-in; unset it")

    return Settings(
        dify_api_key=api_key,
        dify_api_url=dify_api_url,
        supabase_jwt_secret=secret,
        supabase_url=supabase_url,
        supabase_jwt_audience=_text(env, "SUPABASE_JWT_AUDIENCE") or "authenticated",
        dify_connect_timeout=_seconds(env, "DIFY_CONNECT_TIMEOUT", Settings.dify_connect_timeout),
        dify_read_timeout=_seconds(env, "DIFY_READ_TIMEOUT", Settings.dify_read_timeout),
        heartbeat_interval=_seconds(env, "HEARTBEAT_INTERVAL", Settings.heartbeat_interval),
        log_level=log_level,
        cors_origins=_origins(env, "CORS_ORIGINS"),
        supabase_auth_cookie=_auth_cookie(env, supabase_url),
        enable_demo=_flag(env, "ENABLE_DEMO"),
        dev_tokens=dev_tokens,
        app_info_ttl=_seconds(env, "APP_INFO_TTL", Settings.app_info_ttl, zero_ok=True),
        max_upload_bytes=_byte_count(env, "MAX_UPLOAD_BYTES", Settings.max_upload_bytes),
        rate_limit=_rate_limit(env),
        redis_url=_redis_url(env),
        max_streams_per_user=_count(env, "MAX_STREAMS_PER_USER", Settings.max_streams_per_user),
        stream_lease_seconds=_seconds(env, "STREAM_LEASE_SECONDS", Settings.stream_lease_seconds),
        daily_token_budget=_count(env, "DAILY_TOKEN_BUDGET", 0),
        metrics_token=_text(env, "METRICS_TOKEN"),
        resume_window=_seconds(env, "RESUME_WINDOW", Settings.resume_window),
        resume_max_bytes=_byte_count(env, "RESUME_MAX_BYTES", Settings.resume_max_bytes),
        resume_grace=_seconds(env, "RESUME_GRACE", Settings.resume_grace, zero_ok=True),
        resume_spool_dir=_text(env, "RESUME_SPOOL_DIR"),
        ownership_ttl=_seconds(env, "OWNERSHIP_TTL", Settings.ownership_ttl),
    )


def _redis_url(env: Mapping[str, str]) -> str | None:
    value = _text(env, "REDIS_URL")
    if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("REDIS_URL must be a redis://, rediss:// or unix:// URL")
    return value
