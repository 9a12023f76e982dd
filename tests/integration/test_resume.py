"""Resumable answers: a client that lost its connection, or a reloaded page, reconnects with the
last event id it saw and gets the rest of the answer, once, with Dify asked once. Real gunicorn,
the stand-in, and a real redis-server where instances share the record."""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from dify_proxy import redisconn
from tests.integration.conftest import scenario
from tests.support import tokens
from tests.support.sse_client import AROUND, CLOSING, read_stream

SSE = {"Accept": "text/event-stream"}
SLOW = {"events": 12, "interval": 0.15, "text": "word "}  # about two seconds of answer
ALICE = "5b1f0c2e-1111-4a6f-9d3e-0a1b2c3d4e5f"
BOB = "6c2e1d3f-2222-4b7a-8e4f-1b2c3d4e5f60"


def ask(proxy, knobs=SLOW, sub=ALICE, **headers):
    return proxy.chat(scenario(**knobs), token=tokens.hs256(sub=sub), headers={**SSE, **headers})


def cut(response) -> None:
    """Drop the connection as a lost network does: no more bytes either way."""
    response.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    response.close()


def resume(proxy, last_id, sub=ALICE, method="POST"):
    headers = {"Authorization": f"Bearer {tokens.hs256(sub=sub)}", **SSE}
    if method == "GET":
        return requests.get(
            f"{proxy.url}/api/chat",
            params={"lastEventId": last_id},
            headers=headers,
            stream=True,
            timeout=30,
        )
    headers["Last-Event-ID"] = last_id
    return requests.post(f"{proxy.url}/api/chat", json={}, headers=headers, stream=True, timeout=30)


def seqs(received) -> list[int]:
    return [int(i.rsplit("-", 1)[1]) for i in received.ids()]


def answer_of(*parts) -> str:
    return "".join(
        d.get("answer", "") for part in parts for d in part.data() if d["event"] == "message"
    )


def assert_whole_once(first, rest) -> None:
    """The two parts make the answer: every event once, in order, then the chatflow's end."""
    data_seqs = [s for s in seqs(first) + seqs(rest) if s > 0]
    assert data_seqs == list(range(1, SLOW["events"] + AROUND + 1))
    assert answer_of(first, rest) == SLOW["text"] * SLOW["events"]
    assert rest.kinds()[-len(CLOSING) :] == CLOSING
    assert rest.ended


def test_a_cut_mid_answer_resumes_with_every_event_once_and_dify_asked_once(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)

    rest = read_stream(resume(proxy, first.ids()[-1]))

    assert_whole_once(first, rest)
    assert len(standin.chats()) == 1
    assert not standin.stops()


def test_the_resumed_data_lines_are_difys_bytes(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    cut(response)
    rest = read_stream(resume(proxy, first.ids()[-1]))
    for raw, data in zip(rest.data_events(), rest.data(), strict=True):
        assert raw == b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def test_a_resume_with_the_id_in_the_query_works_for_eventsource(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)
    assert_whole_once(first, read_stream(resume(proxy, first.ids()[-1], method="GET")))


def test_a_cut_before_the_first_event_resumes_from_the_opening_id(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy, {**SLOW, "first_delay": 1.0})
    first = read_stream(response, until=lambda r: bool(r.ids()))
    assert not first.data() and seqs(first) == [0]
    cut(response)

    rest = read_stream(resume(proxy, first.ids()[-1]))

    assert_whole_once(first, rest)
    assert len(standin.chats()) == 1


def test_a_resume_after_the_answer_ended_replays_the_rest_and_ends(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)
    standin.wait_for(lambda calls: calls and calls[0]["stream_end"] == "completed")

    rest = read_stream(resume(proxy, first.ids()[-1]))

    assert_whole_once(first, rest)


def test_a_resume_lands_on_another_process_that_shares_the_spool(start_proxy, standin, tmp_path):
    spool = str(tmp_path / "spool")
    a = start_proxy(RESUME_GRACE="10", RESUME_SPOOL_DIR=spool)
    b = start_proxy(RESUME_GRACE="10", RESUME_SPOOL_DIR=spool)
    response = ask(a)
    first = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)

    rest = read_stream(resume(b, first.ids()[-1]))

    assert_whole_once(first, rest)
    assert len(standin.chats()) == 1


