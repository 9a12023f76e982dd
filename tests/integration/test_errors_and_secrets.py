"""Errors and secrecy through real gunicorn: right statuses, Dify's shape, no key, no token."""

from __future__ import annotations

import json

import pytest
import requests

from tests.integration.conftest import DIFY_KEY, scenario
from tests.support import processes, tokens
from tests.support.sse_client import AROUND, read_stream


@pytest.mark.parametrize("status", [400, 404, 413, 415, 429])
def test_difys_client_errors_pass_through(proxy, standin, status):
    response = proxy.chat(scenario(status=status, code="some_code", message="Dify said no"))
    assert response.status_code == status
    assert response.json() == {"code": "some_code", "message": "Dify said no", "status": status}


def test_difys_429_keeps_retry_after(proxy, standin):
    response = proxy.chat(scenario(status=429, code="too_many_requests", retry_after="9"))
    assert response.headers["Retry-After"] == "9"


@pytest.mark.parametrize("status", [401, 403])
def test_dify_refusing_the_server_key_is_a_502_for_the_user(proxy, standin, status):
    response = proxy.chat(scenario(status=status, code="unauthorized"))
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_misconfigured"
    assert "WWW-Authenticate" not in response.headers


@pytest.mark.parametrize("status", [500, 502, 503])
def test_dify_server_errors_are_502(proxy, standin, status):
    assert proxy.chat(scenario(status=status)).status_code == 502


def test_a_non_json_error_page_is_502(proxy, standin):
    response = proxy.chat(scenario(status=400, body="<html>oops</html>", content_type="text/html"))
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_error"


def test_an_invalid_session_gets_401_and_dify_is_never_called(proxy, standin):
    response = proxy.chat({"message": "hi"}, token=tokens.anon_key())
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert standin.chats() == []


def test_bad_input_gets_400_and_dify_is_never_called(proxy, standin):
    response = proxy.chat({"message": "  "})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_param"
    assert standin.chats() == []


def test_unknown_path_and_wrong_method_are_json(proxy):
    assert requests.get(f"{proxy.url}/nope", timeout=5).json()["code"] == "not_found"
    assert requests.put(f"{proxy.url}/api/chat", timeout=5).json()["code"] == "method_not_allowed"


def test_dify_receives_the_server_key_and_the_sessions_user(proxy, standin):
    read_stream(proxy.chat({**scenario(events=1), "user": "not-me"}))
    (call,) = standin.chats()
    assert call["auth_ok"] is True
    assert call["json"]["user"] == tokens.USER_ID


def test_a_refused_connection_to_dify_is_502(tmp_path):
    env = {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": f"http://127.0.0.1:{processes.free_port()}/v1",
        "SUPABASE_JWT_SECRET": tokens.SECRET,
        "WEB_CONCURRENCY": "1",
    }
    process, url = processes.start_proxy(env, tmp_path / "gunicorn.log")
    try:
        response = requests.post(
            f"{url}/api/chat",
            json={"message": "hi"},
            timeout=10,
            headers={"Authorization": f"Bearer {tokens.hs256()}"},
        )
    finally:
        processes.stop(process)
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_unavailable"


def test_each_request_logs_one_json_line_with_how_its_stream_ended(proxy, standin):
    sub = "5b1d3c9e-0a7f-4e21-8c3d-9e8f7a6b5c4d"
    response = proxy.chat(scenario(events=3, interval=0), token=tokens.hs256(sub=sub))
    read_stream(response)
    entry = json.loads(_wait_for_log_line(proxy, f'"user": "{sub}"'))
    assert entry["message"] == "request"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/api/chat", 200)
    assert entry["end"] == "completed"
    assert entry["events"] == 3 + AROUND and entry["bytes"] > 0  # 3 messages, the chatflow's rest
    assert entry["ttfb_ms"] > 0 and entry["duration_ms"] >= entry["ttfb_ms"]
    assert entry["request_id"] == response.headers["X-Request-ID"]


def test_a_gone_client_is_logged_as_client_gone(proxy, standin):
    sub = "8c2e4f6a-1b3d-4e5f-9a7b-0c1d2e3f4a5b"
    response = proxy.chat(scenario(events=1, end="hang"), token=tokens.hs256(sub=sub))
    read_stream(response, until=lambda r: b"data:" in r.body)
    response.close()
    assert json.loads(_wait_for_log_line(proxy, sub))["end"] == "client_gone"


def _wait_for_log_line(proxy, needle: str, seconds: float = 10) -> str:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lines = [line for line in proxy.log().splitlines() if needle in line]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no log line with {needle!r}")


def test_the_key_and_tokens_appear_in_no_response_and_no_log_line(proxy, standin):
    token = tokens.hs256()
    bodies = []
    for body in (
        scenario(events=2),
        scenario(status=401),
        scenario(status=500),
        scenario(events=1, end="drop"),
        {"message": ""},
        {"message": "hi", "response_mode": "blocking"},
    ):
        response = proxy.chat(body, token=token)
        bodies.append(response.raw.read() + str(response.headers).encode())
    bodies.append(proxy.chat({"message": "hi"}, token=tokens.anon_key()).content)
    everything = b"".join(bodies).decode(errors="replace") + proxy.log()
    assert DIFY_KEY not in everything
    assert token not in everything
    assert tokens.anon_key()[:40] not in everything
    assert "DEBUG" in proxy.log()  # the proxy really ran at the most talkative level
