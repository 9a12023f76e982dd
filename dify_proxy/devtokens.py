"""Dev tokens: Supabase-shaped sessions for a fixed dev user, for the local stand-in only.

They are signed with DEV_TOKEN_SECRET, never with SUPABASE_JWT_SECRET: a token the proxy hands
out to whoever asks must not be one that Supabase (or anything else trusting the project's
secret) would accept. Their key id tells the verifier to check them with the dev secret only.
"""

from __future__ import annotations

import time
import uuid

import jwt

DEV_USER_ID = "00000000-0000-4000-8000-000000000001"
DEV_TOKEN_SECONDS = 3600
DEV_KEY_ID = "dify-proxy-dev"  # the `kid` of a dev token, and its `iss`


def mint(secret: str, sub: str = DEV_USER_ID, ttl: int = DEV_TOKEN_SECONDS) -> str:
    """A short-lived user access token signed with the dev secret."""
    now = int(time.time())
    claims = {
        "iss": DEV_KEY_ID,
        "aud": "authenticated",
        "role": "authenticated",
        "sub": sub,
        "session_id": str(uuid.uuid4()),
        "email": "dev@localhost",
        "iat": now,
        "exp": now + ttl,
        "is_anonymous": False,
    }
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": DEV_KEY_ID})