def test_a_resume_lands_on_another_worker_of_the_same_instance(start_proxy, standin):
    """Two workers share the master's spool directory; the request log names each pid."""
    proxy = start_proxy(RESUME_GRACE="10", WEB_CONCURRENCY="2")
    pids = set()
    for _ in range(8):
        response = ask(proxy, {**SLOW, "interval": 0.05})
        first = read_stream(response, until=lambda r: len(r.data()) >= 2)
        cut(response)
        rest = read_stream(resume(proxy, first.ids()[-1]))
        assert rest.kinds()[-len(CLOSING) :] == CLOSING
        lines = [json.loads(line) for line in proxy.log().splitlines() if '"request"' in line]
        pids = {line["pid"] for line in lines if line.get("path") == "/api/chat"}
        if any(line.get("resumed") for line in lines) and len(pids) == 2:
            break
    resumed = [
        line
        for line in (json.loads(x) for x in proxy.log().splitlines() if '"request"' in x)
        if line.get("resumed")
    ]
    assert resumed and len(pids) == 2


def test_two_instances_sharing_redis_resume_each_others_answers(
    start_proxy, standin, redis_server, tmp_path
):
    a = start_proxy(RESUME_GRACE="10", REDIS_URL=redis_server.url)
    b = start_proxy(RESUME_GRACE="10", REDIS_URL=redis_server.url)
    response = ask(a)
    first = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)

    rest = read_stream(resume(b, first.ids()[-1]))

    assert_whole_once(first, rest)
    assert len(standin.chats()) == 1


def test_when_redis_stops_mid_answer_the_client_loses_nothing_and_resume_uses_the_spool(
    start_proxy, standin, redis_server
):
    proxy = start_proxy(RESUME_GRACE="10", REDIS_URL=redis_server.url)
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    redis_server.stop()
    more = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)

    rest = read_stream(resume(proxy, more.ids()[-1]))

    combined = first.ids() + more.ids()
    assert [int(i.rsplit("-", 1)[1]) for i in combined if not i.endswith("-0")] == list(
        range(1, len(first.data()) + len(more.data()) + 1)
    )
    assert rest.kinds()[-len(CLOSING) :] == CLOSING
    assert answer_of(first, more, rest) == SLOW["text"] * SLOW["events"]


def test_after_the_grace_with_no_reconnect_dify_is_told_to_stop(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="1")
    response = ask(proxy, {"events": 1, "end": "hang"})
    read_stream(response, until=lambda r: bool(r.data()))
    left_at = time.monotonic()
    cut(response)

    standin.wait_for(lambda calls: any(c["path"].endswith("/stop") for c in calls))

    assert standin.stops()
    assert time.monotonic() - left_at >= 1.0
    assert '"answer abandoned"' in proxy.log()


def test_a_reconnect_within_the_grace_keeps_the_answer_running_past_it(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="1")
    response = ask(proxy, {"events": 30, "interval": 0.1, "text": "w "})
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    cut(response)
    rest = read_stream(resume(proxy, first.ids()[-1]))
    assert rest.kinds()[-len(CLOSING) :] == CLOSING
    assert not standin.stops()


