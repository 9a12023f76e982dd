"""Who gets through `POST /api/chat`: only a real Supabase user session, verified locally.

Every test drives the real app (`create_app`) with a Dify that is mocked at the HTTP layer, so
"Dify was called" means the request passed the session check, and a JWKS served by a real HTTP
server on loopback, so "fetched once" means one request on the wire.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from flask.testing import FlaskClient

from dify_proxy import auth, create_app, devtokens
from dify_proxy.settings import Settings
from tests.support import tokens
from tests.support.jwks import JwksServer, closed_port_url, hmac_forgery, tampered
from tests.support.messages import is_a_sentence

API_KEY = "app-test-dify-api-key-0123456789"
DIFY_URL = "https://dify.test/v1"
CHAT_URL = f"{DIFY_URL}/chat-messages"
EC_KID = "ec-signing-key-1"
RSA_KID = "rsa-signing-key-1"
BODY = {"message": "hi"}
DIFY_ANSWER = {
    "event": "message",
    "task_id": "c3800678-a077-43df-a102-53f23ed20b88",
    "id": "9da23599-e713-473b-982c-4328d4f5c78a",
    "message_id": "9da23599-e713-473b-982c-4328d4f5c78a",
    "conversation_id": "45701982-8118-4bc5-8e9b-64562b4555f2",
    "mode": "chat",
    "answer": "Hello!",
    "metadata": {},
    "created_at": 1705407629,
}
UNAUTHORIZED_CHALLENGE = 'Bearer error="invalid_token"'


def now() -> int:
    return int(time.time())


@dataclass
class Mint:
    """Tokens as the project behind `jwks_server` issues them: its issuer, its signing keys."""

    issuer: str
    ec_key: Any
    rsa_key: Any

    def claims(self, **overrides: Any) -> dict[str, Any]:
        return tokens.claims(**{"iss": self.issuer, **overrides})

    def hs256(self, secret: str = tokens.SECRET, **overrides: Any) -> str:
        return tokens.hs256(secret, **{"iss": self.issuer, **overrides})

    def es256(self, key: Any = None, kid: str = EC_KID, **overrides: Any) -> str:
        key = key or self.ec_key
        return tokens.signed(key, kid, "ES256", **{"iss": self.issuer, **overrides})

    def rs256(self, key: Any = None, kid: str = RSA_KID, **overrides: Any) -> str:
        key = key or self.rsa_key
        return tokens.signed(key, kid, "RS256", **{"iss": self.issuer, **overrides})


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ec_key() -> Any:
    return tokens.new_ec_key()


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return tokens.new_rsa_key()


@pytest.fixture
def jwks_server(ec_key: Any, rsa_key: Any) -> Iterator[JwksServer]:
    """The project's JWKS: one ES256 and one RS256 key, as during a rotation."""
    with JwksServer([tokens.jwk(ec_key, EC_KID), tokens.jwk(rsa_key, RSA_KID)]) as server:
        yield server


@pytest.fixture
def mint(jwks_server: JwksServer, ec_key: Any, rsa_key: Any) -> Mint:
    return Mint(f"{jwks_server.url}/auth/v1", ec_key, rsa_key)


@pytest.fixture
def dify(requests_mock: Any) -> Any:
    """Dify's chat endpoint, answering a blocking JSON 200; any other outbound call fails."""
    return requests_mock.post(CHAT_URL, json=DIFY_ANSWER)


def make_client(**settings: Any) -> FlaskClient:
    app = create_app(Settings(dify_api_key=API_KEY, dify_api_url=DIFY_URL, **settings))
    return app.test_client()


@pytest.fixture
def client(jwks_server: JwksServer, dify: Any) -> FlaskClient:
    """A project with both the legacy secret and signing keys (SUPABASE_URL) configured."""
    return make_client(supabase_jwt_secret=tokens.SECRET, supabase_url=jwks_server.url)


@pytest.fixture
def secret_only_client(dify: Any) -> FlaskClient:
    """A legacy project: SUPABASE_JWT_SECRET only, so no issuer check and no JWKS."""
    return make_client(supabase_jwt_secret=tokens.SECRET)


@pytest.fixture
def url_only_client(jwks_server: JwksServer, dify: Any) -> FlaskClient:
    """A signing-keys project: SUPABASE_URL only, no HMAC secret at all."""
    return make_client(supabase_url=jwks_server.url)


