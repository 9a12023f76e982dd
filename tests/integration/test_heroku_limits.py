"""Heroku's router limits that reach the proxy: what passes the router must pass gunicorn."""

from __future__ import annotations

import json

import requests

from tests.support import tokens
from tests.support.sse_client import read_stream


def test_a_get_question_as_long_as_the_routers_request_line_limit_is_streamed(proxy):
    # About 7.1 KB of request line: over gunicorn's default 4094 bytes, under Heroku's 8192.
    inputs = json.dumps({"notes": "x" * 7000})
    response = requests.get(
        f"{proxy.url}/api/chat",
        params={"message": "hi", "inputs": inputs},
        headers={"Authorization": f"Bearer {tokens.hs256()}"},
        stream=True,
        timeout=30,
    )

    assert response.status_code == 200
    assert read_stream(response).kinds()[-2:] == ["message_end", "workflow_finished"]
