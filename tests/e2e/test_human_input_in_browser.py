"""A chatflow answer that pauses for a person, in a real browser, with each SSE client: the page
shows the form from the `human_input_required` event, its answer goes through the proxy, and the
rest of the answer arrives whole; after a reload, while paused or while the rest streams, the
page picks the run up again.

The stand-in pauses like Dify 1.16.1 at a Human Input node when asked with
`inputs._standin.human_input` (dify_proxy/standin/human_input.py): its form says "Review the
question: <question>", has one paragraph input, `comment`, and the actions Approve and Reject.
"""

from __future__ import annotations

import json

import requests

from tests.e2e.conftest import FETCH, POLYFILL

QUESTION = "please approve"
# Numbered words, so that a repeated or a missing piece shows in the text.
WORDS = " ".join(f"w{n:02d}" for n in range(1, 17))
PAUSE = {"human_input": 1}
RESUMED_SLOWLY = {**PAUSE, "text": WORDS, "interval": 0.3}  # about 5 s after the form
RECONNECT_GRACE = 2.5  # s: past the polyfill's 1 s reconnect and fetch-event-source's 1 s retry
UNFINISHED = "dify-proxy-demo:unfinished"  # the page's sessionStorage key


def form_answers(standin) -> list[dict]:
    """The form submissions Dify received."""
    return [
        c
        for c in standin.calls()
        if c["path"].startswith("/v1/form/human_input/") and c["method"] == "POST"
    ]


def followed_runs(standin) -> list[dict]:
    return [c for c in standin.calls() if c["path"].startswith("/v1/workflow/")]


def page_requests(demo_page, method: str, path: str) -> list:
    """The page's requests to `path...` that named no event id (no resume)."""
    return [
        r
        for r in demo_page.requests
        if r.method == method
        and f"{path}" in r.url
        and "lastEventId=" not in r.url
        and "last-event-id" not in r.headers
    ]


def wait_for_the_form(demo_page):
    form = demo_page.form()
    form.wait_for()
    assert demo_page.status() == ("paused", "paused: answer the form to go on")
    return form


# --- ask, answer the form, read the rest ----------------------------------------------------


def check_a_paused_answer_shows_the_form_and_then_the_rest(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(QUESTION, **PAUSE, text=WORDS)
    form = wait_for_the_form(demo_page)
    assert form.locator("p").first.text_content() == f"Review the question: {QUESTION}"
    assert form.locator("textarea").evaluate_all("all => all.map(t => t.name)") == ["comment"]
    assert [b.text_content() for b in form.locator("button").all()] == ["Approve", "Reject"]
    [chat] = standin.chats()
    assert chat["stream_end"] == "paused"

    demo_page.answer_form("looks fine")
    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)  # a client that asked again would do it within this

    assert demo_page.turns() == [(QUESTION, WORDS)]
    assert demo_page.form().count() == 0
    [answered] = form_answers(standin)
    assert (answered["json"]["action"], answered["json"]["inputs"]) == (
        "approve",
        {"comment": "looks fine"},
    )
    assert len(standin.chats()) == 1
    assert standin.stops() == [], "nothing may stop a paused run"
    return page_requests(demo_page, "POST", "/api/form/human_input/")


def test_a_paused_answer_shows_the_form_and_then_the_rest_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    [posted] = check_a_paused_answer_shows_the_form_and_then_the_rest(
        demo_page, proxy, standin, POLYFILL
    )
    # GET only: the run is followed first, then the form is answered with a plain POST.
    [followed] = page_requests(demo_page, "GET", "/api/workflow/")
    assert followed.response().headers["content-type"].startswith("text/event-stream")
    assert posted.response().headers["content-type"] == "application/json"


def test_a_paused_answer_shows_the_form_and_then_the_rest_with_fetch_event_source(
    demo_page, proxy, standin
):
    [posted] = check_a_paused_answer_shows_the_form_and_then_the_rest(
        demo_page, proxy, standin, FETCH
    )
    # The rest of the run comes back on the request that answers the form.
    assert posted.response().headers["content-type"].startswith("text/event-stream")
    assert page_requests(demo_page, "GET", "/api/workflow/") == []


# --- two Human Input nodes -----------------------------------------------------------------