def post_chat(
    client: FlaskClient, token: str | None = None, body: dict[str, Any] | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.post("/api/chat", json=BODY if body is None else body, headers=headers)


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401
    assert response.get_json()["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == UNAUTHORIZED_CHALLENGE


def assert_reached_dify(response: Any, dify: Any) -> None:
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == DIFY_ANSWER
    assert dify.call_count == 1


# --- accepted sessions ---------------------------------------------------------------------

ACCEPTED: list[Any] = [
    pytest.param(lambda m: m.hs256(), id="HS256 user token signed with the legacy secret"),
    pytest.param(lambda m: m.es256(), id="ES256 token whose kid is in the JWKS"),
    pytest.param(lambda m: m.rs256(), id="RS256 token whose kid is in the JWKS"),
    pytest.param(
        lambda m: m.hs256(
            is_anonymous=True, email="", amr=[{"method": "anonymous", "timestamp": now()}]
        ),
        id="anonymous sign-in (role authenticated, is_anonymous true)",
    ),
    pytest.param(
        lambda m: m.es256(
            is_anonymous=True, email="", amr=[{"method": "anonymous", "timestamp": now()}]
        ),
        id="anonymous sign-in signed with a signing key",
    ),
    pytest.param(
        lambda m: m.hs256(aud=["authenticated", "other"]),
        id="aud is a list containing authenticated",
    ),
    pytest.param(
        lambda m: m.hs256(iat=now() - 3605, exp=now() - 5),
        id="expired 5 s ago, within the 10 s leeway",
    ),
    pytest.param(
        lambda m: m.es256(iat=now() + 5, exp=now() + 3605),
        id="issued 5 s in the future, within the leeway (clock skew)",
    ),
]


@pytest.mark.parametrize("make_token", ACCEPTED)
def test_valid_session_is_accepted_and_reaches_dify(
    client: FlaskClient, mint: Mint, dify: Any, make_token: Callable[[Mint], str]
) -> None:
    assert_reached_dify(post_chat(client, make_token(mint)), dify)


def test_lowercase_bearer_scheme_is_accepted(client: FlaskClient, mint: Mint, dify: Any) -> None:
    response = client.post(
        "/api/chat", json=BODY, headers={"Authorization": f"bearer {mint.hs256()}"}
    )
    assert_reached_dify(response, dify)


def test_dify_user_is_the_token_sub_even_when_the_body_names_someone_else(
    client: FlaskClient, mint: Mint, dify: Any
) -> None:
    sub = "7d1f2c3b-4a5e-4f60-8a9b-0c1d2e3f4a5b"
    response = post_chat(client, mint.es256(sub=sub), {"message": "hi", "user": "someone-else"})
    assert_reached_dify(response, dify)
    assert dify.last_request.json()["user"] == sub


def test_dify_is_called_with_the_server_key_never_the_users_token(
    client: FlaskClient, mint: Mint, dify: Any
) -> None:
    token = mint.hs256()
    assert_reached_dify(post_chat(client, token), dify)
    assert dify.last_request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert token not in dify.last_request.text


def test_without_supabase_url_the_issuer_is_not_checked(
    secret_only_client: FlaskClient, dify: Any
) -> None:
    """Older self-hosted setups issue tokens without `iss`; the legacy secret alone vouches."""
    response = post_chat(secret_only_client, tokens.hs256(iss=None))
    assert_reached_dify(response, dify)


# --- rejected requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(lambda token: None, id="no Authorization header"),
        pytest.param(lambda token: "Basic dXNlcjpwYXNzd29yZA==", id="Basic credentials"),
        pytest.param(lambda token: f"Basic {token}", id="Basic scheme carrying a valid token"),
        pytest.param(lambda token: f"Token {token}", id="unknown scheme carrying a valid token"),
        pytest.param(lambda token: token, id="valid token without a scheme"),
        pytest.param(lambda token: "Bearer ", id="Bearer with an empty token"),
        pytest.param(lambda token: "Bearer", id="Bearer with no token at all"),
        pytest.param(lambda token: "Bearer not-a-jwt-at-all", id="garbage string"),
        pytest.param(lambda token: "Bearer a.b.c", id="three garbage segments"),
    ],
)
def test_request_without_a_usable_bearer_token_is_rejected(
    client: FlaskClient, mint: Mint, dify: Any, authorization: Callable[[str], str | None]
) -> None:
    value = authorization(mint.hs256())
    headers = {} if value is None else {"Authorization": value}
    response = client.post("/api/chat", json=BODY, headers=headers)
    assert_unauthorized(response)
    assert not dify.called


