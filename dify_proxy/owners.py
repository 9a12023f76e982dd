"""Who may touch a run: every id Dify hands a user is bound to that user's `sub` as it passes.

Dify checks no end user on a chat stop of a paused run, on workflow stop, on run detail or on
the human-input form calls (see ../shared/dify-protocol.md, "Human input"): whoever holds a task
id, a workflow run id or a form token acts on it. So the proxy notes, for each such id that a
stream or response carries, whose it is, and refuses every other user before Dify is called.

A binding must be known to every worker and instance, since the next call may land anywhere:
- a file per id under `<spool_dir>/bindings/` serves every worker of one instance (always
  written; what a lookup falls back on when Redis fails). The file's mtime is its expiry, so
  the sweep deletes by `stat` alone;
- with `REDIS_URL`, a key per id (`dify-proxy:owner:<kind>:<hash>`, SET with EX) serves every
  instance.

Ids are stored hashed (SHA-256): a form token is a bearer credential for its form, and neither
the spool nor Redis should hand one out to whoever reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

KINDS = ("task", "run", "form", "file")
REDIS_PREFIX = "dify-proxy:owner:"
SWEEP_EVERY_SECONDS = 60.0
DEFAULT_TTL_SECONDS = 7 * 86400.0
# A binding is written again only when this much longer a life is wanted: a form's expiry a
# few seconds later than the one already written costs no new write.
REBIND_SLACK_SECONDS = 60.0


@dataclass(frozen=True)
class Binding:
    user: str
    extra: str = ""  # for a form token: its workflow run id


@dataclass(frozen=True)
class Found:
    """One id found in Dify's answer: what it is, and until when it can be used (if it says)."""

    kind: str
    value: str
    expires_at: float | None = None
    extra: str = ""


class Owners:
    def __init__(
        self,
        spool_dir: str,
        default_ttl: float = DEFAULT_TTL_SECONDS,
        redis_client: redis.Redis | None = None,
        on_redis_error: Callable[[Exception], None] = lambda exc: None,
        redis_usable: Callable[[], bool] = lambda: True,
    ) -> None:
        self.dir = os.path.join(spool_dir, "bindings")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.default_ttl = default_ttl
        self.redis = redis_client
        self._on_redis_error = on_redis_error
        self._redis_usable = redis_usable
        self._swept_at = 0.0
        self._sweep_lock = threading.Lock()

    # -- writing ---------------------------------------------------------------------------

    def bind(
        self, kind: str, value: str, user: str, ttl: float | None = None, extra: str = ""
    ) -> None:
        """`value` (of `kind`, one of KINDS) is `user`'s for `ttl` seconds (default: the
        configured OWNERSHIP_TTL)."""
        expires_at = time.time() + (self.default_ttl if ttl is None else ttl)
        self.bind_many([(Found(kind, value, extra=extra), expires_at)], user)

    def bind_many(self, bindings: Iterable[tuple[Found, float]], user: str) -> None:
        """Bind several ids at once: one file each, and one Redis round trip for all."""
        bindings = list(bindings)
        if not bindings:
            return
        self._sweep()
        now = time.time()
        stored = {}
        for found, expires_at in bindings:
            _check_kind(found.kind)
            data = json.dumps([user, found.extra]).encode()
            name = _hashed(found.kind, found.value)
            stored[name] = (data, max(1, int(expires_at - now + 0.999)))
            self._write_file(name, data, expires_at)
        if self.redis is None or not self._redis_usable():
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for name, (data, ttl) in stored.items():
                pipe.set(REDIS_PREFIX + name, data, ex=ttl)
            pipe.execute()
        except redis.RedisError as exc:
            self._on_redis_error(exc)

    def _write_file(self, name: str, data: bytes, expires_at: float) -> None:
        path = os.path.join(self.dir, name)
        temporary = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.utime(temporary, (expires_at, expires_at))
            os.replace(temporary, path)  # a reader sees the old binding or the new, whole
        except OSError as exc:
            log.warning("owner binding write failed: %s", type(exc).__name__)
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def binder(self, user: str) -> Binder:
        """What an answer's relay calls with each event it parses (see `Binder`)."""
        return Binder(self, user)

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, kind: str, value: str) -> Binding | None:
        """The binding of `value`, or None: never bound, or expired."""
        _check_kind(kind)
        name = _hashed(kind, value)
        binding = self._read_file(name)
        if binding is None and self.redis is not None and self._redis_usable():
            try:
                binding = _parse(self.redis.get(REDIS_PREFIX + name))
            except redis.RedisError as exc:
                self._on_redis_error(exc)
        return binding

    def owner_of(self, kind: str, value: str) -> str | None:
        binding = self.lookup(kind, value)
        return binding.user if binding else None

    def owned(self, kind: str, value: str, user: str) -> Binding | None:
        """`value`'s binding if it is `user`'s, else None.

        Someone else's id and an unknown one take the same path (the local file, then Redis),
        so neither the answer nor its timing says whether the id exists.
        """
        _check_kind(kind)
        name = _hashed(kind, value)
        binding = self._read_file(name)
        if binding is not None and binding.user == user:
            return binding
        binding = None
        if self.redis is not None and self._redis_usable():
            try:
                binding = _parse(self.redis.get(REDIS_PREFIX + name))
            except redis.RedisError as exc:
                self._on_redis_error(exc)
        return binding if binding is not None and binding.user == user else None

    def _read_file(self, name: str) -> Binding | None:
        path = os.path.join(self.dir, name)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_mtime < time.time():
                    return None
                return _parse(f.read())
        except OSError:
            return None

    def _sweep(self) -> None:
        """Delete expired binding files, at most once a minute per process (the answers'
        sweep leaves subdirectories alone)."""
        now = time.time()
        if now - self._swept_at < SWEEP_EVERY_SECONDS or not self._sweep_lock.acquire(False):
            return
        try:
            self._swept_at = now
            with contextlib.suppress(OSError):
                for entry in os.scandir(self.dir):
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime < now:
                            os.unlink(entry.path)
        finally:
            self._sweep_lock.release()