def check_a_run_with_two_forms_shows_each_in_turn(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(QUESTION, human_input=2)
    first = wait_for_the_form(demo_page).element_handle()
    demo_page.answer_form("first")
    first.wait_for_element_state("hidden")  # gone once the proxy took the answer
    wait_for_the_form(demo_page)
    demo_page.answer_form("second")
    assert demo_page.wait_until("done", "error") == ("done", "done")

    assert demo_page.turns() == [(QUESTION, "Approved: second")]
    answered = form_answers(standin)
    assert [call["json"]["inputs"]["comment"] for call in answered] == ["first", "second"]
    assert len({call["path"] for call in answered}) == 2, "two forms, two tokens"


def test_a_run_with_two_forms_shows_each_in_turn_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_run_with_two_forms_shows_each_in_turn(demo_page, proxy, standin, POLYFILL)


def test_a_next_form_that_comes_before_the_last_ones_answer_is_acknowledged_stays_shown(
    demo_page, proxy, standin
):
    """With the polyfill the run is followed first and the form answered by a plain POST. Dify
    resumes the run in a worker, so the next pause can reach the page before the POST's `{}`:
    the page then dropped the new form, taking it for the one just answered."""
    demo_page.open(proxy.url, POLYFILL).ask(QUESTION, human_input=2, form_reply_delay=1.0)
    wait_for_the_form(demo_page)
    demo_page.answer_form("first")
    demo_page.pause(1.5)  # the answer to the first form has been acknowledged by now
    second = wait_for_the_form(demo_page)
    assert second.locator("textarea").input_value() == ""
    demo_page.answer_form("second")
    assert demo_page.wait_until("done", "error") == ("done", "done")
    assert demo_page.turns() == [(QUESTION, "Approved: second")]


def test_a_run_with_two_forms_shows_each_in_turn_with_fetch_event_source(demo_page, proxy, standin):
    check_a_run_with_two_forms_shows_each_in_turn(demo_page, proxy, standin, FETCH)


# --- a reload while paused ------------------------------------------------------------------


def check_a_reload_while_paused_shows_the_form_again(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(QUESTION, **PAUSE)
    wait_for_the_form(demo_page)
    demo_page.reload()

    wait_for_the_form(demo_page)
    assert demo_page.turns() == [(QUESTION, "")]
    [fetched] = page_requests(demo_page, "GET", "/api/form/human_input/")
    assert fetched.response().status == 200
    demo_page.answer_form("after the reload")
    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)

    assert demo_page.turns() == [(QUESTION, "Approved: after the reload")]
    assert len(form_answers(standin)) == 1
    assert len(standin.chats()) == 1
    assert standin.stops() == []


def test_a_reload_while_paused_shows_the_form_again_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_reload_while_paused_shows_the_form_again(demo_page, proxy, standin, POLYFILL)


def test_a_reload_while_paused_shows_the_form_again_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_a_reload_while_paused_shows_the_form_again(demo_page, proxy, standin, FETCH)


# --- a reload while the rest of the answer streams ------------------------------------------


def check_a_reload_while_the_rest_streams_shows_it_whole(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(QUESTION, **RESUMED_SLOWLY)
    wait_for_the_form(demo_page)
    demo_page.answer_form("go on")
    shown = demo_page.wait_for_answer_text()
    demo_page.reload()
    [followed] = followed_runs(standin)
    assert followed["stream_end"] is None, "the reload must come while the run still streams"
    assert 0 < len(shown) < len(WORDS)

    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)

    assert demo_page.turns() == [(QUESTION, WORDS)]
    assert demo_page.form().count() == 0
    assert len(form_answers(standin)) == 1
    assert len(standin.chats()) == 1
    resumes = [
        r
        for r in demo_page.requests
        if r.url.startswith(proxy.url)
        and ("lastEventId=" in r.url or "last-event-id" in r.headers)
        and "/api/chat" not in r.url
    ]
    assert resumes and resumes[0].response().status == 200, "the reloaded page did not resume"


def test_a_reload_while_the_rest_streams_shows_it_whole_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_reload_while_the_rest_streams_shows_it_whole(demo_page, proxy, standin, POLYFILL)


def test_a_reload_while_the_rest_streams_shows_it_whole_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_a_reload_while_the_rest_streams_shows_it_whole(demo_page, proxy, standin, FETCH)


# --- a form answered elsewhere -------------------------------------------------------------


def check_a_form_answered_elsewhere_shows_what_came_of_it(demo_page, proxy, standin, transport):
    """Dify's 412 for the page's answer: the page follows the run instead, to its end."""
    demo_page.open(proxy.url, transport).ask(QUESTION, **PAUSE)
    wait_for_the_form(demo_page)
    saved = json.loads(demo_page.page.evaluate(f"sessionStorage.getItem('{UNFINISHED}')"))
    token = demo_page.page.input_value("#token")
    elsewhere = requests.post(
        f"{proxy.url}/api/form/human_input/{saved['formToken']}",
        json={"action": "reject", "inputs": {"comment": "no"}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert elsewhere.status_code == 200

    demo_page.answer_form("too late")
    assert demo_page.wait_until("done", "error") == ("done", "done")

    assert demo_page.turns() == [(QUESTION, "Rejected: no")]
    assert demo_page.form().count() == 0
    refused = page_requests(demo_page, "POST", "/api/form/human_input/")
    assert [r.response().status for r in refused] == [412]
    assert len(form_answers(standin)) == 2


def test_a_form_answered_elsewhere_shows_what_came_of_it_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_form_answered_elsewhere_shows_what_came_of_it(demo_page, proxy, standin, POLYFILL)


def test_a_form_answered_elsewhere_shows_what_came_of_it_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_a_form_answered_elsewhere_shows_what_came_of_it(demo_page, proxy, standin, FETCH)
