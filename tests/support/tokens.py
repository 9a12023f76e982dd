"""Supabase-shaped tokens for tests: real signatures, real claims, one knob per variation."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "test-jwt-secret-that-is-at-least-32-bytes-long"
USER_ID = "0b7e6f58-3c1e-4a4b-9d55-2f4f0b1f6a11"


def claims(**overrides: Any) -> dict[str, Any]:
    """A logged-in user's access token claims, as Supabase Auth issues them."""
    now = int(time.time())
    base: dict[str, Any] = {
        "aud": "authenticated",
        "exp": now + 3600,
        "iat": now,
        "sub": USER_ID,
        "email": "user@example.com",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def app_metadata(plan: Any) -> dict[str, Any]:
    """Server-set metadata carrying a plan, where PLAN_CLAIM looks by default."""
    return {"provider": "email", "providers": ["email"], "plan": plan}


def on_plan(plan: Any, secret: str = SECRET, **overrides: Any) -> str:
    """A user's token with `plan` in app_metadata (as an admin, or an access token hook, sets)."""
    return hs256(secret, app_metadata=app_metadata(plan), **overrides)


def anon_key(secret: str = SECRET, role: str = "anon") -> str:
    """The project's anon/service_role API key: validly signed, but not a user session."""
    now = int(time.time())
    payload = {
        "iss": "supabase",
        "ref": "abcdefghij",
        "role": role,
        "iat": now,
        "exp": now + 10 * 365 * 86400,
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private_key: Any, kid: str) -> dict[str, Any]:
    """The public half as Supabase publishes it in its JWKS."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        data["alg"] = "ES256"
    else:
        data = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        data["alg"] = "RS256"
    data.update(kid=kid, use="sig", key_ops=["verify"])
    return data


def signed(private_key: Any, kid: str, alg: str = "ES256", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), private_key, algorithm=alg, headers={"kid": kid})


def unsigned(**overrides: Any) -> str:
    """alg=none: the classic forgery."""
    return jwt.encode(claims(**overrides), None, algorithm="none")
