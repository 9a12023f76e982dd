"""A deploy's SIGTERM, through real gunicorn with two workers: answers that can finish do, the
rest end with a clear last event by the deadline, new questions get a clear 503, and nothing is
ever cut silently. graceful_timeout is 6 s here, so the drain deadline is 4.8 s."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.integration.conftest import scenario
from tests.support import tokens
from tests.support.sse_client import read_stream

GRACEFUL = {
    "GUNICORN_CMD_ARGS": "--graceful-timeout 6",
    "WEB_CONCURRENCY": "2",
    "MAX_STREAMS_PER_USER": "0",
    "RATE_LIMIT": "off",
}
DEADLINE = 4.8  # gunicorn.conf.py: graceful_timeout minus min(3 s, 20 %)
SSE = {"Accept": "text/event-stream"}


def open_answers(proxy, n: int, knobs: dict) -> list:
    """n answers, each read up to its first event, so all are streaming."""
    responses = [proxy.chat(scenario(**knobs), headers=SSE) for _ in range(n)]
    for response in responses:
        read_stream(response, until=lambda r: bool(r.data()), seconds=10)
    return responses


def finish(responses, seconds: float = 20) -> list:
    with ThreadPoolExecutor(max_workers=len(responses)) as pool:
        return list(pool.map(lambda r: read_stream(r, seconds=seconds), responses))


def outcome(status: int, received) -> str:
    """How one request ended, as a client sees it."""
    assert status in (200, 503), status
    if status == 503:
        return "refused"
    last = received.data()[-1] if received.data() else {}
    if received.ended and received.kinds()[-2:] == ["message_end", "workflow_finished"]:
        return "whole"
    if received.ended and last.get("code") == "server_restarting":
        return "server_restarting"
    return "silent_cut"


def test_answers_shorter_than_the_deadline_arrive_whole(start_proxy, standin):
    proxy = start_proxy(**GRACEFUL)
    responses = open_answers(proxy, 6, {"events": 25, "interval": 0.1})
    proxy.process.send_signal(signal.SIGTERM)
    rests = finish(responses)
    for rest in rests:
        assert outcome(200, rest) == "whole"
    assert proxy.process.wait(timeout=10) == 0


def test_answers_longer_than_the_deadline_end_with_server_restarting_by_it(start_proxy, standin):
    proxy = start_proxy(**GRACEFUL)
    responses = open_answers(proxy, 4, {"events": 1, "end": "hang"})
    sent_at = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    rests = finish(responses)
    ended_after = time.monotonic() - sent_at
    for rest in rests:
        assert outcome(200, rest) == "server_restarting"
        assert rest.data()[-1]["status"] == 503
    assert DEADLINE - 0.5 < ended_after < DEADLINE + 3
    standin.wait_for(lambda calls: len([c for c in calls if c["path"].endswith("/stop")]) == 4)


def test_the_restart_event_tells_the_client_to_reconnect_and_with_which_id(start_proxy, standin):
    proxy = start_proxy(**GRACEFUL)
    [response] = open_answers(proxy, 1, {"events": 1, "end": "hang"})
    proxy.process.send_signal(signal.SIGTERM)
    rest = read_stream(response, seconds=15)
    last_block = rest.events()[-1]
    assert b"\nid: " in last_block and b"\nretry: 1000\n" in last_block


def test_new_questions_after_sigterm_get_a_503_or_a_clear_ending(start_proxy, standin):
    proxy = start_proxy(**GRACEFUL)
    held = open_answers(proxy, 2, {"events": 1, "end": "hang"})
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    outcomes = []
    until = time.monotonic() + 2
    while time.monotonic() < until:
        try:
            response = proxy.chat(scenario(events=3, interval=0.1), headers=SSE)
        except requests.ConnectionError:
            outcomes.append("not_accepted")  # no byte of a response: the router retries it
            continue
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["code"] == "server_restarting"
        outcomes.append(outcome(response.status_code, read_stream(response, seconds=15)))
        time.sleep(0.1)
    finish(held)
    assert outcomes and "silent_cut" not in outcomes
    assert "refused" in outcomes


def test_a_question_still_waiting_for_dify_at_the_deadline_gets_a_503(start_proxy, standin):
    proxy = start_proxy(**GRACEFUL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(proxy.chat, scenario(header_delay=30, events=1), None, SSE)
        standin.wait_for(lambda calls: bool(calls))
        proxy.process.send_signal(signal.SIGTERM)
        response = waiting.result(timeout=20)
    assert response.status_code == 503
    assert response.json()["code"] == "server_restarting"


def test_a_question_waiting_for_dify_at_sigterm_streams_if_dify_answers_in_time(
    start_proxy, standin
):
    proxy = start_proxy(**GRACEFUL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(proxy.chat, scenario(header_delay=1, events=3), None, SSE)
        standin.wait_for(lambda calls: bool(calls))
        proxy.process.send_signal(signal.SIGTERM)
        response = waiting.result(timeout=20)
    assert outcome(response.status_code, read_stream(response)) == "whole"


def test_a_restarted_answer_resumes_on_a_fresh_instance_through_redis(
    start_proxy, standin, redis_server
):
    old = start_proxy(REDIS_URL=redis_server.url, **GRACEFUL)
    response = old.chat(scenario(events=4, interval=0.05, end="hang"), headers=SSE)
    first = read_stream(response, until=lambda r: len(r.data()) >= 1, seconds=10)
    old.process.send_signal(signal.SIGTERM)
    rest = read_stream(response, seconds=15)
    old.process.wait(timeout=15)
    new = start_proxy(REDIS_URL=redis_server.url)

    resumed = requests.post(
        f"{new.url}/api/chat",
        json={},
        headers={
            "Authorization": f"Bearer {tokens.hs256()}",
            "Last-Event-ID": first.ids()[1],  # the first data event's id
            **SSE,
        },
        stream=True,
        timeout=30,
    )
    replay = read_stream(resumed)

    assert [d["event"] for d in replay.data()] == ["message"] * 4 + ["error"]  # after the start
    assert replay.data()[-1]["code"] == "server_restarting"
    assert replay.data() == (first.data() + rest.data())[1:]
    assert replay.ended


def test_the_drain_is_logged_with_its_counts(start_proxy, standin):
    proxy = start_proxy(**GRACEFUL)
    finishing = open_answers(proxy, 1, {"events": 10, "interval": 0.1})
    cut = open_answers(proxy, 1, {"events": 1, "end": "hang"})
    proxy.process.send_signal(signal.SIGTERM)
    finish(finishing + cut)
    proxy.process.wait(timeout=15)
    lines = [json.loads(x) for x in proxy.log().splitlines() if '"drained"' in x]
    assert sum(line["finished"] for line in lines) == 1
    assert sum(line["ended_at_deadline"] for line in lines) == 1
