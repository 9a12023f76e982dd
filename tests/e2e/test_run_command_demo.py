"""The README's run command, with no Dify account: the demo address it prints works in a browser,
with a token from the dev-token helper and nothing typed but the question."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from tests.e2e.conftest import DemoPage
from tests.support import processes


def test_the_run_command_prints_a_demo_page_that_chats_with_a_dev_token(context):
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
        while "/demo" not in printed:
            line = dev.stdout.readline()
            assert line, f"the run command printed no demo address: {printed!r}"
            printed += line
        url = re.search(r"http://\S+/demo", printed).group(0)
        assert url == f"http://127.0.0.1:{port}/demo"
        processes.wait_until_up(f"http://127.0.0.1:{port}/healthz", dev)

        demo_page = DemoPage.new(context)
        demo_page.page.goto(url)  # redirects to /demo/
        demo_page.page.wait_for_selector("body[data-ready]")
        assert demo_page.page.input_value("#token").count(".") == 2  # a JWT from the helper
        demo_page.page.fill("#message", "Hello there")
        demo_page.page.click("#send")
        assert demo_page.wait_until("done", "error") == ("done", "done")
        assert demo_page.answer().startswith("You said: Hello there.")
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(timeout=20)
