"""/api/chat within the user's limits: stream slots taken and always given back, token budgets
counted from Dify's usage reports, and the 429s that say when to try again."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime

import pytest
import requests

from dify_proxy import chat, create_app
from tests.conftest import DIFY_URL
from tests.support import tokens

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
    assert "At most 1 answers" in response.json["message"]
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


def test_a_long_stream_renews_its_lease_every_third_of_a_lease(
    settings, auth, requests_mock, monkeypatch
):
    """Dify's two events arrive 21 s apart on a fake clock: with 60 s leases, a write after
    20 s or more renews the lease (once or twice, as the reads happen to batch)."""
    app = create_app(dataclasses.replace(settings, stream_lease_seconds=60))
    quotas = app.extensions["dify_proxy.quotas"]
    renewals = []
    monkeypatch.setattr(quotas, "renew_stream", lambda user, lease: renewals.append(user))
    now = [1000.0]
    monkeypatch.setattr(chat.time, "monotonic", lambda: now[0])

    def body():
        for event in STREAM.split(b"\n\n")[:-1]:
            now[0] += 21
            yield event + b"\n\n"

    requests_mock.post(CHAT, body=_Chunks(body()), headers=EVENT_STREAM)
    client = app.test_client()
    response = client.post("/api/chat", json={"message": "hi"}, headers=auth)
    assert response.get_data() == STREAM
    assert renewals in ([tokens.USER_ID], [tokens.USER_ID] * 2)


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