class Binder:
    """Binds the ids one answer carries, each once, before the event that carries it is sent.

    The relay calls it only with the events it parses anyway (the first, and the few that end
    or pause a run), so binding costs no parse and no Redis round trip per event: one write for
    the answer's task and run ids, one more for each form. A form's run and task must stay
    usable as long as the form can be answered, so a form expiring later than the default
    extends their bindings too.
    """

    def __init__(self, owners: Owners, user: str) -> None:
        self.owners = owners
        self.user = user
        self._bound: dict[tuple[str, str], float] = {}  # what was written, and its expiry

    def __call__(self, data: Any) -> None:
        found = ids_in(data)
        if not found:
            return
        default = time.time() + self.owners.default_ttl
        until = max([default, *(f.expires_at for f in found if f.expires_at)])
        if until > default:  # a form that outlives the default: so must the run it belongs to
            found += [
                Found(kind, value)
                for kind, value in self._bound
                if kind in ("task", "run") and all(f.value != value for f in found)
            ]
        new = []
        for f in found:
            expires_at = max(until if f.kind != "form" else default, f.expires_at or 0)
            if self._bound.get((f.kind, f.value), 0) < expires_at - REBIND_SLACK_SECONDS:
                self._bound[(f.kind, f.value)] = expires_at
                new.append((f, expires_at))
        self.owners.bind_many(new, self.user)


def ids_in(data: Any) -> list[Found]:
    """The ids in one of Dify's events or blocking answers that a user may later act on: its
    task id and workflow run id, and the token of each form it asks for (a
    `human_input_required` event's, or those in a pause's `reasons`)."""
    if not isinstance(data, dict):
        return []
    found = []
    task_id = data.get("task_id")
    if _is_id(task_id):
        found.append(Found("task", task_id))
    inner = data.get("data")
    inner = inner if isinstance(inner, dict) else {}
    run_id = data.get("workflow_run_id") or inner.get("workflow_run_id")
    if not _is_id(run_id):
        run_id = ""
    if run_id:
        found.append(Found("run", run_id))
    forms = [inner]
    reasons = inner.get("reasons")
    if isinstance(reasons, list):
        forms += [reason for reason in reasons if isinstance(reason, dict)]
    tokens = set()
    for form in forms:
        token = form.get("form_token")
        if _is_id(token) and token not in tokens:
            tokens.add(token)
            expiry = form.get("expiration_time")
            expires_at = float(expiry) if isinstance(expiry, (int, float)) else None
            found.append(Found("form", token, expires_at, run_id))
    return found


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 255


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of id: {kind!r}")


def _hashed(kind: str, value: str) -> str:
    return f"{kind}-" + hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


def _parse(data: bytes | None) -> Binding | None:
    if not data:
        return None
    try:
        user, extra = json.loads(data)
    except ValueError:
        return None
    return Binding(user, extra) if isinstance(user, str) and isinstance(extra, str) else None
