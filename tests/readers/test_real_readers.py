"""Code written to read Dify's stream reads the proxy's the same way.

Every pinned published reader (and ports of Dify's own web template and SDK README loop) reads
a recorded Dify stream twice, straight from the stand-in and through the proxy under gunicorn,
each with its default headers, delivered in irregular pieces and one event per write, with a
mid-answer silence long enough for the proxy's 1 s keep-alives to fire. Only `ping` events may
differ (Dify sends them on a timer too), and an SSE last-event-id may appear through the proxy.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.readers import recordings
from tests.readers.harness import (
    READERS,
    Browser,
    chat_request,
    node_reading,
    read_all,
    run_node,
)
from tests.readers.python_readers import Event, Reading
from tests.support import tokens

SCENARIOS = [(r, d) for r in recordings.RECORDINGS for d in recordings.DELIVERIES]
SCENARIO_IDS = [f"{r}-{d.name}" for r, d in SCENARIOS]


@pytest.fixture(scope="module")
def readings(browser, standin, proxy):
    """Every reader's readings of one scenario, run once (all at once) on first use."""
    pages = Browser(browser)
    done: dict = {}

    def of(recording: str, delivery: recordings.Delivery) -> dict[tuple[str, str], Reading]:
        key = (recording, delivery.name)
        if key not in done:
            done[key] = read_all(pages, standin.url, proxy.url, delivery.knobs(recording))
        return done[key]

    yield of
    pages.close()


def is_ping(event: Event) -> bool:
    return event.type == "ping"


def is_no_op(event: Event) -> bool:
    """Dify's template calls onData('') for a line cut across reads; appending '' to the answer
    shows nothing, and where reads are cut is the network's business."""
    if event.type != "onData":
        return False
    message, _, more = json.loads(event.data)
    return message == "" and "errorMessage" not in more


def seen(reading: Reading) -> list[tuple[str, str]]:
    """What the application sees, ping events and ids aside."""
    return [(e.type, e.data) for e in reading.events if not is_ping(e) and not is_no_op(e)]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_reader_sees_the_same_events_through_the_proxy_as_straight_from_dify(
    readings, reader, recording, delivery
):
    got = readings(recording, delivery)
    dify, proxy = got[reader, "dify"], got[reader, "proxy"]
    assert seen(proxy) == seen(dify)
    assert proxy.ended == dify.ended


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_no_ping_from_dify_vanishes_through_the_proxy(readings, reader, recording, delivery):
    got = readings(recording, delivery)
    dify, proxy = got[reader, "dify"], got[reader, "proxy"]
    pings = [sum(map(is_ping, r.events)) for r in (dify, proxy)]
    assert pings[1] >= pings[0]


def test_eventsource_reconnecting_after_the_answer_gets_a_204_and_dify_is_asked_once(
    standin, proxy
):
    standin.reset()
    knobs = {"replay_recording": "agent_error"}
    request = chat_request("eventsource", "proxy", standin.url, proxy.url, knobs)
    reading = node_reading(run_node("eventsource", request, reconnect=True))
    assert reading.ended == "error after 1 open(s), code 204"
    assert len(standin.chats()) == 1


ACCEPTS = {"default": None, "ids": "text/event-stream"}
SSE_READERS = [r for r in READERS if r not in ("dify-handle-stream", "dify-sdk-readme-loop")]


@pytest.fixture(scope="module")
def raw_bodies(proxy) -> dict[tuple[str, str, str], bytes]:
    """The proxy's raw bytes for every scenario, without and with Accept: text/event-stream."""

    def read(recording: str, delivery: recordings.Delivery, accept: str | None) -> bytes:
        headers = {"Authorization": f"Bearer {tokens.hs256()}"}
        if accept:
            headers["Accept"] = accept
        body = {"message": "hi", "inputs": {"_standin": delivery.knobs(recording)}}
        with requests.post(
            f"{proxy.url}/api/chat", json=body, headers=headers, stream=True, timeout=30
        ) as response:
            return response.raw.read()

    jobs = [(r, d, mode) for r, d in SCENARIOS for mode in ACCEPTS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        bodies = pool.map(lambda job: read(job[0], job[1], ACCEPTS[job[2]]), jobs)
        return {(r, d.name, mode): got for (r, d, mode), got in zip(jobs, bodies, strict=True)}


@pytest.mark.parametrize("mode", ACCEPTS)
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_data_lines_through_the_proxy_are_the_recordings_bytes(
    raw_bodies, recording, delivery, mode
):
    received = raw_bodies[recording, delivery.name, mode]
    assert recordings.data_lines(received) == recordings.data_lines(recordings.body(recording))


@pytest.mark.parametrize("mode", ACCEPTS)
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_keep_alives_fired_during_the_stall_on_top_of_difys_pings(
    raw_bodies, recording, delivery, mode
):
    received = raw_bodies[recording, delivery.name, mode]
    assert recordings.ping_count(received) > recordings.ping_count(recordings.body(recording))


@pytest.mark.parametrize("path", ["dify", "proxy"])
@pytest.mark.parametrize("reader", SSE_READERS)
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_sse_reader_hands_over_exactly_the_recorded_data_events(
    readings, reader, path, recording, delivery
):
    """Raw U+2028, emoji, CJK, right-to-left text and `data: ` inside an answer included."""
    reading = readings(recording, delivery)[reader, path]
    recorded = [line[6:].decode() for line in recordings.data_lines(recordings.body(recording))]
    assert seen(reading) == [("message", data) for data in recorded]


@pytest.mark.parametrize("path", ["dify", "proxy"])
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_sdk_readme_loop_parses_every_event_before_difys_first_ping_then_raises_on_it(
    readings, path, recording, delivery
):
    reading = readings(recording, delivery)["dify-sdk-readme-loop", path]
    data = recordings.body(recording)
    before_ping = data[: data.index(recordings.PING)]
    expected = [json.loads(line[6:]) for line in recordings.data_lines(before_ping)]
    assert [json.loads(e.data) for e in reading.events] == expected
    assert reading.ended == "raised JSONDecodeError on 'event: ping'"


@pytest.mark.parametrize("path", ["dify", "proxy"])
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_dify_handle_stream_calls_back_once_per_event_it_knows(readings, path, recording, delivery):
    reading = readings(recording, delivery)["dify-handle-stream", path]
    callbacks = {
        "message": "onData",
        "agent_message": "onData",
        "agent_thought": "onThought",
        "message_file": "onFile",
        "message_end": "onMessageEnd",
        "message_replace": "onMessageReplace",
        "workflow_started": "onWorkflowStarted",
        "workflow_finished": "onWorkflowFinished",
        "node_started": "onNodeStarted",
        "node_finished": "onNodeFinished",
        "error": "onData",  # with errorMessage, as the template reports a status-400 error
    }
    recorded = [json.loads(line[6:]) for line in recordings.data_lines(recordings.body(recording))]
    expected = [callbacks[e["event"]] for e in recorded if e["event"] in callbacks]
    assert [type_ for type_, _ in seen(reading)] == expected


@pytest.mark.parametrize("reader", ["eventsource", "event-source-polyfill", "fetch-event-source"])
@pytest.mark.parametrize(("recording", "delivery"), SCENARIOS, ids=SCENARIO_IDS)
def test_eventsource_clients_get_an_id_on_every_event_through_the_proxy(
    readings, reader, recording, delivery
):
    events = [e for e in readings(recording, delivery)[reader, "proxy"].events if not is_ping(e)]
    stream = events[0].id.rsplit("-", 1)[0]
    assert [e.id for e in events] == [f"{stream}-{n}" for n in range(1, len(events) + 1)]