def _hs384(m: Mint) -> str:
    return jwt.encode(m.claims(), tokens.SECRET, algorithm="HS384")


REJECTED: list[Any] = [
    # Lifetime
    pytest.param(lambda m: m.hs256(iat=now() - 3700, exp=now() - 60), id="expired beyond leeway"),
    pytest.param(lambda m: m.es256(iat=now() - 3700, exp=now() - 60), id="ES256 expired"),
    pytest.param(
        lambda m: m.hs256(iat=now() + 60, exp=now() + 3660), id="iat in the future beyond leeway"
    ),
    pytest.param(lambda m: m.hs256(nbf=now() + 60), id="nbf in the future beyond leeway"),
    pytest.param(lambda m: m.hs256(exp=None), id="missing exp"),
    # Who and for whom
    pytest.param(lambda m: m.hs256(sub=None), id="missing sub"),
    pytest.param(lambda m: m.hs256(sub=""), id="empty sub"),
    pytest.param(lambda m: m.hs256(aud="some-other-audience"), id="wrong aud"),
    pytest.param(lambda m: m.hs256(aud=["anon", "other"]), id="aud list without authenticated"),
    pytest.param(lambda m: m.hs256(aud=None), id="missing aud"),
    pytest.param(lambda m: m.hs256(role="anon"), id="role anon"),
    pytest.param(lambda m: m.hs256(role="service_role"), id="role service_role"),
    pytest.param(lambda m: m.hs256(role=None), id="missing role"),
    pytest.param(lambda m: m.hs256(iss="https://evil.supabase.co/auth/v1"), id="wrong iss (HS256)"),
    pytest.param(
        lambda m: m.es256(iss="https://other-project.supabase.co/auth/v1"), id="wrong iss (ES256)"
    ),
    pytest.param(lambda m: m.hs256(iss=None), id="missing iss when SUPABASE_URL is set"),
    # Signatures and algorithms
    pytest.param(
        lambda m: m.hs256(secret="another-secret-that-is-also-32-bytes-long!"),
        id="HS256 signed with another secret",
    ),
    pytest.param(
        lambda m: tampered(m.hs256(), sub="00000000-0000-4000-8000-000000000000"),
        id="tampered payload (HS256), signature kept",
    ),
    pytest.param(
        lambda m: tampered(m.es256(), role="service_role"),
        id="tampered payload (ES256), signature kept",
    ),
    pytest.param(lambda m: tokens.unsigned(iss=m.issuer), id="alg none"),
    pytest.param(
        _hs384,
        id="HS384 with the right secret",
        marks=pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning"),
    ),
    pytest.param(lambda m: m.es256(kid="unknown-kid"), id="ES256 with an unknown kid"),
    pytest.param(
        lambda m: m.es256(key=tokens.new_ec_key()),
        id="ES256 signed by a key outside the JWKS, claiming a known kid",
    ),
    pytest.param(lambda m: m.es256(kid=RSA_KID), id="ES256 header with the RS256 key's kid"),
    pytest.param(
        lambda m: m.rs256(key=tokens.new_rsa_key()),
        id="RS256 signed by a key outside the JWKS, claiming a known kid",
    ),
    pytest.param(
        lambda m: jwt.encode(m.claims(), m.ec_key, algorithm="ES256"), id="ES256 without a kid"
    ),
]


@pytest.mark.parametrize("make_token", REJECTED)
def test_token_that_is_not_a_valid_user_session_is_rejected(
    client: FlaskClient, mint: Mint, dify: Any, make_token: Callable[[Mint], str]
) -> None:
    assert_unauthorized(post_chat(client, make_token(mint)))
    assert not dify.called


@pytest.mark.parametrize("role", ["anon", "service_role"])
def test_project_api_key_is_not_a_user_session(
    secret_only_client: FlaskClient, dify: Any, role: str
) -> None:
    """Validly signed with the project's secret, yet not a session: no sub, no aud."""
    assert_unauthorized(post_chat(secret_only_client, tokens.anon_key(role=role)))
    assert not dify.called