def test_another_users_id_gets_204_and_no_dify_call(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    cut(response)
    other = resume(proxy, first.ids()[-1], sub=BOB)
    assert other.status_code == 204
    assert len(standin.chats()) == 1


def test_an_unknown_id_gets_204(start_proxy, standin):
    proxy = start_proxy()
    assert resume(proxy, "A" * 22 + "-3").status_code == 204
    assert not standin.chats()


def test_an_expired_id_gets_204(start_proxy, standin):
    proxy = start_proxy(RESUME_WINDOW="1")
    received = read_stream(ask(proxy, {"events": 2, "interval": 0}))
    time.sleep(2.5)
    assert resume(proxy, received.ids()[-1]).status_code == 204


def test_an_answer_over_the_record_cap_cannot_be_resumed(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10", RESUME_MAX_BYTES="2000")
    received = read_stream(ask(proxy, {"events": 20, "interval": 0, "pad": 200}))
    assert received.kinds()[-len(CLOSING) :] == CLOSING  # it still streamed whole, live
    assert resume(proxy, received.ids()[1]).status_code == 204


def test_a_resume_is_no_new_question_for_the_limits(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10", RATE_LIMIT="1/minute", MAX_STREAMS_PER_USER="1")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    cut(response)
    rest = resume(proxy, first.ids()[-1])
    assert rest.status_code == 200
    assert_whole_once(first, read_stream(rest))


def test_tokens_used_during_the_grace_count_against_the_budget(start_proxy, standin, redis_server):
    proxy = start_proxy(RESUME_GRACE="10", DAILY_TOKEN_BUDGET="5", REDIS_URL=redis_server.url)
    response = ask(proxy, {"events": 10, "interval": 0.1})
    read_stream(response, until=lambda r: bool(r.data()))
    cut(response)
    standin.wait_for(lambda calls: calls and calls[0]["stream_end"] == "completed")
    deadline = time.monotonic() + 10
    while (again := ask(proxy, {"events": 1})).status_code == 200:
        again.close()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert again.json()["code"] == "token_budget_exceeded"


def test_resumes_are_logged_and_counted(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    response = ask(proxy)
    first = read_stream(response, until=lambda r: len(r.data()) >= 3)
    cut(response)
    read_stream(resume(proxy, first.ids()[-1]))
    lines = [json.loads(x) for x in proxy.log().splitlines() if '"answer resumed"' in x]
    assert lines and lines[0]["replayed"] >= 0
    metrics = requests.get(f"{proxy.url}/metrics", timeout=5).text
    assert "dify_proxy_resumes_total 1.0" in metrics


# --- what the second outside probe found (issue 20) ------------------------------------------


def worker_pids(proxy) -> list[int]:
    """gunicorn's workers: the children of the master."""
    master = proxy.process.pid
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{master}\n" in text:
            pids.append(int(status.parent.name))
    return pids


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def unread_resume(proxy, last_id: str, sub=ALICE) -> socket.socket:
    """A GET resume whose client never reads a byte of the answer."""
    sock = socket.create_connection((proxy.url.split("//")[1].split(":")[0], port_of(proxy)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    token = tokens.hs256(sub=sub)
    sock.sendall(
        f"GET /api/chat?lastEventId={last_id} HTTP/1.1\r\nHost: proxy\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def port_of(proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def metric(proxy, name: str) -> float:
    text = requests.get(f"{proxy.url}/metrics", timeout=5).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def in_redis(redis_server, first) -> None:
    """Wait until the answer's record reached Redis (it is sent every 0.2 s)."""
    key = "dify-proxy:answer:" + first.ids()[-1].rsplit("-", 1)[0]
    client = redis_server.client()
    deadline = time.monotonic() + 10
    while not client.exists(key):
        assert time.monotonic() < deadline, "the record never reached Redis"
        time.sleep(0.05)


def test_unread_resumes_of_a_long_answer_hold_little_memory(start_proxy, standin):
    """H1: each resume used to load the whole record and copy it again (about 15 MB per
    connection for a 4 MB answer); now it reads a piece at a time, as fast as its client."""
    proxy = start_proxy(WEB_CONCURRENCY="1", RESUME_MAX_BYTES=str(16 * 2**20), RESUME_GRACE="10")
    whole = read_stream(ask(proxy, {"events": 2000, "interval": 0, "pad": 2000}), seconds=60)
    assert whole.kinds()[-2:] == ["message_end", "workflow_finished"]  # the whole answer
    (worker,) = worker_pids(proxy)
    before = rss_mb(worker)
    n = 40
    socks = [unread_resume(proxy, whole.ids()[0]) for _ in range(n)]
    try:
        deadline = time.monotonic() + 60
        while metric(proxy, "dify_proxy_resumes_total") < n:
            assert time.monotonic() < deadline, "the resumes did not all start"
            time.sleep(0.2)
        time.sleep(1)  # each writes until its client's buffers are full
        grown = rss_mb(worker) - before
    finally:
        for sock in socks:
            sock.close()
    assert grown < n * 1.0, f"{grown:.0f} MB for {n} unread resumes"


def test_a_resume_through_redis_of_a_live_answer_follows_it_live_and_keeps_it_alive(
    start_proxy, standin, redis_server
):
    """M1: the resume on instance B sent nothing until the answer ended, and the answer was
    abandoned after the grace meanwhile."""
    a = start_proxy(RESUME_GRACE="1", REDIS_URL=redis_server.url)
    b = start_proxy(RESUME_GRACE="1", REDIS_URL=redis_server.url)
    response = ask(a, {"events": 50, "interval": 0.1, "text": "w "})
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    cut(response)
    in_redis(redis_server, first)

    resumed = resume(b, first.ids()[-1])
    assert resumed.status_code == 200
    early = read_stream(resumed, until=lambda r: len(r.data()) >= 3)
    assert standin.chats()[0]["stream_end"] is None  # the answer is still streaming
    rest = read_stream(resumed)

    kinds = [event["event"] for event in early.data() + rest.data()]
    assert kinds[-2:] == ["message_end", "workflow_finished"]
    assert answer_of(first, early, rest) == "w " * 50
    assert not standin.stops()


def test_resumes_following_through_redis_share_one_redis_connection_per_worker(
    start_proxy, standin, redis_server
):
    """M5: each follower held a blocking XREAD, so Redis connections grew with followers; now
    a worker's followers share one, and the worker's pool is bounded whatever they do."""
    a = start_proxy(RESUME_GRACE="10", REDIS_URL=redis_server.url)
    b = start_proxy(
        RESUME_GRACE="10", REDIS_URL=redis_server.url, WEB_CONCURRENCY="1", MAX_RESUMES_PER_USER="0"
    )
    client = redis_server.client()
    response = ask(a, {"events": 100, "interval": 0.1, "text": "w "})
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    in_redis(redis_server, first)
    before = client.info("clients")["connected_clients"]
    n = 40
    with ThreadPoolExecutor(max_workers=n) as pool:
        followers = [pool.submit(resume, b, first.ids()[-1]) for _ in range(n)]
        time.sleep(3)  # all following by now
        grown = client.info("clients")["connected_clients"] - before
        assert standin.chats()[0]["stream_end"] is None
        response.close()
        for follower in followers:
            follower.result().close()
    assert grown <= redisconn.MAX_CONNECTIONS, f"{grown} more Redis connections for {n} followers"


def test_at_a_drains_deadline_a_resume_of_another_instances_answer_ends_with_a_final_event(
    start_proxy, standin, redis_server
):
    """L8: it was cut at the deadline with no final event; now it gets server_restarting with
    an id and a `retry:` line, as an answer does."""
    a = start_proxy(RESUME_GRACE="30", REDIS_URL=redis_server.url)
    b = start_proxy(
        RESUME_GRACE="30", REDIS_URL=redis_server.url, GUNICORN_CMD_ARGS="--graceful-timeout 4"
    )
    response = ask(a, {"events": 2, "interval": 0.1, "end": "hang"})
    first = read_stream(response, until=lambda r: len(r.data()) >= 1)
    in_redis(redis_server, first)
    resumed = resume(b, first.ids()[-1])
    early = read_stream(resumed, until=lambda r: len(r.data()) >= 1)
    b.process.send_signal(signal.SIGTERM)
    rest = read_stream(resumed)
    response.close()

    last = (early.data() + rest.data())[-1]
    assert last["event"] == "error" and last["code"] == "server_restarting"
    block = rest.events()[-1]
    assert b"\nid: " in block and b"\nretry: 1000\n" in block


def test_the_resumed_copy_of_a_server_restarting_event_keeps_its_retry_line(
    start_proxy, standin, tmp_path
):
    spool = str(tmp_path / "spool")
    a = start_proxy(
        RESUME_GRACE="30", RESUME_SPOOL_DIR=spool, GUNICORN_CMD_ARGS="--graceful-timeout 4"
    )
    b = start_proxy(RESUME_GRACE="30", RESUME_SPOOL_DIR=spool)
    response = ask(a, {"events": 1, "end": "hang"})
    first = read_stream(response, until=lambda r: len(r.data()) >= 1)
    a.process.send_signal(signal.SIGTERM)
    read_stream(response)

    rest = read_stream(resume(b, first.ids()[-1]))

    assert rest.data()[-1]["code"] == "server_restarting"
    assert b"\nretry: 1000\n" in rest.events()[-1]
