"""The README's run command, with no Dify account: it must stream a reply from the stand-in,
and give away nothing that works beyond this machine and this run."""

from __future__ import annotations

import re
import socket

import jwt
import pytest
import requests

from tests.support import processes
from tests.support.sse_client import read_stream


def test_without_a_dify_key_the_run_command_streams_from_the_stand_in_with_the_printed_curl():
    port = processes.free_port()
    with processes.run_command(port) as (_, printed):
        token = re.search(r"Bearer ([\w.-]+)'", printed).group(1)
        assert f"http://127.0.0.1:{port}/api/chat" in printed
        response = requests.post(
            f"http://127.0.0.1:{port}/api/chat",
            stream=True,
            timeout=30,
            json={"message": "Hello there"},
            headers={"Authorization": f"Bearer {token}"},
        )
        received = read_stream(response)

    events = received.data()
    assert [e["event"] for e in events][-2:] == ["message_end", "workflow_finished"]
    answer = "".join(e["answer"] for e in events if e["event"] == "message")
    assert answer.startswith("You said: Hello there.")
    assert len(events) > 5  # word by word, not one blob


# Another loopback address: a listener bound to 127.0.0.1 refuses it, one bound to 0.0.0.0 (every
# interface, so the network too) accepts it.
OTHER_ADDRESS = "127.0.0.2"


def test_with_a_real_supabase_secret_the_stand_in_mode_gives_no_token_supabase_would_accept():
    real_secret = "the-projects-real-supabase-jwt-secret-0123456789"
    port = processes.free_port()
    env = {"DIFY_API_KEY": "", "SUPABASE_JWT_SECRET": real_secret}
    with processes.run_command(port, env=env) as (_, printed):
        printed_token = re.search(r"Bearer ([\w.-]+)'", printed).group(1)
        served = requests.post(f"http://127.0.0.1:{port}/demo/dev-token", timeout=10)
        served_token = served.json()["access_token"]
        for token in (printed_token, served_token):
            session = requests.post(
                f"http://127.0.0.1:{port}/api/chat",
                json={"message": "Hello there", "response_mode": "blocking"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert session.status_code == 200  # the token works here...
            with pytest.raises(jwt.InvalidSignatureError):  # ...and nowhere else
                jwt.decode(token, real_secret, algorithms=["HS256"], audience="authenticated")


def test_the_stand_in_mode_listens_on_loopback_only():
    port = processes.free_port()
    with processes.run_command(port) as (_, printed):
        assert "listen: 127.0.0.1 only" in printed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((OTHER_ADDRESS, port), timeout=10).close()


def test_the_stand_in_mode_listens_on_every_interface_when_told_to():
    port = processes.free_port()
    with processes.run_command(port, args=("--host", "0.0.0.0")) as (_, printed):
        assert "listen: 0.0.0.0" in printed
        socket.create_connection((OTHER_ADDRESS, port), timeout=10).close()
