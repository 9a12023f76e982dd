"""Sessions from @supabase/ssr cookies: every stored format, chunking, and the CSRF guard."""

import base64
import json
from dataclasses import replace
from urllib.parse import quote

import pytest

from dify_proxy import create_app
from dify_proxy.auth import cookie_token
from tests.conftest import DIFY_URL
from tests.support import tokens
from tests.support.messages import is_a_sentence

COOKIE = "sb-abcdefghij-auth-token"
ALLOWED = "https://app.example.com"
SELF = "http://localhost"  # the test client's own origin


@pytest.fixture
def app(settings):
    return create_app(replace(settings, supabase_auth_cookie=COOKIE, cors_origins=(ALLOWED,)))


@pytest.fixture
def dify(requests_mock):
    return requests_mock.post(f"{DIFY_URL}/chat-messages", json={"answer": "ok"})


def session_json(token: str | None = None) -> str:
    return json.dumps(
        {
            "access_token": token or tokens.hs256(),
            "token_type": "bearer",
            "expires_in": 3600,
            "refresh_token": "r",
            "user": {"id": "forged"},
        }
    )


def base64_value(token: str | None = None) -> str:
    return "base64-" + base64.urlsafe_b64encode(session_json(token).encode()).decode().rstrip("=")


def ask(client, cookies: dict[str, str], origin: str | None = SELF, **headers):
    for name, value in cookies.items():
        client.set_cookie(name, value)
    if origin:
        headers["Origin"] = origin
    return client.post(
        "/api/chat", json={"message": "hi", "response_mode": "blocking"}, headers=headers
    )


def test_a_base64_session_cookie_is_a_session(client, dify):
    assert ask(client, {COOKIE: base64_value()}).status_code == 200
    assert dify.last_request.json()["user"] == tokens.USER_ID


def test_a_url_encoded_json_session_cookie_is_a_session(client, dify):
    assert ask(client, {COOKIE: quote(session_json())}).status_code == 200


def test_an_old_auth_helpers_array_cookie_is_a_session(client, dify):
    assert ask(client, {COOKIE: quote(json.dumps([tokens.hs256(), "refresh"]))}).status_code == 200


def test_a_cookie_split_into_chunks_is_joined(client, dify):
    value = base64_value()
    chunks = {f"{COOKIE}.{i}": value[i * 100 : (i + 1) * 100] for i in range(len(value) // 100 + 1)}
    assert len(chunks) > 2
    assert ask(client, chunks).status_code == 200


def test_the_unsuffixed_cookie_wins_over_stale_chunks(client, dify):
    assert ask(client, {COOKIE: base64_value(), f"{COOKIE}.0": "stale"}).status_code == 200


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "base64-!!!!",
        "base64-e30",
        "%7B",
        "[]",
        "[1]",
        quote(json.dumps({"access_token": 5})),
        "null",
    ],
)
def test_a_malformed_cookie_is_no_session(client, dify, value):
    response = ask(client, {COOKIE: value})
    assert response.status_code == 401
    assert dify.call_count == 0


def test_the_token_inside_a_cookie_is_verified_like_a_bearer_token(client, dify):
    expired = tokens.hs256(exp=1)
    assert ask(client, {COOKIE: base64_value(expired)}).status_code == 401
    assert dify.call_count == 0


def test_an_authorization_header_wins_over_a_cookie(client, dify):
    response = ask(client, {COOKIE: base64_value()}, Authorization="Bearer not-a-token")
    assert response.status_code == 401
    assert dify.call_count == 0


def test_a_cookie_session_from_an_allowed_origin_is_accepted(client, dify):
    assert ask(client, {COOKIE: base64_value()}, origin=ALLOWED).status_code == 200


def test_a_cookie_session_from_another_origin_is_403(client, dify):
    response = ask(client, {COOKIE: base64_value()}, origin="https://evil.example")
    assert response.status_code == 403
    assert response.json["code"] == "forbidden"
    assert dify.call_count == 0


def test_a_cookie_session_without_origin_or_referer_is_403(client, dify):
    assert ask(client, {COOKIE: base64_value()}, origin=None).status_code == 403
    assert dify.call_count == 0


def test_a_same_origin_referer_stands_in_for_a_missing_origin(client, dify):
    response = ask(client, {COOKIE: base64_value()}, origin=None, Referer=f"{SELF}/demo")
    assert response.status_code == 200


def test_the_user_object_next_to_the_token_is_not_trusted(client, dify):
    ask(client, {COOKIE: base64_value()})
    assert dify.last_request.json()["user"] == tokens.USER_ID


def test_without_a_cookie_name_configured_cookies_are_ignored(settings, dify):
    client = create_app(settings).test_client()
    assert ask(client, {COOKIE: base64_value()}).status_code == 401


def padded_lengths_cookie(residue: int) -> str:
    """A base64 session cookie whose encoded length leaves `residue` when divided by 4."""
    for extra in range(8):
        value = "base64-" + base64.urlsafe_b64encode(
            session_json().replace('"r"', '"r' + "x" * extra + '"').encode()
        ).decode().rstrip("=")
        if len(value.removeprefix("base64-")) % 4 == residue:
            return value
    raise AssertionError(f"no length with remainder {residue}")


@pytest.mark.parametrize("residue", [0, 2, 3])  # base64 without padding is never 1 mod 4
def test_a_base64_cookie_of_any_length_is_a_session(client, dify, residue):
    """@supabase/ssr strips the `=` padding, so the proxy must put back the right amount."""
    assert ask(client, {COOKIE: padded_lengths_cookie(residue)}).status_code == 200


def test_the_origin_header_wins_over_a_same_origin_referer(client, dify):
    response = ask(
        client, {COOKIE: base64_value()}, origin="https://evil.example", Referer=f"{SELF}/demo"
    )
    assert response.status_code == 403
    assert dify.call_count == 0


def test_the_403_for_a_foreign_origin_says_why_in_a_sentence(client, dify):
    response = ask(client, {COOKIE: base64_value()}, origin="https://evil.example")
    assert is_a_sentence(response.json["message"])


@pytest.mark.parametrize("token", [5, "", None, ["a.b.c"]])
def test_a_session_whose_access_token_is_not_a_non_empty_string_has_no_token(token):
    value = quote(json.dumps({"access_token": token}))
    assert cookie_token({COOKIE: value}, COOKIE) is None
