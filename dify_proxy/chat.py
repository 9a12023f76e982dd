"""`/api/chat`: validate the question, call Dify as the session's user, relay the answer.

Everything the proxy can check is checked here, before Dify is called, so that a bad request
costs no tokens and gets an error a front-end developer can act on.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import greenlet
import requests
from flask import Blueprint, Response, current_app, g, request

from . import jsontext, metrics
from .answers import Answers
from .auth import require_session
from .dify import Dify, unreadable_answer
from .errors import ApiError
from .eventids import parse_event_id
from .limits import SLOT_RETRY_SECONDS, in_words, over_limit, per_user, user_limit
from .modes import CHAT_MODES, app_mode, known_mode, mismatch
from .owners import Owners
from .quotas import Quotas
from .relay import ServerRestarting, StreamStats, draining, relay, waiting_for_dify
from .resume import follow
from .usage import book
from .validation import (
    answer_body,
    bad_request,
    read_json_object,
    refuse_head,
    validate_uuid,
)

bp = Blueprint("chat", __name__, url_prefix="/api")
log = logging.getLogger(__name__)


bp.before_request(refuse_head)

MAX_MESSAGE_CHARS = 32_000
STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


def chat_payload(body: dict[str, Any], user: str) -> dict[str, Any]:
    """Dify's request for this body; `user` always comes from the session, never the body."""
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise bad_request("message is required and must be a non-blank string.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise bad_request(f"message must be at most {MAX_MESSAGE_CHARS} characters.")
    payload = {"query": message, **answer_body(body, user)}
    conversation_id = body.get("conversation_id")
    if conversation_id not in (None, ""):
        payload["conversation_id"] = validate_uuid(conversation_id, "conversation_id")
    return payload


def query_body() -> dict[str, Any]:
    """EventSource can only GET, so its question comes in the query string."""
    body: dict[str, Any] = {
        "message": request.args.get("message"),
        "conversation_id": request.args.get("conversation_id"),
    }
    if "inputs" in request.args:
        try:
            body["inputs"] = jsontext.loads(request.args["inputs"])
        except ValueError as exc:
            raise bad_request(
                f"inputs must be a JSON object string, such as {{}}; this one is not: {exc}."
            ) from None
    return body


def is_reconnect() -> bool:
    """EventSource clients reconnect on their own and send back the last event id they saw;
    answering such a request would make Dify answer, and bill, the same question twice. It
    resumes the answer instead (or gets a 204), and is no new question for the limits."""
    return bool(last_event_id())


def last_event_id() -> str:
    """An empty one counts as none, as in the SSE spec (EventSource sends none until it has
    seen an id)."""
    return (request.headers.get("Last-Event-ID") or request.args.get("lastEventId") or "").strip()


def wants_ids() -> bool:
    """Whether this client uses SSE event ids: EventSource (which can only GET) always does, and
    a POST does when it says it speaks SSE with `Accept: text/event-stream`, which
    fetch-event-source sends by default. Everyone else gets exactly Dify's framing: code written
    for Dify (its web template, its SDKs) reads no `id:` line and sends no `Accept` of that kind.
    """
    if request.method == "GET":
        return True
    return any(
        value.lower() == "text/event-stream" and quality > 0
        for value, quality in request.accept_mimetypes
    )


@bp.post("/chat")
@require_session
@per_user(exempt_when=is_reconnect)
def chat() -> Response:
    if is_reconnect():
        return resume(last_event_id())
    return answer(chat_payload(read_json_object(), g.user_id))


@bp.get("/chat")
@require_session
@per_user(exempt_when=is_reconnect)
def chat_from_query() -> Response:
    if is_reconnect():
        return resume(last_event_id())
    return answer(chat_payload(query_body(), g.user_id))


def answer(payload: dict[str, Any]) -> Response:
    """Ask Dify the question within the user's limits and relay what it says."""
    dify: Dify = current_app.extensions["dify_proxy.dify"]
    mode = known_mode()
    if mode is not None and mode not in CHAT_MODES:
        raise mismatch(mode)
    try:
        return run_answer(
            functools.partial(dify.chat, payload),
            streaming=payload["response_mode"] == "streaming",
        )
    except ApiError as exc:
        if exc.code == "not_chat_app":  # Dify's own "wrong route": say which app it is
            try:
                mode = app_mode()
            except ApiError:  # /info failed too: Dify's own error stands
                mode = None
            if mode is not None and mode not in CHAT_MODES:
                raise mismatch(mode) from None
        raise


def run_answer(
    call: Callable[..., requests.Response],
    *,
    streaming: bool,
    app: str = "chat",
    budget: bool = True,
    follow_run: bool = False,
) -> Response:
    """Any answer of Dify's, to any route: `call(stream=...)` makes the upstream call, and this
    wraps it in the user's limits (the daily budget when `budget`, a stream lease), relays it
    (heartbeats, grace, stop-on-disconnect through `app`'s stop call, recording for resumes),
    binds the ids it hands out to the user, and counts its tokens. With `follow_run` (an
    already running run followed), a client that leaves before anything but pings came hangs
    up without waiting to stop it: a paused run must stay paused."""
    settings = current_app.config["SETTINGS"]
    quotas: Quotas = current_app.extensions["dify_proxy.quotas"]
    dify: Dify = current_app.extensions["dify_proxy.dify"]
    owners: Owners = current_app.extensions["dify_proxy.owners"]
    user = g.user_id
    if draining():
        metrics.DRAIN.labels("refused").inc()
        raise _restarting()
    daily = user_limit("daily_token_budget") if budget else 0
    if daily and quotas.over_budget(user, daily):
        seconds = _seconds_to_midnight_utc()
        raise over_limit(
            "tokens",
            "token_budget_exceeded",
            "Daily token budget reached",
            f"{daily} tokens a day",
            f"it renews at 00:00 UTC, in {in_words(seconds)}",
            seconds,
        )
    # The usage ledger's row (its app: chat, workflow or completion, as the route), and the
    # money budgets (a 429 when used up).
    entry = book(user, app_mode=app)
    max_streams = user_limit("max_streams_per_user")
    lease = quotas.acquire_stream(user, max_streams)
    if lease is None:
        entry.cancel()
        raise over_limit(
            "streams",
            "too_many_streams",
            "Answer limit reached",
            f"{max_streams} at a time",
            "a slot frees when one of your answers ends (or you stop one)",
            SLOT_RETRY_SECONDS,
        )
    done_waiting = waiting_for_dify(greenlet.getcurrent())
    try:
        upstream = call(stream=streaming)
    except ServerRestarting:
        quotas.release_stream(user, lease)
        entry.cancel()
        raise _restarting() from None
    except BaseException:
        quotas.release_stream(user, lease)
        entry.cancel()
        raise
    finally:
        done_waiting()
    if not streaming or not _is_event_stream(upstream):
        with upstream:
            quotas.release_stream(user, lease)
            try:
                body = json.loads(upstream.content)
            except ValueError:
                entry.answered(uuid.uuid4().hex, None, "upstream_error")
                raise unreadable_answer() from None
            owners.binder(user)(body)
            paused = isinstance(body, dict) and body.get("event") == "workflow_paused"
            entry.answered(uuid.uuid4().hex, body, "paused" if paused else "completed")
            _count_tokens(quotas, user, usage_of(body))
            return Response(upstream.content, status=200, content_type="application/json")

    renew_every = settings.stream_lease_seconds / 3
    renewed_at = time.monotonic()

    def renew_lease() -> None:
        nonlocal renewed_at
        if time.monotonic() - renewed_at >= renew_every:
            renewed_at = time.monotonic()
            quotas.renew_stream(user, lease)

    def finish(stats: StreamStats) -> None:
        quotas.release_stream(user, lease)
        entry.streamed(stats)
        _count_tokens(quotas, user, stats.usage)
        metrics.OPEN_STREAMS.dec()
        metrics.STREAM_ENDS.labels(stats.end).inc()
        metrics.STREAM_DURATION.observe(time.perf_counter() - stats.started)
        if stats.first_event is not None:
            metrics.TIME_TO_FIRST_BYTE.observe(stats.first_event - stats.started)
        if stats.end in ("upstream_dropped", "timeout", "upstream_error"):
            metrics.UPSTREAM_ERRORS.labels(f"stream_{stats.end}").inc()
        if stats.answer_end == "abandoned":
            metrics.ANSWERS_ABANDONED.inc()
            log.info("answer abandoned", extra={"fields": {"stream": stats.stream_id.decode()}})

    stats = g.stream_stats = StreamStats(started=g.started)
    answers: Answers = current_app.extensions["dify_proxy.answers"]
    metrics.OPEN_STREAMS.inc()
    body = relay(
        upstream,
        heartbeat_interval=settings.heartbeat_interval,
        stop=functools.partial(dify.stop, user=user, request_id=g.get("request_id"), app=app),
        stats=stats,
        ids=wants_ids(),
        recorder=answers.record(stats.stream_id.decode(), user),
        grace=settings.resume_grace,
        on_tick=renew_lease,
        on_end=finish,
        bind=owners.binder(user),
        await_task_id=not follow_run,
    )
    return Response(
        body,
        status=200,
        content_type="text/event-stream; charset=utf-8",
        headers=STREAM_HEADERS,
    )


def resume(event_id: str) -> Response:
    """Replay an answer after `event_id`, then follow it live, then end it as it ended.

    An unknown, expired, too long or someone else's answer gets the same 204 a finished one
    used to get: the client stops, and nothing tells it whether the id exists. A resume takes
    one of the user's MAX_RESUMES_PER_USER slots while it streams, and replaces the user's
    earlier resumes of the same answer.
    """
    settings = current_app.config["SETTINGS"]
    answers: Answers = current_app.extensions["dify_proxy.answers"]
    quotas: Quotas = current_app.extensions["dify_proxy.quotas"]
    user = g.user_id
    parsed = parse_event_id(event_id)
    source = answers.find(parsed[0], user) if parsed else None
    if parsed is None or source is None:
        return Response(status=204)
    stream_id, after = parsed
    stats = g.stream_stats = StreamStats(started=g.started, stream_id=stream_id.encode())
    lease = ""
    body = follow(
        source,
        stream_id,
        after,
        heartbeat_interval=settings.heartbeat_interval,
        give_up_after=settings.dify_read_timeout + 2 * settings.heartbeat_interval,
        stats=stats,
        mark_seen=functools.partial(answers.mark_seen, stream_id),
        still_wanted=lambda: quotas.renew_resume(user, lease),  # the lease taken below
        on_end=lambda stats: resumed(stream_id, after, stats),
    )
    if body is None:
        return Response(status=204)
    taken = quotas.acquire_resume(user, stream_id)  # only for a resume that streams
    if taken is None:
        source.close()
        raise over_limit(
            "resumes",
            "too_many_resumes",
            "Resumed answer limit reached",
            f"{settings.max_resumes_per_user} at a time",
            "a slot frees when you close one, or when one finishes",
            SLOT_RETRY_SECONDS,
        )
    lease = taken
    current_app.extensions["dify_proxy.ledger"].resumed(stream_id)
    metrics.RESUMES.inc()

    def finished() -> None:  # also when the stream never started
        source.close()
        quotas.release_resume(user, lease)

    response = Response(
        body,
        status=200,
        content_type="text/event-stream; charset=utf-8",
        headers=STREAM_HEADERS,
    )
    response.call_on_close(finished)
    return response


def resumed(stream_id: str, after: int, stats: StreamStats) -> None:
    metrics.REPLAYED_EVENTS.inc(stats.replayed or 0)
    log.info(
        "answer resumed",
        extra={"fields": {"stream": stream_id, "after": after, "replayed": stats.replayed}},
    )


def _restarting() -> ApiError:
    """A new question on a worker that is stopping: a clear 503 before any streaming, which
    the client (or the router) retries on an instance that stays."""
    return ApiError(
        503,
        "server_restarting",
        "The server is restarting; ask again in a moment.",
        {"Retry-After": "1"},
    )


def usage_of(body: Any) -> Any:
    """A blocking answer's usage: a chat or completion app's `metadata.usage`, or a workflow
    run's `data.total_tokens`."""
    if not isinstance(body, dict):
        return None
    metadata, run = body.get("metadata"), body.get("data")
    if isinstance(metadata, dict) and isinstance(metadata.get("usage"), dict):
        return metadata["usage"]
    if isinstance(run, dict) and isinstance(run.get("total_tokens"), int):
        return {"total_tokens": run["total_tokens"]}
    return None


def _count_tokens(quotas: Quotas, user: str, usage: Any) -> None:
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, int) and tokens > 0:
        metrics.TOKENS.inc(tokens)
        quotas.add_tokens(user, tokens)


def _seconds_to_midnight_utc() -> int:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()))


def _is_event_stream(upstream: requests.Response) -> bool:
    return upstream.headers.get("Content-Type", "").startswith("text/event-stream")
