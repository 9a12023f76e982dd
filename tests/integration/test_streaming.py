"""The streaming promises of /api/chat, through real gunicorn and a real (stand-in) Dify."""

from __future__ import annotations

import json
import re
import socket
import time

import requests

from tests.integration.conftest import DIFY_KEY, HEARTBEAT, READ_TIMEOUT, scenario
from tests.support import tokens
from tests.support.sse_client import AROUND, CLOSING, OPENING, read_stream

SPECIAL_TEXT = "héllo \u2028 wörld \u0085 😀 — ✓"


def first_data_event(received) -> bool:
    return bool(received.data_events())


def test_an_event_reaches_the_client_while_dify_still_holds_the_stream_open(proxy, standin):
    response = proxy.chat(scenario(events=1, end="hang"))
    received = read_stream(response, until=lambda r: "message" in r.kinds(), seconds=10)
    response.close()
    assert received.kinds() == [*OPENING, "message"]
    assert not received.ended


def test_the_response_head_comes_before_difys_first_event(proxy, standin):
    sent = time.monotonic()
    response = proxy.chat(scenario(first_delay=2, events=1))
    head_time = time.monotonic()
    assert response.status_code == 200
    received = read_stream(response)
    data_time = next(t for t, c in received.chunks if b"data:" in c)
    assert data_time - head_time > 1.0
    assert head_time - sent < 1.5


def test_a_client_that_did_not_ask_for_ids_gets_exactly_what_dify_sent(proxy, standin):
    knobs = {"text": SPECIAL_TEXT, "events": 3, "pings": 1}
    direct = standin.chat(DIFY_KEY, knobs)
    received = read_stream(proxy.chat(scenario(**knobs)))
    assert _per_request_parts_named(received.body) == _per_request_parts_named(direct)
    assert b"id:" not in received.body and b"\n:" not in received.body


UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIMES = rb"created_at|finished_at|elapsed_time|latency|time_to_first_token|time_to_generate"


def _per_request_parts_named(body: bytes) -> bytes:
    """The body with what each request has of its own (ids, numbered in the order they first
    appear, so a reused id must be reused in the same places; times; the user) named the same
    way: everything else must be byte-identical."""
    names: dict[bytes, bytes] = {}
    body = re.sub(rb'"(sys.user_id|user)":"[^"]*"', rb'"\1":"someone"', body)
    body = UUID.sub(lambda m: names.setdefault(m[0], b"<id%d>" % len(names)), body)
    return re.sub(rb'"(' + TIMES + rb')":[\d.e-]+', rb'"\1":0', body)


def test_stream_headers_say_no_caching_no_buffering_no_compression(proxy, standin):
    response = proxy.chat(scenario(events=1), headers={"Accept-Encoding": "gzip, br"})
    read_stream(response)
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache, no-transform"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers


def test_keep_alives_in_difys_own_ping_form_flow_while_dify_is_silent(proxy, standin):
    response = proxy.chat(scenario(first_delay=HEARTBEAT * 5, events=1))
    received = read_stream(response)
    before_data = received.body.split(b"data:")[0]
    assert before_data.count(b"event: ping\n\n") >= 3
    assert before_data == b"event: ping\n\n" * before_data.count(b"event: ping\n\n")


def test_difys_ping_is_relayed_as_it_is(proxy, standin):
    response = proxy.chat(scenario(pings=2, ping_interval=0.05, events=1))
    blocks = read_stream(response).body.split(b"\n\n")
    assert blocks[0] == blocks[2] == blocks[3] == b"event: ping"  # the opening one, two more
    assert blocks[1].startswith(b'data: {"event":"workflow_started"')


def assert_relayed_unchanged(received, text: str) -> None:
    """Every data event is byte-for-byte what the stand-in wrote (compact JSON, raw UTF-8)."""
    for raw, data in zip(received.data_events(), received.data(), strict=True):
        dumped = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        assert raw == f"data: {dumped}\n\n".encode()
    answer = "".join(d.get("answer", "") for d in received.data() if d["event"] == "message")
    assert answer == text


def test_events_split_into_three_byte_reads_arrive_intact(proxy, standin):
    response = proxy.chat(scenario(text=SPECIAL_TEXT, events=3, split=3, split_delay=0.001))
    received = read_stream(response)
    assert_relayed_unchanged(received, SPECIAL_TEXT * 3)
    assert "\u2028".encode() in received.body


def test_several_events_in_one_read_arrive_as_separate_events(proxy, standin):
    response = proxy.chat(scenario(text=SPECIAL_TEXT, events=50, coalesce=True))
    received = read_stream(response)
    assert len(received.data()) == 50 + AROUND
    assert_relayed_unchanged(received, SPECIAL_TEXT * 50)


def test_one_megabyte_events_arrive_intact(proxy, standin):
    response = proxy.chat(scenario(text="a", pad=1_000_000, events=2))
    received = read_stream(response)
    assert_relayed_unchanged(received, ("a" + "x" * 1_000_000) * 2)


