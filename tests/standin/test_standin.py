"""The Dify stand-in, exercised over real TCP: the proxy's tests trust its wire behaviour."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from dify_proxy.standin import start_in_thread

ROOT = Path(__file__).resolve().parents[2]
KEY = "app-standin-test-key"


def spawn() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dify_proxy.standin", "--port", "0", "--api-key", KEY],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY http://127.0.0.1:") and line.endswith("/v1\n"), line
    return proc, line.split()[1]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    proc, url = spawn()
    yield url
    proc.terminate()
    proc.wait(5)


@pytest.fixture(autouse=True)
def _reset(base: str) -> None:
    requests.post(base.removesuffix("/v1") + "/_standin/reset", timeout=5)


def calls(base: str) -> list[dict]:
    return requests.get(base.removesuffix("/v1") + "/_standin/calls", timeout=5).json()


def open_streams(base: str) -> int:
    r = requests.get(base.removesuffix("/v1") + "/_standin/open", timeout=5)
    return r.json()["open_streams"]


def send(
    base: str,
    knobs: dict | None = None,
    *,
    mode: str = "streaming",
    user: str = "u1",
    query: str = "hi",
) -> socket.socket:
    """A raw HTTP/1.1 chat request, so tests see the server's chunk framing untouched."""
    url = urlsplit(base)
    body = json.dumps(
        {"query": query, "user": user, "response_mode": mode, "inputs": {"_standin": knobs or {}}}
    ).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=5)
    sock.sendall(
        b"POST /v1/chat-messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return sock


def read_head(f) -> tuple[int, dict[str, str]]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers


def chunks(f) -> Iterator[bytes]:
    """Chunk payloads as framed by the server, up to (not including) the terminating chunk."""
    while size := f.readline():
        if (n := int(size, 16)) == 0:
            f.readline()
            return
        yield f.read(n)
        f.read(2)


def read_stream(f) -> tuple[list[bytes], bool]:
    """All chunks of one streamed answer, and whether it ended with the terminating chunk."""
    got = []
    while size := f.readline():
        if (n := int(size, 16)) == 0:
            f.readline()
            return got, True
        got.append(f.read(n))
        f.read(2)
    return got, False


def stream(sock: socket.socket) -> list[bytes]:
    f = sock.makefile("rb")
    status, headers = read_head(f)
    assert (status, headers["content-type"]) == (200, "text/event-stream; charset=utf-8")
    assert headers["transfer-encoding"] == "chunked"
    got, terminated = read_stream(f)
    assert terminated
    return got


def events(body: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for block in body.split(b"\n\n")[:-1]:
        out.append(json.loads(block[6:]) if block.startswith(b"data: ") else block.decode())
    return out


def kinds(body: bytes) -> list[str]:
    """Each event's type, `ping` for a ping."""
    return [e["event"] if isinstance(e, dict) else "ping" for e in events(body)]


OPENING = ["ping", "workflow_started"]  # how every chatflow stream begins
NODES = ["node_started", "node_finished"] * 2  # Start, then Answer
CLOSING = [*NODES, "message_end", "workflow_finished"]  # after the answer's messages


def test_default_reply_is_one_word_per_chunk_then_message_end(base: str) -> None:
    with send(base) as sock:
        got = stream(sock)
    evs = [events(c) for c in got]
    assert all(len(e) == 1 for e in evs)  # one event per chunk
    messages = [e[0] for e in evs if isinstance(e[0], dict) and e[0]["event"] == "message"]
    answer = "".join(e["answer"] for e in messages)
    assert answer == (
        "You said: hi. This reply comes from the local Dify stand-in, streamed word by word."
    )
    assert kinds(b"".join(got)) == [*OPENING, *["message"] * len(messages), *CLOSING]
    end = evs[-2][0]
    assert end["event"] == "message_end"
    assert list(end["metadata"]["usage"]) == [
        "prompt_tokens",
        "prompt_unit_price",
        "prompt_price_unit",
        "prompt_price",
        "completion_tokens",
        "completion_unit_price",
        "completion_price_unit",
        "completion_price",
        "total_tokens",
        "total_price",
        "currency",
        "latency",
        "time_to_first_token",
        "time_to_generate",
    ]
    assert calls(base)[0]["stream_end"] == "completed"


def test_events_are_compact_raw_utf8_in_dify_key_order(base: str) -> None:
    with send(base, {"events": 1, "text": "a\u2028é"}) as sock:
        got = stream(sock)
    assert "a\u2028é".encode() in got[2]
    assert b", " not in got[2] and got[2].startswith(b'data: {"event":"message","conversation_id"')
    ev = events(got[2])[0]
    assert list(ev) == [
        "event",
        "conversation_id",
        "message_id",
        "created_at",
        "task_id",
        "id",
        "answer",
        "from_variable_selector",
    ]
    assert ev["id"] == ev["message_id"] != ev["task_id"]


def test_a_lone_surrogate_breaks_neither_the_stream_nor_the_call_log(base: str) -> None:
    # legal in JSON text ("\\ud800"), not encodable as UTF-8: it goes back out as its escape
    with send(base, {"events": 1, "text": "x\udc00y"}, query="a\ud800b") as sock:
        got = stream(sock)
    evs = events(b"".join(got))
    assert kinds(b"".join(got)) == [*OPENING, "message", *CLOSING]
    assert evs[2]["answer"] == "x\udc00y"
    call = calls(base)[0]
    assert (call["json"]["query"], call["stream_end"]) == ("a\ud800b", "completed")


def test_split_sends_fixed_size_chunks_that_cut_utf8_characters(base: str) -> None:
    with send(base, {"events": 2, "text": "é" * 8, "split": 3, "split_delay": 0}) as sock:
        got = stream(sock)
    assert {len(c) for c in got} <= {1, 2, 3}
    assert any(c[-1:] == b"\xc3" for c in got)  # a piece ends inside a 2-byte character
    assert kinds(b"".join(got)) == [*OPENING, "message", "message", *CLOSING]


def test_coalesce_sends_all_events_and_the_end_in_one_chunk(base: str) -> None:
    with send(base, {"events": 3, "coalesce": True}) as sock:
        got = stream(sock)
    assert got[:2] == [b"event: ping\n\n", got[1]]  # the opening is not held back
    assert len(got) == 3
    assert kinds(got[2]) == ["message"] * 3 + CLOSING


def test_pings_are_bare_event_lines_before_the_first_message(base: str) -> None:
    with send(base, {"events": 1, "pings": 2, "ping_interval": 0.01}) as sock:
        got = stream(sock)
    assert kinds(b"".join(got[:5])) == [*OPENING, "ping", "ping", "message"]
    assert got[2:4] == [b"event: ping\n\n", b"event: ping\n\n"]


def test_error_end_sends_an_error_event_then_ends_the_body(base: str) -> None:
    with send(base, {"events": 1, "end": "error"}) as sock:
        got = stream(sock)
    err = events(got[-1])[0]
    assert (err["event"], err["status"], err["code"]) == ("error", 400, "completion_request_error")
    assert "task_id" not in err
    assert calls(base)[0]["stream_end"] == "error_event"


@pytest.mark.parametrize("end", ["drop", "drop_mid_event"])
def test_drop_closes_the_connection_without_a_terminating_chunk(base: str, end: str) -> None:
    with send(base, {"events": 1, "end": end}) as sock:
        f = sock.makefile("rb")
        read_head(f)
        got, terminated = read_stream(f)
    assert not terminated
    assert got[-1].endswith(b"\n\n") == (end == "drop")
    assert calls(base)[0]["stream_end"] == "dropped"


def test_client_close_during_a_silent_hang_is_recorded_at_once(base: str) -> None:
    with send(base, {"events": 1, "end": "hang"}) as sock:
        f = sock.makefile("rb")
        read_head(f)
        next(chunks(f))
        assert open_streams(base) == 1
        f.close()
    closed_at = time.time()
    deadline = closed_at + 2
    while calls(base)[0]["stream_end"] is None and time.time() < deadline:
        time.sleep(0.01)
    call = calls(base)[0]
    assert call["stream_end"] == "client_closed"
    assert call["ended_at"] - closed_at < 0.5
    assert open_streams(base) == 0


def test_stop_route_ends_the_stream_with_message_end(base: str) -> None:
    with send(base, {"events": 100, "interval": 0.5}) as sock:
        f = sock.makefile("rb")
        read_head(f)
        it = chunks(f)
        next(it)  # the opening ping
        task_id = events(next(it))[0]["task_id"]
        r = requests.post(
            f"{base}/chat-messages/{task_id}/stop",
            json={"user": "u1"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=5,
        )
        assert r.json() == {"result": "success"}
        t0 = time.monotonic()
        rest = list(it)
    assert time.monotonic() - t0 < 0.3
    assert kinds(b"".join(rest))[-2:] == ["workflow_finished", "message_end"]
    finished = events(b"".join(rest))[-2]["data"]
    assert (finished["status"], finished["error"]) == ("stopped", "Aborted: User requested stop")
    assert calls(base)[0]["stream_end"] == "stopped"


def test_missing_key_gets_401_and_the_key_is_never_recorded(base: str) -> None:
    r = requests.post(
        f"{base}/chat-messages",
        json={"query": "q", "inputs": {}, "user": "u"},
        headers={"Authorization": "Bearer wrong"},
        timeout=5,
    )
    assert (r.status_code, r.json()) == (
        401,
        {"code": "unauthorized", "message": "Access token is invalid", "status": 401},
    )
    call = calls(base)[0]
    assert (call["headers"]["authorization"], call["auth_ok"]) == ("present", False)
    assert "wrong" not in json.dumps(call)


def test_missing_user_gets_400_invalid_param(base: str) -> None:
    r = requests.post(
        f"{base}/chat-messages",
        json={"query": "q", "inputs": {}},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_param"


def test_status_knob_serves_a_non_json_page_with_retry_after(base: str) -> None:
    knobs = {"status": 503, "body": "<html>busy</html>", "retry_after": 7}
    r = requests.post(
        f"{base}/chat-messages",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"query": "q", "inputs": {"_standin": knobs}, "user": "u"},
        timeout=5,
    )
    assert (r.status_code, r.text, r.headers["Retry-After"]) == (503, "<html>busy</html>", "7")
    assert r.headers["Content-Type"] == "text/html"


def test_blocking_mode_answers_one_json_message(base: str) -> None:
    r = requests.post(
        f"{base}/chat-messages",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "query": "q",
            "inputs": {"_standin": {"text": "hello"}},
            "user": "u",
            "conversation_id": "c-1",
        },
        timeout=5,
    )
    body = r.json()
    assert (body["event"], body["mode"], body["answer"]) == ("message", "advanced-chat", "hello")
    assert body["conversation_id"] == "c-1" and body["metadata"]["usage"]["total_tokens"] > 0


def test_keep_alive_serves_two_streams_on_one_socket(base: str) -> None:
    with send(base, {"events": 1}) as sock:
        f = sock.makefile("rb")
        read_head(f)
        first = list(chunks(f))
        body = json.dumps(
            {
                "query": "q",
                "inputs": {"_standin": {"events": 2}},
                "user": "u",
                "response_mode": "streaming",
            }
        ).encode()
        sock.sendall(
            b"POST /v1/chat-messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        assert read_head(f)[0] == 200
        second = list(chunks(f))
    assert (len(first), len(second)) == (1 + 8, 2 + 8)


def test_chunked_request_body_is_refused_with_411(base: str) -> None:
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat-messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        assert read_head(sock.makefile("rb"))[0] == 411


def test_unknown_path_is_a_404_in_dify_error_shape(base: str) -> None:
    r = requests.get(f"{base}/nope", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_start_in_thread_serves_until_stopped() -> None:
    url, stop = start_in_thread(api_key=KEY)
    try:
        r = requests.post(
            f"{url}/chat-messages",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"query": "q", "inputs": {"_standin": {"text": "t"}}, "user": "u"},
            timeout=5,
        )
        assert r.json()["answer"] == "t"
    finally:
        stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url.removesuffix("/v1") + "/_standin/open", timeout=2)


def test_sigterm_exits_cleanly_with_a_stream_open() -> None:
    proc, url = spawn()
    with send(url, {"end": "hang", "events": 1}) as sock:
        f = sock.makefile("rb")
        read_head(f)
        next(chunks(f))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0


RECORDED = (
    'data: {"event":"message","answer":"a"}\n\nevent: ping\n\ndata: {"event":"message_end"}\n\n'
)


def test_a_replayed_recording_arrives_byte_for_byte_in_the_pieces_asked_for(base: str) -> None:
    with send(base, {"replay": RECORDED, "replay_pieces": [5, 1, 7]}) as sock:
        got = stream(sock)
    assert b"".join(got) == RECORDED.encode()
    assert [len(c) for c in got[:4]] == [5, 1, 7, 5]
    assert calls(base)[0]["stream_end"] == "completed"


def test_a_replay_without_pieces_is_one_write_per_event(base: str) -> None:
    with send(base, {"replay": RECORDED}) as sock:
        got = stream(sock)
    assert got == [block.encode() + b"\n\n" for block in RECORDED.split("\n\n") if block]


def test_replay_pieces_must_be_positive_sizes(base: str) -> None:
    with send(base, {"replay": RECORDED, "replay_pieces": [3, 0]}) as sock:
        status, _ = read_head(sock.makefile("rb"))
    assert status == 400


def test_a_stored_recording_replays_by_name_so_a_get_url_stays_short(base: str) -> None:
    root = base.removesuffix("/v1")
    requests.put(f"{root}/_standin/recordings/short", data=RECORDED.encode(), timeout=5)
    with send(base, {"replay_recording": "short", "replay_pieces": [4]}) as sock:
        got = stream(sock)
    assert b"".join(got) == RECORDED.encode()


def test_an_unknown_recording_name_is_a_400(base: str) -> None:
    with send(base, {"replay_recording": "never-stored"}) as sock:
        status, _ = read_head(sock.makefile("rb"))
    assert status == 400


def test_a_lone_surrogate_in_a_message_is_answered_and_kept_in_the_call_log(base: str) -> None:
    """Issue 11, item 13: `"a\\ud800b"` is valid JSON whose text cannot be UTF-8 encoded; the
    stand-in answers it, and its call log still reads (with the escape kept), as it did before."""
    question = {"query": "a\ud800b", "user": "u1", "response_mode": "blocking", "inputs": {}}
    body = json.dumps(question)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = requests.post(f"{base}/chat-messages", data=body, headers=headers, timeout=5)
    assert answer.status_code == 200
    assert answer.json()["answer"]
    log = requests.get(base.removesuffix("/v1") + "/_standin/calls", timeout=5)
    assert log.status_code == 200
    assert [c["json"]["query"] for c in log.json()] == ["a\ud800b"]
