"""The README's run command, with no Dify account: the demo address it prints works in a browser,
with a token from the dev-token helper and nothing typed but the question."""

from __future__ import annotations

import re

from tests.e2e.conftest import DemoPage
from tests.support import processes


def test_the_run_command_prints_a_demo_page_that_chats_with_a_dev_token(context):
    port = processes.free_port()
    with processes.run_command(port) as (_, printed):
        url = re.search(r"http://\S+/demo", printed).group(0)
        assert url == f"http://127.0.0.1:{port}/demo"

        demo_page = DemoPage.new(context)
        demo_page.page.goto(url)  # redirects to /demo/
        demo_page.page.wait_for_selector("body[data-ready]")
        assert demo_page.page.input_value("#token").count(".") == 2  # a JWT from the helper
        demo_page.page.fill("#message", "Hello there")
        demo_page.page.click("#send")
        assert demo_page.wait_until("done", "error") == ("done", "done")
        assert demo_page.answer().startswith("You said: Hello there.")


def test_the_run_command_demo_pauses_for_a_form_when_asked_to(context):
    """A newcomer's way to a paused answer: the page's "Pause for a form" switch."""
    port = processes.free_port()
    with processes.run_command(port) as (_, printed):
        url = re.search(r"http://\S+/demo", printed).group(0)

        demo_page = DemoPage.new(context)
        demo_page.page.goto(url)
        demo_page.page.wait_for_selector("body[data-ready]")
        demo_page.page.check("#pause")
        demo_page.page.fill("#message", "May I?")
        demo_page.page.click("#send")
        assert demo_page.wait_until("paused", "done", "error")[0] == "paused"
        demo_page.answer_form("yes you may")
        assert demo_page.wait_until("done", "error") == ("done", "done")
        assert demo_page.answer() == "Approved: yes you may"
