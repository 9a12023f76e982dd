"""Supabase session checks, done locally so a chat request costs no call to Supabase.

The token's header only chooses which configured key to try; the algorithm is then pinned to
that key (HS256 for the legacy secret, the JWK's own algorithm for signing keys), so `none`,
HS384 or a public key used as an HMAC secret never verify. Signature alone is not enough: the
project's anon and service_role keys are validly signed too, hence the claim checks.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import jwt
from flask import current_app, g, request

from . import jsontext
from .devtokens import DEV_KEY_ID
from .errors import ApiError
from .settings import Settings

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 10
ASYMMETRIC_ALGORITHMS = ("ES256", "RS256")
JWKS_CACHE_SECONDS = 600  # Supabase's edge caches the JWKS for about as long
JWKS_REFETCH_COOLDOWN_SECONDS = 30  # an unknown kid refetches at most this often
JWKS_FAILURE_BACKOFF_SECONDS = 5  # after a failed or empty fetch, no new fetch for this long

F = TypeVar("F", bound=Callable[..., Any])


class InvalidSession(ApiError):
    def __init__(self, message: str = "Missing or invalid session.") -> None:
        super().__init__(
            401,
            "unauthorized",
            message,
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


class _JwksClient(jwt.PyJWKClient):
    """PyJWT reports a JWKS that is JSON but not an object (`[]`, `"x"`) with the same error
    class as an unknown kid; here it is a failed fetch, like an HTML page, so it backs off."""

    def fetch_data(self) -> Any:
        try:
            return super().fetch_data()
        except jwt.PyJWKClientConnectionError:
            raise
        except jwt.PyJWKClientError as exc:
            raise ValueError("the JWKS is not a JSON object") from exc


class Verifier:
    """Holds the keys for one app; built once at start-up (the JWKS itself is fetched lazily)."""

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.supabase_jwt_secret
        # A dev token (DEV_TOKENS) says so in its `kid` and is checked with the dev secret only.
        self.dev_secret = settings.dev_token_secret if settings.dev_tokens else None
        self.audience = settings.supabase_jwt_audience
        self.issuer = settings.jwt_issuer
        self.jwks = None
        if settings.jwks_url:
            self.jwks = _JwksClient(
                settings.jwks_url,
                lifespan=JWKS_CACHE_SECONDS,
                cooldown_duration=JWKS_REFETCH_COOLDOWN_SECONDS,
                headers={"User-Agent": "dify-proxy"},
                timeout=5,
            )
        # PyJWT's cooldown only starts after a fetch that found keys; a failed or empty fetch
        # is remembered here, so forged tokens cannot make us call Supabase on every request.
        self._jwks_backoff_until = 0.0
        self._jwks_backoff_error: ApiError | None = None

    def _key_for(self, token: str) -> tuple[Any, str, str | None]:
        """The key, algorithm and issuer to check `token` with."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidSession() from None
        alg = header.get("alg")
        if alg == "HS256" and self.dev_secret and header.get("kid") == DEV_KEY_ID:
            return self.dev_secret, alg, DEV_KEY_ID
        if alg == "HS256" and self.secret:
            return self.secret, alg, self.issuer
        if alg in ASYMMETRIC_ALGORITHMS and self.jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str):
                raise InvalidSession()
            jwk = self._signing_key(kid)
            if jwk.algorithm_name != alg:
                raise InvalidSession()
            return jwk.key, alg, self.issuer
        raise InvalidSession()

    def _signing_key(self, kid: str) -> jwt.PyJWK:
        if time.monotonic() < self._jwks_backoff_until:
            raise self._jwks_backoff_error or InvalidSession()
        try:
            return self.jwks.get_signing_key(kid)
        except jwt.PyJWKSetError:  # a legacy-only project publishes {"keys": []}
            error: ApiError = InvalidSession()
        except (jwt.PyJWKClientConnectionError, ValueError):  # down, or an HTML page
            log.error("could not fetch the Supabase JWKS")
            error = ApiError(
                503, "auth_unavailable", "Session keys are unavailable; try again shortly."
            )
        except jwt.PyJWKClientError:  # unknown kid, within PyJWT's own cooldown
            raise InvalidSession() from None
        self._jwks_backoff_until = time.monotonic() + JWKS_FAILURE_BACKOFF_SECONDS
        self._jwks_backoff_error = error
        raise error

    def verify(self, token: str) -> dict[str, Any]:
        """Return the claims of a real user session, or raise `InvalidSession`."""
        key, alg, issuer = self._key_for(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.InvalidTokenError:
            raise InvalidSession() from None
        sub = claims.get("sub")
        if claims.get("role") != "authenticated" or not isinstance(sub, str) or not sub:
            raise InvalidSession()
        return claims


def bearer_token() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def cookie_token(cookies: Mapping[str, str], name: str) -> str | None:
    """The access token in `@supabase/ssr`'s session cookie, whole or split into `.0`, `.1`...

    Anything that does not decode is "no session": malformed cookies must not crash a server.
    """
    value = cookies.get(name)
    if value is None:
        chunks = []
        for i in itertools.count():
            chunk = cookies.get(f"{name}.{i}")
            if chunk is None:
                break
            chunks.append(chunk)
        value = "".join(chunks)
    if not value:
        return None
    try:
        if value.startswith("base64-"):
            encoded = value.removeprefix("base64-")
            text = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        else:
            text = unquote(value)
        session = jsontext.loads(text)
    except (ValueError, binascii.Error):
        return None
    if isinstance(session, dict):  # @supabase/ssr: the session object
        token = session.get("access_token")
    elif isinstance(session, list) and session:  # old auth-helpers: [access, refresh, ...]
        token = session[0]
    else:
        return None
    return token if isinstance(token, str) and token else None


def _check_cookie_origin() -> None:
    """A cookie rides along on any same-site request, so it only counts from a page we trust."""
    origin = request.headers.get("Origin")
    if origin is None and request.referrer:
        try:
            parts = urlsplit(request.referrer)
        except ValueError:  # e.g. "http://[": no origin can be read from it
            parts = None
        if parts is not None:
            origin = f"{parts.scheme}://{parts.netloc}"
    allowed = current_app.config["SETTINGS"].cors_origins
    if origin is None or (origin not in allowed and origin != request.host_url.rstrip("/")):
        raise ApiError(
            403, "forbidden", "A cookie session is only accepted from an allowed origin."
        )


def session_token() -> str | None:
    """An `Authorization` header wins over a cookie, even a bad one: no silent fallback."""
    if "Authorization" in request.headers:
        return bearer_token()
    cookie_name = current_app.config["SETTINGS"].supabase_auth_cookie
    token = cookie_token(request.cookies, cookie_name) if cookie_name else None
    if token is not None:
        _check_cookie_origin()
    return token


def plan_in(claims: Mapping[str, Any], path: str) -> str | None:
    """The plan at the dotted `path` of verified claims, lower-cased; None when any step is
    missing or the value is not a non-blank string (the user then gets the variables' limits).
    """
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


def require_session(view: F) -> F:
    """Like flaskr's `login_required`: the view runs only with verified claims on `g.claims`,
    and the user's plan (from those claims alone) on `g.plan`."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = session_token()
        if token is None:
            raise InvalidSession()
        g.claims = current_app.extensions["dify_proxy.verifier"].verify(token)
        g.user_id = g.claims["sub"]
        g.plan = plan_in(g.claims, current_app.config["SETTINGS"].plan_claim)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
