"""Issue 11: what an outside probe and a first deploy found, one regression test per finding,
each through real gunicorn against the stand-in (which must not be called for bad input)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import pytest
import requests

from tests.integration.conftest import AUTH_COOKIE
from tests.support import processes, tokens
from tests.support.raw_http import connect, exchange, read_response, request_head


def bearer(token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or tokens.hs256()}"}


def assert_error(response, status: int, code: str | None = None) -> None:
    """An error in Dify's JSON shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "status"} and body["status"] == status
    if code is not None:
        assert body["code"] == code


def assert_no_traceback(proxy) -> None:
    log = proxy.log()
    assert "Traceback" not in log
    assert "unhandled error" not in log


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- 7. inputs that gave a 500 with a cookie session configured ------------------------------


def test_7_an_unparsable_referer_without_origin_is_403_not_500(proxy, standin):
    session = quote(json.dumps({"access_token": tokens.hs256()}))
    response = requests.post(
        f"{proxy.url}/api/chat",
        json={"message": "hi"},
        headers={"Referer": "http://[", "Cookie": f"{AUTH_COOKIE}={session}"},
        timeout=10,
    )
    assert_error(response, 403, "forbidden")
    assert standin.calls() == []
    assert_no_traceback(proxy)


def test_7_a_cookie_nested_3000_levels_deep_is_no_session(proxy, standin):
    response = requests.post(
        f"{proxy.url}/api/chat",
        json={"message": "hi"},
        headers={"Cookie": f"{AUTH_COOKIE}={nested(3000)}", "Origin": proxy.url},
        timeout=10,
    )
    assert_error(response, 401, "unauthorized")
    assert standin.calls() == []
    assert_no_traceback(proxy)


# --- 8. JSON nested about 1,000 levels deep ---------------------------------------------------


