"""The Dify client: how each upstream answer maps to what the caller sees."""

import logging

import pytest
import requests

from dify_proxy.dify import Dify
from dify_proxy.errors import ApiError
from tests.conftest import DIFY_KEY, DIFY_URL

CHAT = f"{DIFY_URL}/chat-messages"
PAYLOAD = {"query": "hi", "inputs": {}, "user": "u1", "response_mode": "blocking"}


@pytest.fixture
def dify(settings):
    return Dify(settings)


def dify_error(status, code="some_code", message="Dify says no"):
    return {"status_code": status, "json": {"code": code, "message": message, "status": status}}


def test_chat_sends_the_server_key_as_bearer(dify, requests_mock):
    requests_mock.post(CHAT, json={"answer": "ok"})
    dify.chat(PAYLOAD, stream=False)
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {DIFY_KEY}"


def test_chat_sends_the_payload_as_json(dify, requests_mock):
    requests_mock.post(CHAT, json={"answer": "ok"})
    dify.chat(PAYLOAD, stream=False)
    assert requests_mock.last_request.json() == PAYLOAD


@pytest.mark.parametrize("status", [400, 404, 413, 415, 429])
def test_client_errors_pass_through_with_difys_code_and_message(dify, requests_mock, status):
    requests_mock.post(CHAT, **dify_error(status, "invalid_param", "Conversation Not Exists."))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        status,
        "invalid_param",
        "Conversation Not Exists.",
    )


def test_429_keeps_retry_after(dify, requests_mock):
    requests_mock.post(CHAT, headers={"Retry-After": "7"}, **dify_error(429, "too_many_requests"))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert caught.value.headers == {"Retry-After": "7"}


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_server_key_is_a_502_never_a_401(dify, requests_mock, status):
    requests_mock.post(CHAT, **dify_error(status, "unauthorized", "Access token is invalid"))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert caught.value.status == 502
    assert caught.value.code == "upstream_misconfigured"
    assert "token" not in caught.value.message.lower()


def test_a_refused_server_key_is_logged_as_an_error_without_the_key(dify, requests_mock, caplog):
    requests_mock.post(CHAT, **dify_error(401, "unauthorized"))
    with caplog.at_level(logging.DEBUG), pytest.raises(ApiError):
        dify.chat(PAYLOAD, stream=False)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "DIFY_API_KEY" in errors[0].getMessage()
    assert DIFY_KEY not in caplog.text


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_dify_server_errors_are_502(dify, requests_mock, status):
    requests_mock.post(CHAT, **dify_error(status, "internal_server_error"))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert (caught.value.status, caught.value.code) == (502, "upstream_error")


@pytest.mark.parametrize("status", [400, 429, 502])
def test_a_non_json_error_page_is_502(dify, requests_mock, status):
    requests_mock.post(CHAT, status_code=status, text="<html>Bad gateway</html>")
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert caught.value.status == 502


def test_a_refused_connection_is_502(dify, requests_mock):
    requests_mock.post(CHAT, exc=requests.ConnectionError("refused"))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert (caught.value.status, caught.value.code) == (502, "upstream_unavailable")


def test_a_connect_timeout_is_502(dify, requests_mock):
    requests_mock.post(CHAT, exc=requests.ConnectTimeout("slow"))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert caught.value.status == 502


def test_a_read_timeout_before_the_first_byte_is_504(dify, requests_mock):
    requests_mock.post(CHAT, exc=requests.ReadTimeout("silent"))
    with pytest.raises(ApiError) as caught:
        dify.chat(PAYLOAD, stream=False)
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")


def test_stop_posts_the_same_user(dify, requests_mock):
    requests_mock.post(f"{DIFY_URL}/chat-messages/t-1/stop", json={"result": "success"})
    dify.stop("t-1", user="u1")
    assert requests_mock.last_request.json() == {"user": "u1"}


def test_stop_never_raises(dify, requests_mock):
    requests_mock.post(f"{DIFY_URL}/chat-messages/t-1/stop", exc=requests.ConnectionError)
    dify.stop("t-1", user="u1")
