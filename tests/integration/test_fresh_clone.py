"""From a fresh `git clone`, as a new user (or Heroku) gets it: the Procfile under honcho with a
`.env` made from `.env.example`, and the run command with `.env.example` copied as it is."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dotenv import dotenv_values

from dify_proxy import dev
from tests.integration.conftest import DIFY_KEY
from tests.support import processes, tokens
from tests.support.jwks import JwksServer
from tests.support.sse_client import read_stream

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The committed HEAD, cloned; the demo's packages borrowed from this checkout."""
    path = tmp_path_factory.mktemp("fresh") / "dify-proxy"
    subprocess.run(["git", "clone", "--quiet", str(processes.ROOT), str(path)], check=True)
    node_modules = processes.ROOT / "frontend" / "node_modules"
    if node_modules.is_dir():
        (path / "frontend" / "node_modules").symlink_to(node_modules)
    return path


@pytest.fixture
def jwks() -> Iterator[tuple[JwksServer, object]]:
    key = tokens.new_ec_key()
    with JwksServer([tokens.jwk(key, "key-1")]) as server:
        yield server, key


def filled_in(env_example: str, values: dict[str, str]) -> str:
    """.env.example with the given variables' lines set (commented or not), the rest as is."""
    lines = []
    for line in env_example.splitlines():
        match = re.match(r"^(?:# )?([A-Z][A-Z0-9_]*)=", line)
        if match and match.group(1) in values:
            line = f"{match.group(1)}={values[match.group(1)]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def real_values(standin_url: str, jwks_url: str, secret: str) -> dict[str, str]:
    return {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": standin_url,
        "SUPABASE_JWT_SECRET": secret,
        "SUPABASE_URL": jwks_url,
    }


def ask(base: str, token: str) -> list[dict]:
    response = requests.post(
        f"{base}/api/chat",
        json={"message": "Hello there"},
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=30,
    )
    assert response.status_code == 200
    return read_stream(response).data()


def test_a_fresh_clone_with_a_filled_in_env_streams_a_reply_under_honcho(
    clone, standin, jwks, tmp_path
):
    server, key = jwks
    secret = secrets.token_urlsafe(32)  # 43 characters, like a real project's secret
    values = real_values(standin.url, server.url, secret)
    env_file = clone / ".env"
    env_file.write_text(filled_in((clone / ".env.example").read_text(), values))
    assert dev.placeholders(dotenv_values(env_file)) == []
    port = processes.free_port()
    with open(tmp_path / "honcho.log", "wb") as log:
        honcho = subprocess.Popen(
            [str(VENV_BIN / "honcho"), "start", "--no-colour", "--port", str(port), "web"],
            cwd=clone,
            env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": str(tmp_path)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        processes.wait_until_up(f"{base}/readyz", honcho, seconds=60)
        es256 = tokens.signed(key, "key-1", iss=f"{server.url}/auth/v1")
        by_jwks = ask(base, es256)
        by_secret = ask(base, tokens.hs256(secret, iss=f"{server.url}/auth/v1"))
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(timeout=30)

    for events in (by_jwks, by_secret):
        assert [e["event"] for e in events][-2:] == ["message_end", "workflow_finished"]
        answer = "".join(e["answer"] for e in events if e["event"] == "message")
        assert answer.startswith("You said: Hello there.")
    log_text = (tmp_path / "honcho.log").read_text(errors="replace")
    assert "web.1" in log_text  # honcho ran the Procfile's web process
    assert DIFY_KEY not in log_text and secret not in log_text


def test_the_run_command_with_env_example_copied_as_is_runs_the_stand_in_and_says_why(clone):
    (clone / ".env").write_text((clone / ".env.example").read_text())
    port = processes.free_port()

    with processes.run_command(port, root=clone, env={}) as (_, printed):
        token = re.search(r"Bearer ([\w.-]+)'", printed).group(1)
        events = ask(f"http://127.0.0.1:{port}", token)

    assert "mode:  the local Dify stand-in (DIFY_API_KEY in .env is still the placeholder" in (
        printed
    )
    assert (
        ".env:  still placeholders, ignored for this run: SUPABASE_JWT_SECRET, SUPABASE_URL"
        in printed
    )
    assert f"demo:  http://127.0.0.1:{port}/demo" in printed
    assert [e["event"] for e in events][-2:] == ["message_end", "workflow_finished"]


def test_the_run_command_with_real_values_says_real_dify_and_how_sessions_are_checked(
    clone, standin, jwks
):
    server, _ = jwks
    secret = secrets.token_urlsafe(32)
    values = real_values(standin.url, server.url, secret)
    (clone / ".env").write_text(filled_in((clone / ".env.example").read_text(), values))
    port = processes.free_port()

    with processes.run_command(port, root=clone, env={}, last="demo:") as (_, printed):
        pass

    assert "mode:  real Dify (DIFY_API_KEY is set)" in printed
    assert f"Dify:  {standin.url}" in printed
    assert "auth:  HS256 tokens with SUPABASE_JWT_SECRET and ES256/RS256 tokens with" in printed
    assert "demo:  off (ENABLE_DEMO=1 turns it on)" in printed
    assert DIFY_KEY not in printed and secret not in printed


def test_the_run_command_refuses_real_dify_while_other_values_are_placeholders(clone, standin):
    values = {"DIFY_API_KEY": DIFY_KEY, "DIFY_API_URL": standin.url}
    (clone / ".env").write_text(filled_in((clone / ".env.example").read_text(), values))

    result = subprocess.run(
        [sys.executable, "-m", "dify_proxy.dev"],
        cwd=clone,
        env={"PATH": os.environ["PATH"], "PORT": str(processes.free_port())},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1
    assert (
        "still has placeholders from .env.example: SUPABASE_JWT_SECRET, SUPABASE_URL"
        in result.stderr
    )