@pytest.mark.parametrize("key_name", ["ec_key", "rsa_key"])
def test_hs256_token_keyed_with_the_public_key_pem_is_rejected(
    url_only_client: FlaskClient, mint: Mint, dify: Any, key_name: str
) -> None:
    """The classic key-confusion forgery: the public key (which anyone can fetch) as HMAC key."""
    pem = (
        getattr(mint, key_name)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert_unauthorized(post_chat(url_only_client, hmac_forgery(mint.claims(), pem)))
    assert not dify.called


def test_hs256_token_is_rejected_when_no_secret_is_configured(
    url_only_client: FlaskClient, mint: Mint, dify: Any
) -> None:
    assert_unauthorized(post_chat(url_only_client, mint.hs256()))
    assert not dify.called


def test_signing_key_token_is_rejected_when_only_the_secret_is_configured(
    secret_only_client: FlaskClient, mint: Mint, dify: Any
) -> None:
    assert_unauthorized(post_chat(secret_only_client, mint.es256()))
    assert not dify.called


# --- dev tokens (DEV_TOKENS, the local stand-in only) --------------------------------------

DEV_SECRET = "a-dev-token-secret-made-for-one-local-run-only"


def dev_client(**settings: Any) -> FlaskClient:
    return make_client(dev_tokens=True, dev_token_secret=DEV_SECRET, **settings)


def test_a_dev_token_opens_a_session_with_dev_tokens_on(dify: Any) -> None:
    response = post_chat(dev_client(supabase_jwt_secret=tokens.SECRET), devtokens.mint(DEV_SECRET))
    assert_reached_dify(response, dify)


def test_a_dev_token_is_checked_without_supabases_issuer(
    jwks_server: JwksServer, dify: Any
) -> None:
    client = dev_client(supabase_url=jwks_server.url)
    assert_reached_dify(post_chat(client, devtokens.mint(DEV_SECRET)), dify)


def test_a_dev_token_is_refused_with_dev_tokens_off(
    secret_only_client: FlaskClient, dify: Any
) -> None:
    assert_unauthorized(post_chat(secret_only_client, devtokens.mint(DEV_SECRET)))
    assert not dify.called


def test_a_token_marked_as_dev_but_signed_with_the_supabase_secret_is_refused(dify: Any) -> None:
    """The dev mark sends the check to the dev secret only: it unlocks nothing else."""
    client = dev_client(supabase_jwt_secret=tokens.SECRET)
    assert_unauthorized(post_chat(client, devtokens.mint(tokens.SECRET)))
    assert not dify.called


def test_a_session_signed_with_the_dev_secret_but_not_marked_as_dev_is_refused(dify: Any) -> None:
    client = dev_client(supabase_jwt_secret=tokens.SECRET)
    assert_unauthorized(post_chat(client, tokens.hs256(DEV_SECRET)))
    assert not dify.called


def test_real_sessions_still_open_with_dev_tokens_on(mint: Mint, dify: Any) -> None:
    assert_reached_dify(
        post_chat(dev_client(supabase_jwt_secret=tokens.SECRET), mint.hs256(iss=None)), dify
    )


# --- the JWKS: fetched lazily, cached, refetched sparingly ---------------------------------


def test_jwks_is_not_fetched_at_start_up(client: FlaskClient, jwks_server: JwksServer) -> None:
    assert jwks_server.fetches == 0


def test_hs256_sessions_never_fetch_the_jwks(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    for _ in range(3):
        assert post_chat(client, mint.hs256()).status_code == 200
    assert jwks_server.fetches == 0


def test_jwks_is_fetched_once_and_then_cached_across_requests(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    for _ in range(5):
        assert post_chat(client, mint.es256()).status_code == 200
        assert post_chat(client, mint.rs256()).status_code == 200
    assert dify.call_count == 10
    assert jwks_server.fetches == 1


def test_unknown_kids_refetch_the_jwks_at_most_once_within_the_cooldown(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    assert post_chat(client, mint.es256()).status_code == 200
    fetched = jwks_server.fetches
    for n in range(5):
        assert_unauthorized(post_chat(client, mint.es256(kid=f"unknown-kid-{n}")))
    assert jwks_server.fetches - fetched <= 1
    assert dify.call_count == 1


def test_key_rotated_in_after_the_first_fetch_is_found_by_a_refetch(
    jwks_server: JwksServer, mint: Mint, dify: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "JWKS_REFETCH_COOLDOWN_SECONDS", 0)
    client = make_client(supabase_url=jwks_server.url)
    assert post_chat(client, mint.es256()).status_code == 200
    new_key = tokens.new_ec_key()
    jwks_server.keys.append(tokens.jwk(new_key, "ec-signing-key-2"))

    response = post_chat(client, mint.es256(key=new_key, kid="ec-signing-key-2"))

    assert response.status_code == 200
    assert jwks_server.fetches == 2


def test_cached_keys_keep_working_while_the_jwks_server_is_down(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    assert post_chat(client, mint.es256()).status_code == 200
    jwks_server.stop()
    assert post_chat(client, mint.es256()).status_code == 200
    assert dify.call_count == 2


@pytest.fixture(params=["nothing listening", "server error"])
def unreachable_jwks_url(request: pytest.FixtureRequest, jwks_server: JwksServer) -> str:
    """The JWKS cannot be fetched, and never has been: the host is down or answers 500."""
    if request.param == "nothing listening":
        return closed_port_url()
    jwks_server.status = 500
    return jwks_server.url


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_signing_key_token_gets_503_when_the_jwks_cannot_be_fetched(
    unreachable_jwks_url: str, mint: Mint, dify: Any, alg: str
) -> None:
    client = make_client(supabase_jwt_secret=tokens.SECRET, supabase_url=unreachable_jwks_url)
    issuer = f"{unreachable_jwks_url}/auth/v1"
    token = mint.es256(iss=issuer) if alg == "ES256" else mint.rs256(iss=issuer)

    response = post_chat(client, token)

    assert response.status_code == 503
    assert response.get_json()["code"] == "auth_unavailable"
    assert not dify.called


def test_hs256_token_still_works_while_the_jwks_cannot_be_fetched(
    unreachable_jwks_url: str, dify: Any
) -> None:
    client = make_client(supabase_jwt_secret=tokens.SECRET, supabase_url=unreachable_jwks_url)
    token = tokens.hs256(iss=f"{unreachable_jwks_url}/auth/v1")
    assert_reached_dify(post_chat(client, token), dify)


def test_jwks_endpoint_answering_a_non_json_page_gives_503(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    """An edge or captive portal answering 200 with HTML: the keys are unavailable, not the
    caller's fault, and certainly not a 500 with a traceback."""
    jwks_server.body = b"<html><body>Service temporarily unavailable</body></html>"
    response = post_chat(client, mint.es256())
    assert response.status_code == 503
    assert response.get_json()["code"] == "auth_unavailable"
    assert not dify.called


def test_signing_key_token_is_rejected_when_the_project_publishes_no_keys(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    """A legacy-only project answers `{"keys": []}`: no key can vouch for an ES256 token."""
    jwks_server.keys = []
    assert_unauthorized(post_chat(client, mint.es256()))
    assert not dify.called


def test_empty_jwks_is_not_refetched_for_every_token(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    """Else anyone can make the proxy call Supabase once per request with made-up ES256 tokens."""
    jwks_server.keys = []
    for _ in range(5):
        post_chat(client, mint.es256())
    assert jwks_server.fetches <= 2  # the first fetch and at most one refetch in the cooldown
    assert not dify.called


class FakeClock:
    """`time.monotonic` for the proxy's back-off and PyJWT's cache, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    for module in (auth, jwt.api_jwk, jwt.jwks_client, jwt.jwk_set_cache):
        monkeypatch.setattr(module, "time", fake)
    return fake


def test_every_signing_key_request_gets_503_while_the_jwks_is_down(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any
) -> None:
    """The back-off must repeat the outage's 503, never turn it into a 401: a front end
    signs its user out on a 401."""
    jwks_server.status = 500
    for token in (mint.es256(), mint.rs256(), mint.es256()):
        response = post_chat(client, token)
        assert response.status_code == 503
        assert response.get_json()["code"] == "auth_unavailable"
    assert jwks_server.fetches == 1
    assert not dify.called


def test_signing_keys_work_again_once_the_back_off_ends_and_the_jwks_is_back(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any, clock: FakeClock
) -> None:
    jwks_server.status = 500
    assert post_chat(client, mint.es256()).status_code == 503
    jwks_server.status = 200
    clock.now += auth.JWKS_FAILURE_BACKOFF_SECONDS - 0.1
    assert post_chat(client, mint.es256()).status_code == 503  # still backing off
    clock.now += 0.1

    assert_reached_dify(post_chat(client, mint.es256()), dify)
    assert jwks_server.fetches == 2


def test_a_jwks_outage_is_logged_as_an_error(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.status = 500
    with caplog.at_level(logging.ERROR, logger="dify_proxy.auth"):
        post_chat(client, mint.es256())
    assert [r.getMessage() for r in caplog.records if r.name == "dify_proxy.auth"] == [
        "could not fetch the Supabase JWKS"
    ]


def test_the_jwks_is_kept_for_ten_minutes_then_fetched_again(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, clock: FakeClock
) -> None:
    assert post_chat(client, mint.es256()).status_code == 200
    clock.now += 599
    assert post_chat(client, mint.es256()).status_code == 200
    assert jwks_server.fetches == 1
    clock.now += 2
    assert post_chat(client, mint.es256()).status_code == 200
    assert jwks_server.fetches == 2


def test_the_jwks_fetch_gives_up_within_ten_seconds(
    client: FlaskClient, mint: Mint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Supabase that accepts the connection and never answers must not hold a worker."""
    timeouts = []
    real_open = urllib.request.OpenerDirector.open

    def open_and_note_timeout(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        timeouts.append(kwargs.get("timeout", args[1] if len(args) > 1 else None))
        return real_open(self, request, *args, **kwargs)

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", open_and_note_timeout)
    assert post_chat(client, mint.es256()).status_code == 200
    assert len(timeouts) == 1
    assert isinstance(timeouts[0], (int, float)) and 0 < timeouts[0] <= 10


def test_the_jwks_fetch_names_dify_proxy_not_python_urllib(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer
) -> None:
    """Edges in front of Supabase may refuse urllib's default User-Agent as a bot."""
    assert post_chat(client, mint.es256()).status_code == 200
    assert jwks_server.user_agents == ["dify-proxy"]


def test_unauthorized_and_unavailable_messages_are_sentences(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer
) -> None:
    assert is_a_sentence(post_chat(client, "not-a-token").get_json()["message"])
    jwks_server.status = 500
    assert is_a_sentence(post_chat(client, mint.es256()).get_json()["message"])


def test_more_than_one_space_after_bearer_is_accepted(
    client: FlaskClient, mint: Mint, dify: Any
) -> None:
    """RFC 6750's grammar is `Bearer 1*SP token`."""
    response = client.post(
        "/api/chat", json=BODY, headers={"Authorization": f"Bearer   {mint.hs256()}"}
    )
    assert_reached_dify(response, dify)


# --- tokens stay secret --------------------------------------------------------------------

SHOWN_TOKENS: list[Any] = [
    pytest.param(lambda m: m.hs256(), id="valid HS256"),
    pytest.param(lambda m: m.es256(), id="valid ES256"),
    pytest.param(lambda m: m.hs256(iat=now() - 3700, exp=now() - 60), id="expired"),
    pytest.param(
        lambda m: m.hs256(secret="another-secret-that-is-also-32-bytes-long!"), id="wrong secret"
    ),
    pytest.param(lambda m: m.es256(kid="unknown-kid"), id="unknown kid"),
    pytest.param(lambda m: tokens.unsigned(iss=m.issuer), id="alg none"),
    pytest.param(lambda m: "garbage-token-text-0123456789", id="garbage"),
]


def secret_parts(token: str) -> list[str]:
    """The token and its payload and signature segments (the header is not secret)."""
    return [token, *(part for part in token.split(".")[1:] if len(part) >= 16)]


@pytest.mark.parametrize("make_token", SHOWN_TOKENS)
def test_token_text_never_appears_in_a_response_or_the_logs(
    jwks_server: JwksServer,
    mint: Mint,
    dify: Any,
    caplog: pytest.LogCaptureFixture,
    make_token: Callable[[Mint], str],
) -> None:
    client = make_client(
        supabase_jwt_secret=tokens.SECRET, supabase_url=jwks_server.url, log_level="DEBUG"
    )
    caplog.set_level(logging.DEBUG)
    token = make_token(mint)

    with post_chat(client, token) as response:
        body = response.get_data(as_text=True)
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)

    assert any(record.name == "dify_proxy.access" for record in caplog.records)
    for part in secret_parts(token):
        assert part not in body
        assert part not in logged
        assert part not in str(response.headers)


@pytest.mark.parametrize("body", [b"[]", b'"keys"', b"null", b"42"])
def test_jwks_answering_json_that_is_not_an_object_gives_503_and_backs_off(
    client: FlaskClient, mint: Mint, jwks_server: JwksServer, dify: Any, body: bytes
) -> None:
    """Issue 11, item 12: the keys are unavailable (503, not 401 for a valid token), and made-up
    tokens do not make the proxy refetch on every request."""
    jwks_server.body = body
    responses = [post_chat(client, mint.es256()) for _ in range(5)]
    assert [r.status_code for r in responses] == [503] * 5
    assert responses[0].get_json()["code"] == "auth_unavailable"
    assert jwks_server.fetches == 1
    assert not dify.called