def test_8_a_body_nested_1000_levels_deep_is_400(proxy, standin):
    body = '{"message": "hi", "inputs": {"a": ' + nested(1000) + "}}"
    response = requests.post(
        f"{proxy.url}/api/chat",
        data=body,
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert "nested" in response.json()["message"]
    assert standin.calls() == []
    assert_no_traceback(proxy)


def test_8_get_inputs_nested_1000_levels_deep_are_400(proxy, standin):
    response = requests.get(
        f"{proxy.url}/api/chat",
        params={"message": "hi", "inputs": '{"a": ' + nested(1000) + "}"},
        headers=bearer(),
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert standin.calls() == []
    assert_no_traceback(proxy)


# --- 9. numbers JSON does not have ------------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_9_a_non_finite_number_is_400_and_no_false_dify_down_alert(proxy, standin, number):
    response = requests.post(
        f"{proxy.url}/api/chat",
        data='{"message": "hi", "inputs": {"n": NUMBER}}'.replace("NUMBER", number),
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert standin.calls() == []
    assert "dify unreachable" not in proxy.log()


def test_a_lone_surrogate_in_a_message_is_400_before_dify(proxy, standin):
    """Dify stores messages as UTF-8 text, which has no form for `\\ud800`."""
    response = requests.post(
        f"{proxy.url}/api/chat",
        data='{"message": "a\\ud800b"}',
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert_error(response, 400, "invalid_param")
    assert standin.calls() == []


# --- 3. HEAD /api/chat -------------------------------------------------------------------------


def open_streams_gauge(proxy) -> float:
    text = requests.get(f"{proxy.url}/metrics", timeout=5).text
    match = re.search(r"^dify_proxy_open_streams (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


@pytest.mark.parametrize("path", ["/api/chat?message=hi", "/api/conversations", "/api/parameters"])
def test_3_head_never_calls_dify(proxy, standin, path):
    responses = [
        requests.head(f"{proxy.url}{path}", headers=bearer(), timeout=10) for _ in range(4)
    ]
    assert [r.status_code for r in responses] == [405] * 4
    assert "HEAD" not in responses[0].headers["Allow"]
    assert "GET" in responses[0].headers["Allow"]
    assert standin.calls() == []


def test_3_heads_leave_no_stream_lease_behind(start_proxy, standin):
    proxy = start_proxy(MAX_STREAMS_PER_USER="1")
    for _ in range(3):
        requests.head(f"{proxy.url}/api/chat?message=hi", headers=bearer(), timeout=10)
    response = requests.get(
        f"{proxy.url}/api/chat", params={"message": "hi"}, headers=bearer(), timeout=10
    )
    assert response.status_code == 200
    assert open_streams_gauge(proxy) == 0


# --- 4. metric labels from fixed sets ----------------------------------------------------------


def test_4_made_up_methods_add_no_metric_series(proxy):
    methods = [f"X{n:04d}" for n in range(200)]
    for method in methods:
        exchange(proxy.url, request_head(method, "/api/chat", {"Content-Length": "0"}))
    metrics = requests.get(f"{proxy.url}/metrics", timeout=5).text
    assert not any(f'method="{method}"' in metrics for method in methods)
    assert 'method="other"' in metrics
    series = [line for line in metrics.splitlines() if line.startswith("dify_proxy_requests_total")]
    assert len(series) < 50


# --- 11. a large Supabase cookie session -------------------------------------------------------


def test_11_a_session_cookie_in_three_chunks_is_accepted(proxy, standin):
    """@supabase/ssr splits the session at about 3,200 characters; three chunks (about 9.5 KB
    in one Cookie header) got 431 from gunicorn's default 8,190-byte field limit."""
    session = {
        "access_token": tokens.hs256(),
        "refresh_token": "r" * 40,
        "user": {"id": tokens.USER_ID, "user_metadata": {"bio": "x" * 6000}},
    }
    value = "base64-" + base64.urlsafe_b64encode(json.dumps(session).encode()).decode()
    chunks = [value[i : i + 3180] for i in range(0, len(value), 3180)]
    assert len(chunks) == 3
    cookie = "; ".join(f"{AUTH_COOKIE}.{n}={chunk}" for n, chunk in enumerate(chunks))
    assert len(cookie) > 9000
    response = requests.post(
        f"{proxy.url}/api/chat",
        json={"message": "hi", "response_mode": "blocking"},
        headers={"Cookie": cookie, "Origin": proxy.url},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert len(standin.chats()) == 1


# --- 14. minor -----------------------------------------------------------------------------


def test_14_retry_after_is_not_sent_on_a_200(proxy, standin):
    response = proxy.chat({"message": "hi", "response_mode": "blocking"})
    assert response.status_code == 200
    assert "Retry-After" not in response.headers


def test_14_bad_input_does_not_use_up_the_rate_limit(start_proxy, standin):
    proxy = start_proxy(RATE_LIMIT="2/minute", WEB_CONCURRENCY="1")  # one process: one count
    for _ in range(5):
        assert proxy.chat({"message": " "}).status_code == 400
        response = requests.post(f"{proxy.url}/api/chat", data="hi", headers=bearer(), timeout=10)
        assert response.status_code == 415
    blocking = {"message": "hi", "response_mode": "blocking"}
    assert [proxy.chat(blocking).status_code for _ in range(3)] == [200, 200, 429]


def test_14_demo_static_files_get_a_request_log_line(start_proxy):
    proxy = start_proxy(ENABLE_DEMO="1")
    assert requests.get(f"{proxy.url}/demo/static/demo.css", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while '"path": "/demo/static/demo.css"' not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)


def test_14_a_failed_bind_leaves_no_metrics_directory(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "TMPDIR": str(tmp_path),
            "DIFY_API_KEY": "app-bind-test-key-0123456789",
            "SUPABASE_JWT_SECRET": tokens.SECRET,
        }
        result = subprocess.run(
            [sys.executable, "-m", "gunicorn", "app:app", "--config", "gunicorn.conf.py",
             "--bind", f"127.0.0.1:{port}"],
            cwd=processes.ROOT,
            env=env,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert list(tmp_path.glob("dify-proxy-metrics-*")) == []


# --- 5. slow upload bodies ----------------------------------------------------------------------


def slow_upload_head(sub: str, length: int = 100_000) -> bytes:
    return request_head(
        "POST",
        "/api/files/upload",
        {
            "Authorization": f"Bearer {tokens.hs256(sub=sub)}",
            "Content-Type": "multipart/form-data; boundary=b",
            "Content-Length": str(length),
        },
    )


def test_5_many_slow_uploads_do_not_stop_healthz(start_proxy, standin):
    """More slow uploads than the worker has connection slots, one byte a second each: uploads
    over the per-user cap get 429 before their body is read, the rest 408 once they fall behind
    the minimum pace, and /healthz answers throughout. Before, every slot stayed taken."""
    proxy = start_proxy(WEB_CONCURRENCY="1", WORKER_CONNECTIONS="40", RATE_LIMIT="10000/minute")
    users = [f"00000000-0000-4000-8000-0000000005{n:02d}" for n in range(4)]
    uploads = []
    for n in range(60):
        sock = connect(proxy.url, timeout=60)
        sock.setblocking(False)
        uploads.append(sock)
        try:
            sock.send(slow_upload_head(users[n % len(users)]) + b"-")
        except BlockingIOError:
            pass
    statuses: dict[int, int] = {}
    healthz = []
    deadline = time.monotonic() + 45
    while len(statuses) < len(uploads) and time.monotonic() < deadline:
        for n, sock in enumerate(uploads):
            if n in statuses:
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:
                statuses[n] = int(data.split()[1]) if data.startswith(b"HTTP/1.1") else 0
                continue
            try:
                sock.send(b"-")
            except (BlockingIOError, OSError):
                pass
        healthz.append(requests.get(f"{proxy.url}/healthz", timeout=15).status_code)
        time.sleep(1)
    for sock in uploads:
        sock.close()
    assert healthz and set(healthz) == {200}
    assert len(statuses) == len(uploads), f"{len(uploads) - len(statuses)} uploads still open"
    counts = {status: list(statuses.values()).count(status) for status in set(statuses.values())}
    assert set(counts) <= {408, 429}, counts
    assert 1 <= counts.get(408, 0) <= 2 * len(users), counts  # at most 2 at a time per user
    assert standin.calls() == []


def test_5_an_upload_that_stalls_gets_408_and_never_reaches_dify(proxy, standin):
    with connect(proxy.url, timeout=30) as sock:
        sock.sendall(slow_upload_head(tokens.USER_ID) + b"--b\r\n")
        response = read_response(sock)
    assert response.status == 408
    assert response.json()["code"] == "request_timeout"
    assert standin.calls() == []


def test_5_uploads_count_under_the_rate_limit(start_proxy, standin):
    proxy = start_proxy(RATE_LIMIT="2/minute", WEB_CONCURRENCY="1")  # one process: one count
    statuses = [
        requests.post(
            f"{proxy.url}/api/files/upload",
            files={"file": ("a.txt", b"hello", "text/plain")},
            headers=bearer(),
            timeout=10,
        ).status_code
        for _ in range(3)
    ]
    assert statuses == [201, 201, 429]
    assert len([c for c in standin.calls() if c["path"] == "/v1/files/upload"]) == 2


# --- 10. malformed chunked bodies ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"-1\r\nx\r\n0\r\n\r\n",
        b"0x10\r\n0123456789abcdef\r\n0\r\n\r\n",
        b"+10\r\n0123456789abcdef\r\n0\r\n\r\n",
        b"10 \r\n0123456789abcdef\r\n0\r\n\r\n",
        b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the chunk's data
    ],
    ids=["minus-one", "hex-prefix", "plus-sign", "trailing-space", "missing-terminator"],
)
def test_10_a_malformed_chunked_body_is_400(proxy, standin, body):
    head = request_head(
        "POST",
        "/api/chat",
        {
            **bearer(),
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            "Connection": "close",
        },
    )
    response = exchange(proxy.url, head + body)
    assert response.status == 400
    assert response.json()["status"] == 400
    assert standin.calls() == []
    assert_no_traceback(proxy)
