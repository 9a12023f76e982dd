"""Issue 11: what an outside probe and a first deploy found, one regression test per finding,
each through real gunicorn against the stand-in (which must not be called for bad input)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import requests

from tests.integration.conftest import AUTH_COOKIE
from tests.support import tokens


def bearer(token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or tokens.hs256()}"}


def assert_error(response, status: int, code: str | None = None) -> None:
    """An error in Dify's JSON shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "status"} and body["status"] == status
    if code is not None:
        assert body["code"] == code


def assert_no_traceback(proxy) -> None:
    log = proxy.log()
    assert "Traceback" not in log
    assert "unhandled error" not in log


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- 7. inputs that gave a 500 with a cookie session configured ------------------------------


def test_7_an_unparsable_referer_without_origin_is_403_not_500(proxy, standin):
    session = quote(json.dumps({"access_token": tokens.hs256()}))
    response = requests.post(
        f"{proxy.url}/api/chat",
        json={"message": "hi"},
        headers={"Referer": "http://[", "Cookie": f"{AUTH_COOKIE}={session}"},
        timeout=10,
    )
    assert_error(response, 403, "forbidden")
    assert standin.calls() == []
    assert_no_traceback(proxy)


def test_7_a_cookie_nested_3000_levels_deep_is_no_session(proxy, standin):
    response = requests.post(
        f"{proxy.url}/api/chat",
        json={"message": "hi"},
        headers={"Cookie": f"{AUTH_COOKIE}={nested(3000)}", "Origin": proxy.url},
        timeout=10,
    )
    assert_error(response, 401, "unauthorized")
    assert standin.calls() == []
    assert_no_traceback(proxy)


# --- 8. JSON nested about 1,000 levels deep ---------------------------------------------------


def test_8_a_body_nested_1000_levels_deep_is_400(proxy, standin):
    body = '{"message": "hi", "inputs": {"a": ' + nested(1000) + "}}"
    response = requests.post(
        f"{proxy.url}/api/chat",
        data=body,
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert "nested" in response.json()["message"]
    assert standin.calls() == []
    assert_no_traceback(proxy)


def test_8_get_inputs_nested_1000_levels_deep_are_400(proxy, standin):
    response = requests.get(
        f"{proxy.url}/api/chat",
        params={"message": "hi", "inputs": '{"a": ' + nested(1000) + "}"},
        headers=bearer(),
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert standin.calls() == []
    assert_no_traceback(proxy)


# --- 9. numbers JSON does not have ------------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_9_a_non_finite_number_is_400_and_no_false_dify_down_alert(proxy, standin, number):
    response = requests.post(
        f"{proxy.url}/api/chat",
        data='{"message": "hi", "inputs": {"n": NUMBER}}'.replace("NUMBER", number),
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert standin.calls() == []
    assert "dify unreachable" not in proxy.log()


def test_a_lone_surrogate_in_a_message_is_400_before_dify(proxy, standin):
    """Dify stores messages as UTF-8 text, which has no form for `\\ud800`."""
    response = requests.post(
        f"{proxy.url}/api/chat",
        data='{"message": "a\\ud800b"}',
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert standin.calls() == []
