"""The README's run command: the real proxy under gunicorn, exactly as the Procfile starts it.

With DIFY_API_KEY set (environment or `.env`) it runs against that Dify. Without it, a newcomer
still sees tokens stream: the local Dify stand-in is started on a free port, the proxy is pointed
at it with a throwaway key and JWT secret, and a `curl` with a valid short-lived dev token is
printed. Nothing here is used in production.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid

import jwt
from dotenv import load_dotenv

DEV_USER_ID = "00000000-0000-4000-8000-000000000001"
DEV_TOKEN_SECONDS = 3600


def mint_dev_token(secret: str, sub: str = DEV_USER_ID, ttl: int = DEV_TOKEN_SECONDS) -> str:
    """A Supabase-shaped user access token signed with the dev secret."""
    now = int(time.time())
    claims = {
        "aud": "authenticated",
        "role": "authenticated",
        "sub": sub,
        "session_id": str(uuid.uuid4()),
        "email": "dev@localhost",
        "iat": now,
        "exp": now + ttl,
        "is_anonymous": False,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def start_standin(api_key: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dify_proxy.standin", "--port", "0", "--api-key", api_key],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline() if process.stdout else ""
    if not line.startswith("READY "):
        process.kill()
        sys.exit("dify-proxy: the Dify stand-in did not start")
    return process, line.split()[1]


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "app:app", "--config", "gunicorn.conf.py"]


def main() -> None:
    load_dotenv(override=False)
    if os.environ.get("DIFY_API_KEY", "").strip():
        os.execv(sys.executable, gunicorn_command())

    key = f"app-standin-{secrets.token_hex(12)}"
    standin, url = start_standin(key)
    os.environ.update(DIFY_API_URL=url, DIFY_API_KEY=key, ENABLE_DEMO="1", DEV_TOKENS="1")
    os.environ.setdefault("SUPABASE_JWT_SECRET", secrets.token_urlsafe(32))
    port = os.environ.setdefault("PORT", "8000")
    token = mint_dev_token(os.environ["SUPABASE_JWT_SECRET"])
    print(
        f"""
No DIFY_API_KEY set: running against the local Dify stand-in at {url}.
Put DIFY_API_KEY and SUPABASE_JWT_SECRET (or SUPABASE_URL) in .env to use your real Dify app.

Try it (the dev token is valid for an hour):

  curl -N http://127.0.0.1:{port}/api/chat \\
    -H 'Authorization: Bearer {token}' \\
    -H 'Content-Type: application/json' \\
    -d '{{"message": "Hello there"}}'

Or chat in a browser: http://127.0.0.1:{port}/demo
""",
        flush=True,
    )
    proxy = subprocess.Popen(gunicorn_command())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: proxy.send_signal(s))
    try:
        code = proxy.wait()
    finally:
        standin.terminate()
        standin.wait(timeout=10)
    sys.exit(code)


if __name__ == "__main__":
    main()
