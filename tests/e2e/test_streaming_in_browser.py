"""The demo page streaming in a real browser, with each SSE client: text shows up as it arrives,
a finished answer is never asked for again, Stop stops it, and errors show their message."""

from __future__ import annotations

from tests.e2e.conftest import FETCH, POLYFILL

SLOW = {"events": 8, "interval": 0.4}  # about 3 s of answer, 8 deltas of "tok "
SLOW_ANSWER = "tok " * 8
QUICK = {"events": 3, "interval": 0.05}
QUICK_ANSWER = "tok " * 3
RECONNECT_GRACE = 2.5  # s: past the polyfill's 1 s reconnect and fetch-event-source's 1 s retry


# --- text appears incrementally -------------------------------------------------------------


def check_text_appears_incrementally(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(**SLOW)
    first_text = demo_page.wait_for_answer_text()
    [call] = standin.chats()
    assert call["stream_end"] is None, "the first delta must be on screen while Dify still streams"
    assert 0 < len(first_text) < len(SLOW_ANSWER)
    assert demo_page.wait_until("done", "error") == ("done", "done")
    assert demo_page.answer() == SLOW_ANSWER


def test_text_appears_incrementally_with_the_eventsource_polyfill(demo_page, proxy, standin):
    check_text_appears_incrementally(demo_page, proxy, standin, POLYFILL)


def test_text_appears_incrementally_with_fetch_event_source(demo_page, proxy, standin):
    check_text_appears_incrementally(demo_page, proxy, standin, FETCH)


# --- a finished stream is asked only once ---------------------------------------------------


def test_a_finished_stream_is_asked_only_once_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    log_start = len(proxy.log())
    demo_page.open(proxy.url, POLYFILL).ask(**QUICK)
    assert demo_page.wait_until("done", "error") == ("done", "done")

    # The polyfill reconnects by itself a second after the stream ends, with the last event id.
    reconnects = demo_page.wait_for(
        lambda: [r for r in demo_page.chat_requests("GET") if "lastEventId=" in r.url]
    )
    assert len(reconnects) == 1, "the polyfill did not reconnect: this test would prove nothing"
    assert reconnects[0].response().status == 204
    assert demo_page.wait_for(
        lambda: [
            entry
            for entry in proxy.requests_logged(log_start)
            if (entry["method"], entry["path"], entry["status"]) == ("GET", "/api/chat", "204")
        ]
    ), "the proxy's log shows no 204 for the reconnect"
    demo_page.pause(RECONNECT_GRACE)  # a polyfill that did not stop would try again within this

    assert len(standin.chats()) == 1
    assert len(demo_page.chat_requests("GET")) == 2
    assert demo_page.status() == ("done", "done")
    assert demo_page.answer() == QUICK_ANSWER


def test_a_finished_stream_is_asked_only_once_with_fetch_event_source(demo_page, proxy, standin):
    demo_page.open(proxy.url, FETCH).ask(**QUICK)
    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)

    assert len(standin.chats()) == 1
    assert len(demo_page.chat_requests("POST")) == 1
    assert demo_page.status() == ("done", "done")
    assert demo_page.answer() == QUICK_ANSWER


def test_a_tab_switch_does_not_resend_the_question_with_fetch_event_source(
    demo_page, proxy, standin
):
    """Without `openWhenHidden` the library aborts on every hide and POSTs again on show."""
    demo_page.open(proxy.url, FETCH).ask(**SLOW)
    demo_page.wait_for_answer_text()
    for hidden in (True, False):
        demo_page.page.evaluate(
            """hidden => {
                Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
                Object.defineProperty(document, "visibilityState",
                    {value: hidden ? "hidden" : "visible", configurable: true});
                document.dispatchEvent(new Event("visibilitychange"));
            }""",
            hidden,
        )
    assert demo_page.wait_until("done", "error") == ("done", "done")
    demo_page.pause(RECONNECT_GRACE)

    assert len(demo_page.chat_requests("POST")) == 1
    assert len(standin.chats()) == 1
    assert demo_page.answer() == SLOW_ANSWER


