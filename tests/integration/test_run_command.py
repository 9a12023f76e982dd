"""The README's run command, with no Dify account: it must stream a reply from the stand-in."""

from __future__ import annotations

import re

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
