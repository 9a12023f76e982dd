"""`/api/chat`: validate the question, call Dify as the session's user, relay the answer.

Everything the proxy can check is checked here, before Dify is called, so that a bad request
costs no tokens and gets an error a front-end developer can act on.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import greenlet
import requests
from flask import Blueprint, Response, current_app, g, request

from . import jsontext, metrics
from .answers import Answers, parse_event_id
from .auth import require_session
from .dify import Dify, unreadable_answer
from .errors import ApiError
from .limits import over_limit, per_user
from .quotas import Quotas
from .relay import ServerRestarting, StreamStats, draining, relay, waiting_for_dify
from .resume import follow
from .validation import bad_request, own_uploads, read_json_object, refuse_head, validate_uuid

bp = Blueprint("chat", __name__, url_prefix="/api")
log = logging.getLogger(__name__)


bp.before_request(refuse_head)

MAX_MESSAGE_CHARS = 32_000
RESPONSE_MODES = ("streaming", "blocking")
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
    inputs = body.get("inputs", {})
    if not isinstance(inputs, dict):
        raise bad_request("inputs must be a JSON object.")
    files = body.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise bad_request("files must be a list of file objects.")
    mode = body.get("response_mode", "streaming")
    if mode not in RESPONSE_MODES:
        raise bad_request("response_mode must be 'streaming' or 'blocking'.")
    payload: dict[str, Any] = {
        "query": message,
        "inputs": inputs,
        "user": user,
        "response_mode": mode,
    }
    conversation_id = body.get("conversation_id")
    if conversation_id not in (None, ""):
        payload["conversation_id"] = validate_uuid(conversation_id, "conversation_id")
    own_uploads(files, inputs, user)
    if files:
        payload["files"] = files
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
    """Call Dify within the user's limits and relay what it says."""
    settings = current_app.config["SETTINGS"]
    quotas: Quotas = current_app.extensions["dify_proxy.quotas"]
    dify: Dify = current_app.extensions["dify_proxy.dify"]
    user = g.user_id
    if draining():
        metrics.DRAIN.labels("refused").inc()
        raise _restarting()
    if quotas.over_budget(user):
        raise over_limit(
            "tokens",
            "token_budget_exceeded",
            "Today's token budget is used up; it renews at 00:00 UTC.",
            retry_after=str(_seconds_to_midnight_utc()),
        )
    lease = quotas.acquire_stream(user)
    if lease is None:
        raise over_limit(
            "streams",
            "too_many_streams",
            f"At most {settings.max_streams_per_user} answers at a time; "
            "wait for one to finish or stop it.",
        )
    streaming = payload["response_mode"] == "streaming"
    done_waiting = waiting_for_dify(greenlet.getcurrent())
    try:
        upstream = dify.chat(payload, stream=streaming)
    except ServerRestarting:
        quotas.release_stream(user, lease)
        raise _restarting() from None
    except BaseException:
        quotas.release_stream(user, lease)
        raise
    finally:
        done_waiting()
    if not streaming or not _is_event_stream(upstream):
        with upstream:
            quotas.release_stream(user, lease)
            try:
                body = json.loads(upstream.content)
            except ValueError:
                raise unreadable_answer() from None
            _count_tokens(quotas, user, (body.get("metadata") or {}).get("usage"))
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
        stop=functools.partial(dify.stop, user=user, request_id=g.get("request_id")),
        stats=stats,
        ids=wants_ids(),
        recorder=answers.record(stats.stream_id.decode(), user),
        grace=settings.resume_grace,
        on_tick=renew_lease,
        on_end=finish,
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
    used to get: the client stops, and nothing tells it whether the id exists.
    """
    settings = current_app.config["SETTINGS"]
    answers: Answers = current_app.extensions["dify_proxy.answers"]
    parsed = parse_event_id(event_id)
    source = answers.find(parsed[0], g.user_id) if parsed else None
    if parsed is None or source is None:
        return Response(status=204)
    stream_id, after = parsed
    stats = g.stream_stats = StreamStats(started=g.started, stream_id=stream_id.encode())
    body = follow(
        source,
        stream_id,
        after,
        heartbeat_interval=settings.heartbeat_interval,
        give_up_after=settings.dify_read_timeout + 2 * settings.heartbeat_interval,
        stats=stats,
        mark_seen=functools.partial(answers.mark_seen, stream_id),
    )
    if body is None:
        return Response(status=204)
    metrics.RESUMES.inc()
    metrics.REPLAYED_EVENTS.inc(stats.replayed or 0)
    log.info(
        "answer resumed",
        extra={"fields": {"stream": stream_id, "after": after, "replayed": stats.replayed}},
    )
    return Response(
        body,
        status=200,
        content_type="text/event-stream; charset=utf-8",
        headers=STREAM_HEADERS,
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
