"""Who may talk to the proxy from a browser: pages on listed origins (CORS_ORIGINS), a cookie
session, and nothing the browser receives ever holds the Dify key."""

from __future__ import annotations

from tests.e2e.conftest import AUTH_COOKIE, DIFY_KEY, FETCH, POLYFILL, DemoPage, cookie_value
from tests.support import tokens

QUICK = {"events": 3, "interval": 0.05}
QUICK_ANSWER = "tok " * 3


# --- cross-origin pages ---------------------------------------------------------------------


def check_a_listed_origin_can_chat(demo_page, proxy, standin, origins, transport):
    demo_page.open(origins.listed, transport, api=proxy.url)
    demo_page.use_token(tokens.hs256())
    demo_page.ask(**QUICK)
    assert demo_page.wait_until("done", "error") == ("done", "done")
    assert demo_page.answer() == QUICK_ANSWER
    [call] = standin.chats()
    assert call["json"]["user"] == tokens.USER_ID
    [request, *_] = demo_page.chat_requests("GET" if transport == POLYFILL else "POST")
    assert request.url.startswith(proxy.url)
    assert request.header_value("origin") == origins.listed


def test_a_listed_origin_can_chat_cross_origin_with_the_eventsource_polyfill(
    demo_page, proxy, standin, origins
):
    check_a_listed_origin_can_chat(demo_page, proxy, standin, origins, POLYFILL)


def test_a_listed_origin_can_chat_cross_origin_with_fetch_event_source(
    demo_page, proxy, standin, origins
):
    check_a_listed_origin_can_chat(demo_page, proxy, standin, origins, FETCH)


def check_an_unlisted_origin_is_refused(demo_page, proxy, standin, origins, transport):
    demo_page.open(origins.unlisted, transport, api=proxy.url)
    demo_page.use_token(tokens.hs256())
    demo_page.ask(**QUICK)
    state, text = demo_page.wait_until("done", "error")
    assert state == "error"
    assert "failed" in text
    assert demo_page.failed, "the browser itself must have refused the request"
    assert all(r.url.startswith(proxy.url) for r in demo_page.failed)
    assert standin.chats() == []
    assert demo_page.answer() == ""


def test_an_unlisted_origin_is_refused_with_the_eventsource_polyfill(
    demo_page, proxy, standin, origins
):
    check_an_unlisted_origin_is_refused(demo_page, proxy, standin, origins, POLYFILL)


def test_an_unlisted_origin_is_refused_with_fetch_event_source(demo_page, proxy, standin, origins):
    check_an_unlisted_origin_is_refused(demo_page, proxy, standin, origins, FETCH)


# --- cookie sessions ------------------------------------------------------------------------


def check_a_cookie_session_works(context, demo_page, proxy, standin, transport):
    context.add_cookies(
        [{"name": AUTH_COOKIE, "value": cookie_value(tokens.hs256()), "url": proxy.url}]
    )
    demo_page.open(proxy.url, transport, auth="cookie")
    demo_page.ask(**QUICK)
    assert demo_page.wait_until("done", "error") == ("done", "done")
    assert demo_page.answer() == QUICK_ANSWER
    [call] = standin.chats()
    assert call["json"]["user"] == tokens.USER_ID  # the cookie's user, not the dev token's
    [request, *_] = demo_page.chat_requests()
    headers = request.all_headers()
    assert "authorization" not in headers
    assert AUTH_COOKIE in headers["cookie"]


def test_a_cookie_session_works_with_the_eventsource_polyfill(context, demo_page, proxy, standin):
    check_a_cookie_session_works(context, demo_page, proxy, standin, POLYFILL)


def test_a_cookie_session_works_with_fetch_event_source(context, demo_page, proxy, standin):
    check_a_cookie_session_works(context, demo_page, proxy, standin, FETCH)


def test_a_cookie_session_works_cross_origin_from_a_listed_origin(
    context, demo_page, proxy, standin, origins
):
    context.add_cookies(
        [{"name": AUTH_COOKIE, "value": cookie_value(tokens.hs256()), "url": proxy.url}]
    )
    demo_page.open(origins.listed, FETCH, auth="cookie", api=proxy.url)
    demo_page.ask(**QUICK)
    assert demo_page.wait_until("done", "error") == ("done", "done")
    [call] = standin.chats()
    assert call["json"]["user"] == tokens.USER_ID


def test_without_a_session_the_page_shows_the_401_message(demo_page, proxy, standin):
    demo_page.open(proxy.url, FETCH, auth="cookie")  # no cookie set
    demo_page.ask(**QUICK)
    assert demo_page.wait_until("done", "error") == (
        "error",
        "Missing or invalid session. (401 unauthorized)",
    )
    assert standin.chats() == []


# --- the key stays on the server ------------------------------------------------------------


def test_the_dify_key_is_in_nothing_the_browser_received(context, proxy, standin):
    """Every response the browser got (page, scripts, dev token, streams, 204s, errors, the stop
    call), headers and bodies, with both transports: none holds the key."""
    responses, received = [], []
    aborted = set()
    context.on("response", lambda r: responses.append(r))
    context.on("requestfailed", lambda r: aborted.add(r))

    def read_what_arrived() -> None:  # before leaving the page, which discards the bodies
        while responses:
            response = responses.pop(0)
            headers = "\n".join(f"{k}: {v}" for k, v in response.all_headers().items())
            if response.status in (204, 304) or response.request in aborted:
                body = b""  # none was sent, or the client hung up (the polyfill, on a non-200)
            else:
                body = response.body()
            received.append(headers.encode() + b"\n\n" + body)

    demo_page = DemoPage.new(context)
    for transport in (POLYFILL, FETCH):
        demo_page.open(proxy.url, transport)
        demo_page.ask(**QUICK)
        assert demo_page.wait_until("done", "error") == ("done", "done")
        if transport == POLYFILL:  # its reconnect after the finished stream, answered 204
            assert demo_page.wait_for(lambda: any(r.status == 204 for r in responses))
        demo_page.ask(events=40, interval=0.3)
        demo_page.wait_for_answer_text()
        demo_page.page.click("#stop")
        assert demo_page.wait_until("stopped", "error") == ("stopped", "stopped")
        demo_page.ask(status=401, code="unauthorized", message="Access token is invalid")
        assert demo_page.wait_until("done", "error")[0] == "error"
        read_what_arrived()

    everything = b"\n".join(received)
    assert everything.count(b'"answer":"tok "') >= 6, "the stream bodies were not recorded"
    assert b"access_token" in everything, "the dev-token answer was not recorded"
    assert b"upstream_misconfigured" in everything, "the error answers were not recorded"
    assert DIFY_KEY.encode() not in everything
    assert DIFY_KEY.removeprefix("app-").encode() not in everything
    assert len(standin.chats()) == 6
