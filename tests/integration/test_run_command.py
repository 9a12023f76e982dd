"""The README's run command, with no Dify account: it must stream a reply from the stand-in."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import requests

from tests.support import processes
from tests.support.sse_client import read_stream


def test_without_a_dify_key_the_run_command_streams_from_the_stand_in_with_the_printed_curl():
    port = processes.free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PORT": str(port),
        "DIFY_API_KEY": "",
    }
    dev = subprocess.Popen(
        [sys.executable, "-m", "dify_proxy.dev"],
        cwd=processes.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        printed = ""
        while "-d '" not in printed:
            line = dev.stdout.readline()
            assert line, f"the run command printed no curl: {printed!r}"
            printed += line
        token = re.search(r"Bearer ([\w.-]+)'", printed).group(1)
        assert f"http://127.0.0.1:{port}/api/chat" in printed

        processes.wait_until_up(f"http://127.0.0.1:{port}/healthz", dev)
        response = requests.post(
            f"http://127.0.0.1:{port}/api/chat",
            stream=True,
            timeout=30,
            json={"message": "Hello there"},
            headers={"Authorization": f"Bearer {token}"},
        )
        received = read_stream(response)
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(timeout=20)

    events = received.data()
    assert [e["event"] for e in events][-1] == "message_end"
    answer = "".join(e["answer"] for e in events if e["event"] == "message")
    assert answer.startswith("You said: Hello there.")
    assert len(events) > 5  # word by word, not one blob
