"""Resumed answers in a real browser, with each SSE client: a connection cut mid-answer and a
page reloaded mid-answer both end with the whole answer on screen, once, and Dify asked once.

The cut is a real one: the page talks to the proxy through a TCP relay (`link`) that drops every
open connection at once, so the browser sees its stream reset and the proxy sees its client go.
"""

from __future__ import annotations

import json

from tests.e2e.conftest import FETCH, POLYFILL

# Numbered words, so that a repeated or a missing piece shows in the text.
WORDS = " ".join(f"w{n:02d}" for n in range(1, 17))
SLOW = {"text": WORDS, "interval": 0.3}  # about 5 s of answer, one word per event
QUICK = {"events": 3, "interval": 0.05}
RECONNECT_GRACE = 2.5  # s: past the polyfill's 1 s reconnect and fetch-event-source's 1 s retry
UNFINISHED = "dify-proxy-demo:unfinished"  # the page's sessionStorage key


def resumed(demo_page) -> list[str]:
    """The ids of the resumes the proxy answered with a stream (not a 204)."""
    return [
        event_id
        for request, event_id in demo_page.resumes()
        if (response := request.response()) and response.status == 200
    ]


# --- a cut mid-answer -----------------------------------------------------------------------


def check_a_cut_mid_answer_shows_the_whole_answer_once(demo_page, link, proxy, standin, transport):
    log_start = len(proxy.log())
    demo_page.open(link.url, transport).ask("cut me", **SLOW)
    shown = demo_page.wait_for_answer_text()
    assert link.cut() >= 1
    [call] = standin.chats()
    assert call["stream_end"] is None, "the cut must come while Dify is still streaming"
    assert 0 < len(shown) < len(WORDS)

    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)  # a client that asked again would do it within this

    assert demo_page.turns() == [("cut me", WORDS)]
    assert len(standin.chats()) == 1
    assert resumed(demo_page), "no resume after the cut: this test would prove nothing"
    assert "answer resumed" in proxy.log()[log_start:]


def test_a_cut_mid_answer_shows_the_whole_answer_once_with_the_eventsource_polyfill(
    demo_page, link, proxy, standin
):
    check_a_cut_mid_answer_shows_the_whole_answer_once(demo_page, link, proxy, standin, POLYFILL)


def test_a_cut_mid_answer_shows_the_whole_answer_once_with_fetch_event_source(
    demo_page, link, proxy, standin
):
    check_a_cut_mid_answer_shows_the_whole_answer_once(demo_page, link, proxy, standin, FETCH)


# --- a reload mid-answer --------------------------------------------------------------------


def check_a_reload_mid_answer_shows_the_whole_answer(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask("reload me", **SLOW)
    shown = demo_page.wait_for_answer_text()
    demo_page.reload()
    [call] = standin.chats()
    assert call["stream_end"] is None, "the reload must come while Dify is still streaming"
    assert 0 < len(shown) < len(WORDS)

    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)

    assert demo_page.turns() == [("reload me", WORDS)]
    assert len(standin.chats()) == 1
    first_resume, *_ = resumed(demo_page)
    assert first_resume.endswith("-0"), "the reloaded page must replay from the stream's start"


def test_a_reload_mid_answer_shows_the_whole_answer_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_reload_mid_answer_shows_the_whole_answer(demo_page, proxy, standin, POLYFILL)


def test_a_reload_mid_answer_shows_the_whole_answer_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_a_reload_mid_answer_shows_the_whole_answer(demo_page, proxy, standin, FETCH)


# --- a reload after the end -----------------------------------------------------------------


def check_a_reload_after_the_answer_ended_resumes_nothing(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(**QUICK)
    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)  # the polyfill's reconnect after the end, and its 204
    asked = len(demo_page.chat_requests())
    demo_page.reload()
    demo_page.pause(RECONNECT_GRACE)

    assert demo_page.turns() == []
    assert len(demo_page.chat_requests()) == asked
    assert demo_page.status() == ("idle", "idle")
    assert len(standin.chats()) == 1


def test_a_reload_after_the_answer_ended_resumes_nothing_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_reload_after_the_answer_ended_resumes_nothing(demo_page, proxy, standin, POLYFILL)


def test_a_reload_after_the_answer_ended_resumes_nothing_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_a_reload_after_the_answer_ended_resumes_nothing(demo_page, proxy, standin, FETCH)


# --- an answer the proxy cannot resume ------------------------------------------------------


def check_a_reload_with_an_answer_gone_from_the_record_says_so(
    demo_page, proxy, standin, transport
):
    """What a reload finds after the answer expired or was abandoned: the proxy's 204."""
    demo_page.open(proxy.url, transport)
    unknown = {"question": "long ago", "resumeFrom": "A" * 22 + "-0"}
    demo_page.page.evaluate(
        "([key, value]) => sessionStorage.setItem(key, value)", [UNFINISHED, json.dumps(unknown)]
    )
    demo_page.reload()
    state, text = demo_page.wait_until("done", "error")
    demo_page.pause(RECONNECT_GRACE)

    assert (state, text) == (
        "error",
        "The connection was lost and the answer can no longer be resumed; please ask again.",
    )
    assert demo_page.turns() == [("long ago", "")]
    assert [r.response().status for r, _ in demo_page.resumes()] == [204]
    assert standin.chats() == []


def test_a_reload_with_an_answer_gone_from_the_record_says_so_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_reload_with_an_answer_gone_from_the_record_says_so(demo_page, proxy, standin, POLYFILL)


def test_a_reload_with_an_answer_gone_from_the_record_says_so_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_a_reload_with_an_answer_gone_from_the_record_says_so(demo_page, proxy, standin, FETCH)
