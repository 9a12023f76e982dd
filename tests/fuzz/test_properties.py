"""Hypothesis properties against the running service (real gunicorn, the stand-in as Dify):
forged tokens, hostile cookie values and hostile chat bodies never get a 5xx, every refusal is
JSON in Dify's shape, and nothing invalid reaches Dify. Budget: HYPOTHESIS_PROFILE."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import quote

import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.integration.conftest import AUTH_COOKIE
from tests.support import tokens

CHUNK = 3180  # @supabase/ssr's chunk size
COOKIE_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=';,\\"'), max_size=60
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assert_refusal(response: requests.Response, *statuses: int) -> None:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"code", "message", "status"} and body["status"] == response.status_code


def ask(proxy, headers: dict[str, str], body: dict | None = None) -> requests.Response:
    return requests.post(
        f"{proxy.url}/api/chat",
        json=body or {"message": "hi", "response_mode": "blocking"},
        headers=headers,
        timeout=30,
    )


# --- tokens ----------------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
INVALIDATING_CLAIMS = st.sampled_from(
    [
        {"role": "anon"},
        {"role": "service_role"},
        {"role": None},
        {"aud": "anon"},
        {"aud": ["other"]},
        {"exp": 1_000_000_000},
        {"exp": None},
        {"sub": ""},
        {"sub": None},
        {"sub": 12345},
        {"aud": None},
        {"nbf": 4_000_000_000},
    ]
)


@st.composite
def forged_tokens(draw) -> str:
    """A token that must not pass: a wrong algorithm, a wrong or broken signature, or claims
    that are not a user session's; the header (`alg`, `kid`, extra fields) and claims vary."""
    reason = draw(st.sampled_from(["alg", "signature", "claims"]))
    alg = "HS256"
    if reason == "alg":
        alg = draw(
            st.sampled_from(["HS384", "HS512", "none", "None", "ES256", "RS256", ""])
            | st.text(max_size=8)
        )
    header: dict[str, Any] = {"alg": alg, "typ": draw(st.sampled_from(["JWT", "jwt", None]))}
    if draw(st.booleans()):
        header["kid"] = draw(JSON_SCALARS | st.lists(st.text(max_size=5), max_size=3))
    header.update(draw(st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=3)))
    header = {k: v for k, v in header.items() if v is not None}
    claims = tokens.claims()
    if reason == "claims":
        claims.update(draw(INVALIDATING_CLAIMS))
        claims = {k: v for k, v in claims.items() if v is not None}
    claims.update(
        {
            k: v
            for k, v in draw(st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=3)).items()
            if k not in ("role", "aud", "exp", "sub", "nbf", "iat")
        }
    )
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if reason == "signature":
        signature = draw(st.sampled_from(["random", "wrong-key", "empty", "truncated"]))
        if signature == "random":
            mac = draw(st.binary(min_size=1, max_size=64))
        elif signature == "wrong-key":
            mac = hmac.new(
                draw(st.binary(min_size=32, max_size=48)), signing_input.encode(), hashlib.sha256
            ).digest()
        elif signature == "empty":
            mac = b""
        else:
            mac = hmac.new(tokens.SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()[
                :-1
            ]
    else:
        mac = hmac.new(tokens.SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@given(token=forged_tokens())
def test_a_forged_token_is_401_and_never_reaches_dify(proxy, standin, token):
    assert_refusal(ask(proxy, {"Authorization": f"Bearer {token}"}), 401)
    assert standin.calls() == []


@given(token=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300))
def test_any_printable_text_as_a_token_is_401_and_never_reaches_dify(proxy, standin, token):
    assert_refusal(ask(proxy, {"Authorization": f"Bearer {token}"}), 401)
    assert standin.calls() == []


# --- cookie values ---------------------------------------------------------------------------


def session_value(token: str, encoding: str, padding: int) -> str:
    session = {"access_token": token, "refresh_token": "r" * 20, "user": {"bio": "x" * padding}}
    text = json.dumps(session)
    if encoding == "base64":
        return "base64-" + base64.urlsafe_b64encode(text.encode()).decode()
    return quote(text)


def cookie_header(value: str, cuts: list[int] | None) -> str:
    if cuts is None:
        return f"{AUTH_COOKIE}={value}"
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(value))), len(value)]
    chunks = [value[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return "; ".join(f"{AUTH_COOKIE}.{n}={chunk}" for n, chunk in enumerate(chunks))


@given(
    encoding=st.sampled_from(["base64", "url"]),
    padding=st.integers(0, 2 * CHUNK),
    cuts=st.none() | st.lists(st.integers(1, 3 * CHUNK), max_size=4),
)
def test_a_valid_session_cookie_is_accepted_however_it_is_chunked(
    proxy, standin, encoding, padding, cuts
):
    value = session_value(tokens.hs256(), encoding, padding)
    before = len(standin.chats())
    response = ask(proxy, {"Cookie": cookie_header(value, cuts), "Origin": proxy.url})
    assert response.status_code == 200, response.text
    assert len(standin.chats()) == before + 1


def nested_value(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


HOSTILE_COOKIES = st.one_of(
    COOKIE_TEXT,
    st.builds(lambda t: "base64-" + t, COOKIE_TEXT),
    st.builds(lambda b: "base64-" + base64.urlsafe_b64encode(b).decode(), st.binary(max_size=200)),
    # Deep, yet under gunicorn's 16 KiB header limit (over it, gunicorn answers 431 itself).
    st.builds(nested_value, st.integers(1, 4000), st.just("list")),
    st.builds(nested_value, st.integers(1, 2000), st.just("object")),
    st.builds(
        lambda token, enc: session_value(token, enc, 0),
        forged_tokens(),
        st.sampled_from(["base64", "url"]),
    ),
    st.builds(
        lambda v: quote(json.dumps(v)),
        st.recursive(
            JSON_SCALARS,
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=10,
        ),
    ),
)


@given(
    value=HOSTILE_COOKIES,
    cuts=st.none() | st.lists(st.integers(1, 8000), max_size=3),
    origin=st.sampled_from(["self", "other", None]),
)
def test_a_hostile_cookie_value_is_refused_and_never_reaches_dify(
    proxy, standin, value, cuts, origin
):
    headers = {"Cookie": cookie_header(value, cuts)}
    if origin is not None:
        headers["Origin"] = proxy.url if origin == "self" else "https://evil.example"
    assert_refusal(ask(proxy, headers), 401, 403)
    assert standin.calls() == []


# --- bodies ----------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
CHAT_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "message": JSON_VALUES | st.text(max_size=50) | st.just(" ") | st.just("x" * 32_001),
        "inputs": JSON_VALUES
        | st.dictionaries(
            st.text(max_size=8).filter(lambda k: not k.startswith("_")),
            st.text(max_size=20),
            max_size=3,
        ),
        "files": JSON_VALUES,
        "conversation_id": JSON_VALUES | st.uuids().map(str) | st.just(""),
        "response_mode": st.sampled_from(["blocking", "streaming", "other", None]),
    },
)
RAW_BODIES = st.one_of(
    CHAT_BODIES.map(lambda b: json.dumps(b, allow_nan=True).encode("utf-8", "surrogatepass")),
    JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.builds(
        lambda d: ('{"message": "hi", "inputs": ' + "[" * d + "]" * d + "}").encode(),
        st.integers(1, 5000),
    ),
)


@given(body=RAW_BODIES)
def test_a_hostile_chat_body_is_never_a_5xx_and_a_refused_one_never_reaches_dify(
    proxy, standin, body
):
    before = len(standin.chats())
    response = requests.post(
        f"{proxy.url}/api/chat",
        data=body,
        headers={"Authorization": f"Bearer {tokens.hs256()}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code < 500, (response.status_code, response.text[:300])
    deadline = time.monotonic() + 5
    chats = standin.chats()[before:]
    while response.status_code == 200 and not chats and time.monotonic() < deadline:
        chats = standin.chats()[before:]
    if response.status_code >= 400:
        assert_refusal(response, response.status_code)
        # Refused by the proxy: Dify never saw it. Refused by Dify (passed through): Dify
        # itself said so in its call log.
        assert chats == [] or [c["status"] for c in chats] == [response.status_code]
    else:
        assert len(chats) == 1