def test_a_completed_stream_ends_with_message_end_and_a_clean_close(proxy, standin):
    """A chatflow's workflow_finished, after message_end, arrives too."""
    received = read_stream(proxy.chat(scenario(events=3, interval=0)))
    assert received.ended
    assert received.kinds()[-len(CLOSING) :] == CLOSING


def test_difys_error_event_is_relayed_and_ends_the_stream(proxy, standin):
    received = read_stream(proxy.chat(scenario(events=1, end="error")))
    assert received.ended
    assert received.data()[-1]["event"] == "error"
    assert received.data()[-1]["code"] == "completion_request_error"


def test_a_dropped_upstream_ends_with_a_502_error_event(proxy, standin):
    received = read_stream(proxy.chat(scenario(events=2, end="drop")))
    assert received.ended
    last = received.data()[-1]
    assert (last["event"], last["status"], last["code"]) == ("error", 502, "upstream_dropped")
    assert set(last) >= {"conversation_id", "message_id", "created_at", "message"}


def test_half_an_event_before_a_drop_is_not_relayed(proxy, standin):
    received = read_stream(proxy.chat(scenario(events=2, end="drop_mid_event")))
    assert received.kinds() == [*OPENING, "message", "message", "error"]


def test_silence_past_the_read_timeout_ends_with_a_504_error_event(proxy, standin):
    received = read_stream(proxy.chat(scenario(events=1, end="hang")), seconds=READ_TIMEOUT * 4)
    assert received.ended
    last = received.data()[-1]
    assert (last["event"], last["status"], last["code"]) == ("error", 504, "upstream_timeout")


def test_silence_before_difys_headers_is_a_504(proxy, standin):
    response = proxy.chat(scenario(header_delay=READ_TIMEOUT + 1))
    assert response.status_code == 504
    assert response.json()["code"] == "upstream_timeout"


def test_a_gone_client_gets_the_task_stopped_within_a_heartbeat_and_difys_stream_ended(
    proxy, standin
):
    """The stop comes while the proxy still reads, so Dify's last events (and its usage
    report) are read before the stream closes."""
    token = tokens.hs256(sub="7d0f2e3c-5a44-4c61-9a51-0f8f4c2b9e10")
    response = proxy.chat(scenario(events=1, end="hang"), token=token)
    read_stream(response, until=first_data_event)
    closed_at = time.time()
    response.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    response.close()

    calls = standin.wait_for(
        lambda calls: (
            any(c["stream_end"] == "stopped" for c in calls)
            and any(c["path"].endswith("/stop") for c in calls)
        )
    )
    chat = next(c for c in calls if c["path"] == "/v1/chat-messages")
    stop = next(c for c in calls if c["path"].endswith("/stop"))
    assert chat["stream_end"] == "stopped"
    assert chat["ended_at"] - closed_at < HEARTBEAT * 4
    assert stop["path"] == f"/v1/chat-messages/{chat['task_id']}/stop"
    assert stop["json"] == {"user": "7d0f2e3c-5a44-4c61-9a51-0f8f4c2b9e10"}


def test_a_completed_stream_makes_no_stop_call(proxy, standin):
    read_stream(proxy.chat(scenario(events=2, interval=0)))
    time.sleep(HEARTBEAT)
    assert not [c for c in standin.calls() if c["path"].endswith("/stop")]


def test_blocking_mode_returns_difys_json(proxy, standin):
    response = proxy.chat({"message": "hi", "response_mode": "blocking"})
    assert response.status_code == 200
    assert response.json()["event"] == "message"
    assert response.json()["answer"].startswith("You said: hi")


SSE = {"Accept": "text/event-stream"}


def test_every_event_has_a_unique_id_for_clients_that_speak_sse(proxy, standin):
    received = read_stream(proxy.chat(scenario(events=5, interval=0), headers=SSE))
    ids = received.ids()
    assert len(ids) == len(set(ids)) == 1 + 5 + AROUND  # the opening ping, 5 messages, the rest


def test_a_get_streams_the_same_answer_for_eventsource_clients(proxy, standin):
    response = requests.get(
        f"{proxy.url}/api/chat",
        params={"message": "hi", "inputs": json.dumps({"_standin": {"events": 2}})},
        headers={"Authorization": f"Bearer {tokens.hs256()}"},
        stream=True,
        timeout=30,
    )
    received = read_stream(response)
    assert received.kinds() == [*OPENING, "message", "message", *CLOSING]


def test_a_reconnect_is_204_and_dify_is_not_asked_again(proxy, standin):
    received = read_stream(proxy.chat(scenario(events=1, interval=0), headers=SSE))
    response = proxy.chat(scenario(events=1), headers={"Last-Event-ID": received.ids()[-1]})
    assert response.status_code == 204
    assert len(standin.chats()) == 1