# --- follow-ups keep the conversation -------------------------------------------------------


def check_a_follow_up_continues_the_conversation(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask("first", **QUICK)
    demo_page.wait_until("done", "error")
    demo_page.ask("second", **QUICK)
    demo_page.page.wait_for_selector("#transcript .turn:nth-child(2)")
    assert demo_page.wait_until("done", "error") == ("done", "done")
    first, second = demo_page.wait_for(lambda: len(standin.chats()) == 2 and standin.chats())
    assert "conversation_id" not in first["json"]
    conversation = demo_page.page.text_content("#conversation")
    assert second["json"]["conversation_id"] == conversation
    assert second["json"]["query"] == "second"


def test_a_follow_up_continues_the_conversation_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_a_follow_up_continues_the_conversation(demo_page, proxy, standin, POLYFILL)


def test_a_follow_up_continues_the_conversation_with_fetch_event_source(demo_page, proxy, standin):
    check_a_follow_up_continues_the_conversation(demo_page, proxy, standin, FETCH)


# --- the Stop button ------------------------------------------------------------------------


def check_the_stop_button_stops_the_answer(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(events=40, interval=0.3)
    demo_page.wait_for_answer_text()
    demo_page.page.click("#stop")
    assert demo_page.wait_until("stopped", "error") == ("stopped", "stopped")

    [call] = demo_page.wait_for(lambda: [c for c in standin.chats() if c["stream_end"] is not None])
    assert call["stream_end"] == "stopped"
    [stop] = [s for s in standin.stops() if s["task_id"] == call["task_id"]]
    assert stop["path"] == f"/v1/chat-messages/{call['task_id']}/stop"
    assert stop["json"]["user"] == call["json"]["user"]
    assert 0 < len(demo_page.answer()) < len("tok " * 40)


def test_the_stop_button_stops_the_answer_with_the_eventsource_polyfill(demo_page, proxy, standin):
    check_the_stop_button_stops_the_answer(demo_page, proxy, standin, POLYFILL)


def test_the_stop_button_stops_the_answer_with_fetch_event_source(demo_page, proxy, standin):
    check_the_stop_button_stops_the_answer(demo_page, proxy, standin, FETCH)


# --- errors ---------------------------------------------------------------------------------


def test_an_error_answer_shows_the_json_error_message_with_fetch_event_source(
    demo_page, proxy, standin
):
    demo_page.open(proxy.url, FETCH).ask(status=429, code="too_many_requests", message="Slow down")
    state, text = demo_page.wait_until("done", "error")
    assert state == "error"
    assert text == "Slow down (429 too_many_requests)"
    assert len(demo_page.chat_requests("POST")) == 1, "a 4xx must not be retried"


def test_an_error_answer_shows_its_status_with_the_eventsource_polyfill(demo_page, proxy, standin):
    """The polyfill gives up on any non-200 answer and does not expose the body."""
    demo_page.open(proxy.url, POLYFILL).ask(status=429, code="too_many_requests")
    state, text = demo_page.wait_until("done", "error")
    assert (state, text) == ("error", "HTTP 429: too many requests")
    demo_page.pause(RECONNECT_GRACE)
    assert len(demo_page.chat_requests("GET")) == 1, "a 4xx must not be retried"


def check_an_error_event_in_the_stream_shows_its_message(demo_page, proxy, standin, transport):
    demo_page.open(proxy.url, transport).ask(events=2, end="drop")
    state, text = demo_page.wait_until("done", "error")
    assert state == "error"
    assert text == "The chat service closed the stream early; the answer is incomplete."
    assert demo_page.answer() == "tok tok "


def test_an_error_event_in_the_stream_shows_its_message_with_the_eventsource_polyfill(
    demo_page, proxy, standin
):
    check_an_error_event_in_the_stream_shows_its_message(demo_page, proxy, standin, POLYFILL)


def test_an_error_event_in_the_stream_shows_its_message_with_fetch_event_source(
    demo_page, proxy, standin
):
    check_an_error_event_in_the_stream_shows_its_message(demo_page, proxy, standin, FETCH)
