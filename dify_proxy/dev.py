"""The README's run command: the real proxy under gunicorn, exactly as the Procfile starts it.

With DIFY_API_KEY set (environment or `.env`) it runs against that Dify. Without it, or while
it is still .env.example's placeholder, a newcomer still sees tokens stream: the local Dify
stand-in is started on a free port, the proxy is pointed at it with a throwaway key and a dev
token secret made for this run, and a `curl` with a valid short-lived dev token is printed.
Either way it first prints which of the two it is doing, the Dify URL, how sessions are checked
and where /demo is, so that `cp .env.example .env` never switches modes silently. Nothing here
is used in production.

The stand-in mode hands a token to anyone who asks (`POST /demo/dev-token`), so it listens on
loopback only unless `--host` says otherwise, and its tokens are never signed with a secret
that verifies real sessions (see devtokens.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from dotenv import load_dotenv

from . import demo, devtokens
from .settings import ConfigError, Settings, load_settings
from .variables import VARIABLES

STANDIN_HOST = "127.0.0.1"  # where the stand-in mode listens unless --host says otherwise


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


def gunicorn_command(host: str | None = None) -> list[str]:
    """gunicorn as the Procfile runs it; with `host`, listening there instead of on 0.0.0.0."""
    command = [sys.executable, "-m", "gunicorn", "app:app", "--config", "gunicorn.conf.py"]
    if host is not None:
        port = os.environ.get("PORT", "8000")
        command += ["--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    return command


PLACEHOLDER = "your-"  # every placeholder in .env.example contains it


def placeholders(environ: Mapping[str, str]) -> list[str]:
    """Variables still holding their placeholder from .env.example (`cp .env.example .env`)."""
    return [
        v.name
        for v in VARIABLES
        if v.example and PLACEHOLDER in v.example and environ.get(v.name, "").strip() == v.example
    ]


def shown_url(url: str) -> str:
    """The URL without user, password, query or fragment: nothing secret is printed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def auth_mode(settings: Settings) -> str:
    modes = []
    if settings.supabase_jwt_secret:
        modes.append("HS256 tokens with SUPABASE_JWT_SECRET")
    if settings.jwks_url:
        modes.append(f"ES256/RS256 tokens with the JWKS at {shown_url(settings.jwks_url)}")
    if settings.dev_tokens:
        modes.append("dev tokens signed with this run's own secret")
    return " and ".join(modes)


def demo_line(settings: Settings, base: str) -> str:
    if not settings.enable_demo:
        return "off (ENABLE_DEMO=1 turns it on)"
    if not demo.packages_installed():
        return "off: its browser packages are missing (scripts/setup installs them; needs npm)"
    return f"{base}/demo"


def listen_line(host: str | None) -> str:
    if host is None:
        return "every interface (0.0.0.0, as the Procfile)"
    if host == STANDIN_HOST:
        return f"{host} only (scripts/run --host 0.0.0.0 opens it to the network)"
    return host


def banner(
    settings: Settings,
    port: str,
    standin_reason: str | None,
    ignored: list[str],
    host: str | None = None,
) -> str:
    """What the run command is about to do, in a few lines (never a key or a secret)."""
    base = f"http://127.0.0.1:{port}"
    if standin_reason:
        mode = f"the local Dify stand-in ({standin_reason})"
    else:
        mode = "real Dify (DIFY_API_KEY is set)"
    lines = [
        f"dify-proxy on {base}",
        f"  mode:  {mode}",
        f"  listen: {listen_line(host)}",
        f"  Dify:  {shown_url(settings.dify_api_url)}",
        f"  auth:  {auth_mode(settings)}",
        f"  demo:  {demo_line(settings, base)}",
    ]
    if ignored:
        lines.append(f"  .env:  still placeholders, ignored for this run: {', '.join(ignored)}")
    return "\n".join(lines)


def _settings_or_exit(standin: subprocess.Popen | None = None) -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        if standin is not None:
            standin.terminate()
        sys.exit(f"dify-proxy: configuration error: {exc}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        help="address to listen on (default: 127.0.0.1 with the stand-in, where anyone who can "
        "reach the port gets a dev token; 0.0.0.0 with a real Dify, as the Procfile)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    host = parse_args(argv).host
    load_dotenv(override=False)
    port = os.environ.setdefault("PORT", "8000")
    stale = placeholders(os.environ)
    if os.environ.get("DIFY_API_KEY", "").strip() and "DIFY_API_KEY" not in stale:
        if stale:
            sys.exit(
                f"dify-proxy: .env still has placeholders from .env.example: {', '.join(stale)}."
                " Put in your project's values, or delete the lines you do not use."
            )
        print(banner(_settings_or_exit(), port, None, [], host), flush=True)
        os.execv(sys.executable, gunicorn_command(host))

    if "DIFY_API_KEY" in stale:
        reason = "DIFY_API_KEY in .env is still the placeholder from .env.example"
    else:
        reason = "no DIFY_API_KEY is set"
    # An empty value, not a missing one: gunicorn's own read of .env must not bring them back.
    os.environ.update(dict.fromkeys(stale, ""))
    key = f"app-standin-{secrets.token_hex(12)}"
    standin, url = start_standin(key)
    # A fresh dev secret per run, whatever .env holds: a real SUPABASE_JWT_SECRET keeps
    # verifying real sessions, and never signs a token this run gives away.
    dev_secret = secrets.token_urlsafe(32)
    os.environ.update(
        DIFY_API_URL=url,
        DIFY_API_KEY=key,
        ENABLE_DEMO="1",
        DEV_TOKENS="1",
        DEV_TOKEN_SECRET=dev_secret,
    )
    host = host or STANDIN_HOST
    token = devtokens.mint(dev_secret)
    settings = _settings_or_exit(standin)
    ignored = [name for name in stale if name != "DIFY_API_KEY"]
    print(
        f"""{banner(settings, port, reason, ignored, host)}

To use your real Dify app, put its DIFY_API_KEY and your project's SUPABASE_JWT_SECRET (or
SUPABASE_URL) in .env (see .env.example). Try it (the dev token is valid for an hour):

  curl -N http://127.0.0.1:{port}/api/chat \\
    -H 'Authorization: Bearer {token}' \\
    -H 'Content-Type: application/json' \\
    -d '{{"message": "Hello there"}}'
""",
        flush=True,
    )
    proxy = subprocess.Popen(gunicorn_command(host))
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
