"""/api/chat within the user's limits: stream slots taken and always given back, token budgets
counted from Dify's usage reports, and the 429s that say when to try again."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from datetime import UTC, datetime

import pytest
import requests
from prometheus_client import REGISTRY

from dify_proxy import chat, create_app
from tests.conftest import DIFY_URL
from tests.support import tokens
from tests.support.messages import is_a_sentence

CHAT = f"{DIFY_URL}/chat-messages"
USAGE_7 = {"usage": {"total_tokens": 7}}
STREAM = (
    b'data: {"event":"message","task_id":"t","conversation_id":"c","message_id":"m",'
    b'"answer":"Hi"}\n\n'
    b'data: {"event":"message_end","task_id":"t","conversation_id":"c","message_id":"m",'
    b'"metadata":{"usage":{"total_tokens":7}}}\n\n'
)
EVENT_STREAM = {"Content-Type": "text/event-stream; charset=utf-8"}


@pytest.fixture
def settings(settings):
    return dataclasses.replace(
        settings, rate_limit=None, max_streams_per_user=1, daily_token_budget=10
    )


@pytest.fixture
def quotas(app):
    return app.extensions["dify_proxy.quotas"]


def ask(client, auth, mode="streaming"):
    response = client.post("/api/chat", json={"message": "hi", "response_mode": mode}, headers=auth)
    response.get_data()  # read the whole stream, as a client does
    response.close()
    return response


def test_a_finished_stream_gives_its_slot_back(client, auth, requests_mock):
    requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    assert ask(client, auth).status_code == 200
    assert ask(client, auth).status_code == 200


def test_a_blocking_answer_gives_its_slot_back(client, auth, requests_mock):
    requests_mock.post(CHAT, json={"answer": "Hi", "metadata": {}})
    assert ask(client, auth, "blocking").status_code == 200
    assert ask(client, auth, "blocking").status_code == 200


@pytest.mark.parametrize(
    "failure",
    [
        {"exc": requests.ConnectionError},
        {"status_code": 500, "json": {"code": "internal", "message": "x", "status": 500}},
        {"status_code": 200, "text": "<html>not json</html>"},
    ],
    ids=["unreachable", "5xx", "unreadable answer"],
)
def test_a_failed_dify_call_gives_the_slot_back(client, auth, requests_mock, quotas, failure):
    requests_mock.post(CHAT, **failure)
    assert ask(client, auth, "blocking").status_code >= 500
    assert quotas.acquire_stream(tokens.USER_ID) is not None


def test_an_unreadable_blocking_answer_is_a_502(client, auth, requests_mock):
    requests_mock.post(CHAT, text="<html>not json</html>")
    response = ask(client, auth, "blocking")
    assert response.status_code == 502
    assert response.json["code"] == "upstream_error"


def test_a_user_with_every_slot_taken_gets_429_and_dify_is_not_called(
    client, auth, requests_mock, quotas
):
    chat_mock = requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    quotas.acquire_stream(tokens.USER_ID)
    response = ask(client, auth)
    assert response.status_code == 429
    assert response.json["code"] == "too_many_streams"
    assert response.json["message"] == (
        "Answer limit reached: 1 at a time; a slot frees when one of your answers ends"
        " (or you stop one)."
    )
    assert response.headers["Retry-After"] == "5"
    assert chat_mock.call_count == 0


def test_stream_usage_counts_against_the_budget(client, auth, requests_mock, quotas):
    requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    ask(client, auth)
    assert quotas.tokens_used(tokens.USER_ID) == 7


def test_blocking_usage_counts_against_the_budget(client, auth, requests_mock, quotas):
    requests_mock.post(CHAT, json={"answer": "Hi", "metadata": USAGE_7})
    ask(client, auth, "blocking")
    assert quotas.tokens_used(tokens.USER_ID) == 7


@pytest.mark.parametrize("usage", [{}, {"total_tokens": "7"}, {"total_tokens": 0}, "7"])
def test_usage_that_is_not_a_positive_token_count_counts_nothing(
    client, auth, requests_mock, quotas, usage
):
    requests_mock.post(CHAT, json={"answer": "Hi", "metadata": {"usage": usage}})
    assert ask(client, auth, "blocking").status_code == 200
    assert quotas.tokens_used(tokens.USER_ID) == 0


def test_a_json_answer_to_a_streaming_request_is_passed_on_as_json(client, auth, requests_mock):
    requests_mock.post(CHAT, json={"answer": "Hi", "metadata": USAGE_7})
    response = ask(client, auth, "streaming")
    assert response.status_code == 200
    assert response.json == {"answer": "Hi", "metadata": USAGE_7}


def test_a_user_over_the_budget_gets_429_until_utc_midnight(
    client, auth, requests_mock, quotas, monkeypatch
):
    chat_mock = requests_mock.post(CHAT, json={"answer": "Hi"})
    quotas.add_tokens(tokens.USER_ID, 10)
    response = ask(client, auth, "blocking")
    assert response.status_code == 429
    assert response.json["code"] == "token_budget_exceeded"
    assert re.fullmatch(r"\d+", response.headers["Retry-After"])
    assert 1 <= int(response.headers["Retry-After"]) <= 86400
    assert chat_mock.call_count == 0


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (datetime(2026, 3, 1, 23, 59, 0, tzinfo=UTC), 60),
        (datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC), 86400),
        (datetime(2026, 3, 1, 23, 59, 59, 900000, tzinfo=UTC), 1),
        (datetime(2026, 3, 1, 0, 0, 0, 500000, tzinfo=UTC), 86399),
    ],
)
def test_seconds_to_midnight_are_counted_in_utc_and_never_zero(monkeypatch, now, seconds):
    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            assert tz is UTC
            return now

    monkeypatch.setattr(chat, "datetime", Clock)
    assert chat._seconds_to_midnight_utc() == seconds


def renewals_when_events_arrive_every(seconds, settings, auth, requests_mock, monkeypatch):
    """Relay STREAM with 60 s leases while a fake clock moves `seconds` per network read;
    return the leases renewed."""
    app = create_app(dataclasses.replace(settings, stream_lease_seconds=60))
    quotas = app.extensions["dify_proxy.quotas"]
    renewed = []
    monkeypatch.setattr(quotas, "renew_stream", lambda user, lease: renewed.append((user, lease)))
    now = [1000.0]
    monkeypatch.setattr(chat.time, "monotonic", lambda: now[0])

    def body():
        for event in STREAM.split(b"\n\n")[:-1]:
            now[0] += seconds
            yield event + b"\n\n"

    requests_mock.post(CHAT, body=_Chunks(body()), headers=EVENT_STREAM)
    response = app.test_client().post("/api/chat", json={"message": "hi"}, headers=auth)
    assert response.get_data() == STREAM
    return renewed


def test_a_long_stream_renews_its_lease_every_third_of_a_lease(
    settings, auth, requests_mock, monkeypatch
):
    """Events 21 s apart: past a third of the 60 s lease, a write renews it (once or twice, as
    the reads happen to batch)."""
    renewed = renewals_when_events_arrive_every(21, settings, auth, requests_mock, monkeypatch)
    assert len(renewed) in (1, 2)
    assert all(user == tokens.USER_ID and isinstance(lease, str) for user, lease in renewed)


def test_a_stream_shorter_than_a_third_of_a_lease_is_not_renewed(
    settings, auth, requests_mock, monkeypatch
):
    renewed = renewals_when_events_arrive_every(8, settings, auth, requests_mock, monkeypatch)
    assert renewed == []


class _Chunks:
    """A file-like body that hands out one piece per read, as a socket does."""

    def __init__(self, pieces):
        self._pieces = iter(pieces)

    def read(self, size=-1):
        return next(self._pieces, b"")

    read1 = read

    def close(self):
        pass


def test_the_budget_429_message_is_a_sentence(client, auth, requests_mock, quotas):
    requests_mock.post(CHAT, json={"answer": "Hi"})
    quotas.add_tokens(tokens.USER_ID, 10)
    message = ask(client, auth, "blocking").json["message"]
    assert message.endswith(".") and "00:00 UTC" in message


def test_a_streaming_request_sends_dify_streaming_mode(client, auth, requests_mock):
    chat_mock = requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    ask(client, auth)
    assert json.loads(chat_mock.last_request.body)["response_mode"] == "streaming"


# --- what operators see: metrics and the stop call ------------------------------------------


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_refusals_are_counted_by_the_limit_that_refused(client, auth, requests_mock, quotas):
    requests_mock.post(CHAT, json={"answer": "Hi"})
    streams, tokens_before = (
        sample("dify_proxy_rate_limited_total", limit="streams"),
        sample("dify_proxy_rate_limited_total", limit="tokens"),
    )
    lease = quotas.acquire_stream(tokens.USER_ID)
    ask(client, auth, "blocking")
    quotas.release_stream(tokens.USER_ID, lease)
    quotas.add_tokens(tokens.USER_ID, 10)
    ask(client, auth, "blocking")
    assert sample("dify_proxy_rate_limited_total", limit="streams") == streams + 1
    assert sample("dify_proxy_rate_limited_total", limit="tokens") == tokens_before + 1


@pytest.mark.parametrize(
    ("body", "end", "upstream_error"),
    [
        (STREAM, "completed", None),
        (STREAM.split(b"\n\n")[0] + b"\n\n", "upstream_dropped", "stream_upstream_dropped"),
        (
            b'data: {"event":"error","status":400,"code":"x","message":"m"}\n\n',
            "upstream_error",
            "stream_upstream_error",
        ),
    ],
    ids=["completed", "dropped", "dify's error event"],
)
def test_each_stream_end_is_counted_by_reason_and_failures_as_upstream_errors(
    client, auth, requests_mock, body, end, upstream_error
):
    requests_mock.post(CHAT, content=body, headers=EVENT_STREAM)
    requests_mock.post(f"{CHAT}/t/stop", json={"result": "success"})
    ends = sample("dify_proxy_stream_ends_total", reason=end)
    errors = {
        kind: sample("dify_proxy_upstream_errors_total", kind=kind)
        for kind in ("stream_upstream_dropped", "stream_upstream_error", "stream_timeout")
    }
    durations = sample("dify_proxy_stream_duration_seconds_count")
    ask(client, auth)
    assert sample("dify_proxy_stream_ends_total", reason=end) == ends + 1
    for kind, before in errors.items():
        wanted = before + 1 if kind == upstream_error else before
        assert sample("dify_proxy_upstream_errors_total", kind=kind) == wanted
    assert sample("dify_proxy_stream_duration_seconds_count") == durations + 1


def test_stream_durations_and_first_byte_times_are_positive_and_short(client, auth, requests_mock):
    requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    sums = {
        name: sample(f"{name}_sum")
        for name in ("dify_proxy_stream_duration_seconds", "dify_proxy_time_to_first_byte_seconds")
    }
    ask(client, auth)
    for name, before in sums.items():
        assert 0 <= sample(f"{name}_sum") - before < 60  # an in-process stream, not an epoch


def test_a_dropped_stream_asks_dify_to_stop_as_the_same_user_and_request(
    client, auth, requests_mock
):
    requests_mock.post(CHAT, content=STREAM.split(b"\n\n")[0] + b"\n\n", headers=EVENT_STREAM)
    stopped = threading.Event()
    stop = requests_mock.post(
        f"{CHAT}/t/stop",
        json={"result": "success"},
        additional_matcher=lambda r: stopped.set() or True,
    )
    response = ask(client, auth)
    assert stopped.wait(5)
    assert stop.last_request.json() == {"user": tokens.USER_ID}
    assert stop.last_request.headers["X-Request-ID"] == response.headers["X-Request-ID"]


# --- smaller rules -------------------------------------------------------------------------


def test_the_refusal_and_failure_messages_are_sentences(client, auth, requests_mock, quotas):
    requests_mock.post(CHAT, text="<html>not json</html>")
    assert is_a_sentence(ask(client, auth, "blocking").json["message"])
    lease = quotas.acquire_stream(tokens.USER_ID)
    assert is_a_sentence(ask(client, auth, "blocking").json["message"])
    quotas.release_stream(tokens.USER_ID, lease)
    quotas.add_tokens(tokens.USER_ID, 10)
    assert is_a_sentence(ask(client, auth, "blocking").json["message"])
    response = client.post("/api/chat", data="message=hi", headers=auth)
    assert response.status_code == 415 and is_a_sentence(response.json["message"])


def test_an_empty_conversation_id_starts_a_new_conversation(client, auth, requests_mock):
    """Dify's own web app sends `conversation_id: ""` for a first question."""
    chat_mock = requests_mock.post(CHAT, json={"answer": "Hi"})
    response = client.post(
        "/api/chat",
        json={"message": "hi", "conversation_id": "", "response_mode": "blocking"},
        headers=auth,
    )
    assert response.status_code == 200
    assert "conversation_id" not in chat_mock.last_request.json()


def test_refusing_event_streams_with_q_0_is_not_asking_for_ids(client, auth, requests_mock):
    requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    response = client.post(
        "/api/chat",
        json={"message": "hi"},
        headers={**auth, "Accept": "application/json, text/event-stream;q=0"},
    )
    assert response.get_data() == STREAM


def test_a_single_token_counts(client, auth, requests_mock, quotas):
    requests_mock.post(CHAT, json={"answer": "Hi", "metadata": {"usage": {"total_tokens": 1}}})
    ask(client, auth, "blocking")
    assert quotas.tokens_used(tokens.USER_ID) == 1


def test_a_bad_inputs_query_parameter_is_a_400_naming_inputs(client, auth, requests_mock):
    response = client.get("/api/chat?message=hi&inputs=%7Bnope", headers=auth)
    assert response.status_code == 400
    assert response.json["message"].startswith("inputs must be a JSON object")
