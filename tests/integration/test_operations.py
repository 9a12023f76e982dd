"""Per-user limits shared through a real Redis, leases, token budgets, /readyz and /metrics,
through real gunicorn instances against the Dify stand-in."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.conftest import Proxy, scenario
from tests.support import processes, tokens
from tests.support.redis_server import RedisServer
from tests.support.sse_client import read_stream


def user(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def ask(proxy: Proxy, sub: str, **knobs) -> requests.Response:
    body = {**scenario(**{"events": 1, "interval": 0, **knobs}), "response_mode": "blocking"}
    return proxy.chat(body, token=tokens.hs256(sub=sub))


def open_stream(proxy: Proxy, sub: str) -> requests.Response:
    """A stream that stays open (Dify keeps it open) until the client closes it."""
    response = proxy.chat(scenario(events=1, end="hang"), token=tokens.hs256(sub=sub))
    if response.status_code == 200:
        read_stream(response, until=lambda r: bool(r.data_events()), seconds=10)
    return response


# -- request rate limits -----------------------------------------------------------------------


def test_a_rate_limit_holds_across_two_instances_through_redis(start_proxy, redis_server):
    a = start_proxy(REDIS_URL=redis_server.url, RATE_LIMIT="3/minute")
    b = start_proxy(REDIS_URL=redis_server.url, RATE_LIMIT="3/minute")
    statuses = [ask(proxy, user(1)).status_code for proxy in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429]


def test_over_the_rate_limit_is_a_json_429_with_retry_after_and_ratelimit_headers(
    start_proxy, redis_server, standin
):
    proxy = start_proxy(REDIS_URL=redis_server.url, RATE_LIMIT="1/minute")
    ask(proxy, user(2))
    calls_before = len(standin.chats())
    response = ask(proxy, user(2))
    assert response.status_code == 429
    assert response.json()["code"] == "too_many_requests"
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert response.headers["X-RateLimit-Limit"] == "1"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Reset" in response.headers
    assert len(standin.chats()) == calls_before


def test_rate_limits_are_per_user_not_per_address(start_proxy, redis_server):
    proxy = start_proxy(REDIS_URL=redis_server.url, RATE_LIMIT="1/minute")
    assert ask(proxy, user(3)).status_code == 200
    assert ask(proxy, user(3)).status_code == 429
    assert ask(proxy, user(4)).status_code == 200


@pytest.fixture
def tls_redis_server():
    server = RedisServer(tls=True)
    server.start()
    yield server
    server.stop()


def test_tls_redis_with_a_self_signed_certificate_is_used_out_of_the_box(
    start_proxy, tls_redis_server
):
    """Issue 11, item 2: Heroku Redis's `rediss://` with its self-signed certificate. Before, the
    proxy refused the certificate, /readyz said unavailable, and limits counted per process."""
    a = start_proxy(REDIS_URL=tls_redis_server.url, RATE_LIMIT="3/minute", MAX_STREAMS_PER_USER="1")
    b = start_proxy(REDIS_URL=tls_redis_server.url, RATE_LIMIT="3/minute", MAX_STREAMS_PER_USER="1")
    assert requests.get(f"{a.url}/readyz", timeout=5).json()["checks"]["redis"] == "ok"
    statuses = [ask(proxy, user(40)).status_code for proxy in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429]
    with open_stream(a, user(41)) as held:
        assert held.status_code == 200
        assert tls_redis_server.client().zcard(f"dify-proxy:streams:{user(41)}") == 1
        assert open_stream(b, user(41)).status_code == 429
    assert "redis unavailable" not in a.log() + b.log()


def test_tls_redis_verification_can_be_asked_for_in_the_url(start_proxy, tls_redis_server):
    """`?ssl_cert_reqs=required` wins over the default: then this certificate is refused."""
    proxy = start_proxy(REDIS_URL=f"{tls_redis_server.url}?ssl_cert_reqs=required")
    assert requests.get(f"{proxy.url}/readyz", timeout=5).json()["checks"]["redis"] == "unavailable"


# -- concurrent streams ----------------------------------------------------------------------


def test_concurrent_streams_are_limited_per_user_across_instances(start_proxy, redis_server):
    a = start_proxy(REDIS_URL=redis_server.url, MAX_STREAMS_PER_USER="2")
    b = start_proxy(REDIS_URL=redis_server.url, MAX_STREAMS_PER_USER="2")
    first, second = open_stream(a, user(5)), open_stream(b, user(5))
    third = open_stream(a, user(5))
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert third.json()["code"] == "too_many_streams"
    assert open_stream(b, user(6)).status_code == 200  # another user is not affected
    first.close()
    deadline = time.monotonic() + 10
    while (again := open_stream(b, user(5))).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert again.status_code == 200  # the closed stream's slot came back
    for response in (second, again):
        response.close()


def test_a_killed_workers_stream_lease_expires(start_proxy, redis_server):
    a = start_proxy(
        REDIS_URL=redis_server.url,
        MAX_STREAMS_PER_USER="1",
        STREAM_LEASE_SECONDS="2",
        WEB_CONCURRENCY="1",
    )
    b = start_proxy(REDIS_URL=redis_server.url, MAX_STREAMS_PER_USER="1")
    stream = open_stream(a, user(7))
    assert stream.status_code == 200
    workers = processes.children(a.process.pid)
    for pid in [*workers, a.process.pid]:  # SIGKILL: no cleanup runs, only expiry frees it
        processes.kill(pid)
    assert open_stream(b, user(7)).status_code == 429
    time.sleep(2.5)
    assert open_stream(b, user(7)).status_code == 200


def test_a_long_stream_renews_its_lease(start_proxy, redis_server):
    proxy = start_proxy(
        REDIS_URL=redis_server.url, MAX_STREAMS_PER_USER="1", STREAM_LEASE_SECONDS="1.5"
    )
    stream = open_stream(proxy, user(8))
    time.sleep(4)  # more than twice the lease: only renewals keep the slot
    assert open_stream(proxy, user(8)).status_code == 429
    stream.close()


# -- token budget ----------------------------------------------------------------------------


def test_a_user_over_the_daily_token_budget_gets_429_before_any_dify_call(
    start_proxy, redis_server, standin
):
    proxy = start_proxy(REDIS_URL=redis_server.url, DAILY_TOKEN_BUDGET="20")
    stream = proxy.chat(scenario(events=10, interval=0), token=tokens.hs256(sub=user(9)))
    read_stream(stream)  # 12 tokens, counted from message_end
    assert ask(proxy, user(9), events=10).status_code == 200  # blocking: 12 more
    calls_before = len(standin.chats())
    response = ask(proxy, user(9))
    assert response.status_code == 429
    assert response.json()["code"] == "token_budget_exceeded"
    assert int(response.headers["Retry-After"]) > 0
    assert len(standin.chats()) == calls_before
    assert ask(proxy, user(10)).status_code == 200


def test_the_token_budget_is_shared_across_instances(start_proxy, redis_server):
    a = start_proxy(REDIS_URL=redis_server.url, DAILY_TOKEN_BUDGET="10")
    b = start_proxy(REDIS_URL=redis_server.url, DAILY_TOKEN_BUDGET="10")
    assert ask(a, user(11), events=10).status_code == 200
    assert ask(b, user(11)).status_code == 429


@pytest.mark.parametrize("grace", ["0", "0.5"])
def test_tokens_of_answers_nobody_reads_count_against_the_budget(start_proxy, standin, grace):
    """Issue 20, M4: a client that asks and leaves at once, again and again, is refused once
    the tokens Dify spent on its abandoned answers use up the budget."""
    # Each answer costs at least 3 tokens (a 2-token prompt, 1 event read): refused by the 5th.
    proxy = start_proxy(WEB_CONCURRENCY="1", RESUME_GRACE=grace, DAILY_TOKEN_BUDGET="12")
    token = tokens.hs256(sub=user(14))
    long_answer = scenario(events=400, interval=0.05, text="w ")
    for asked in range(1, 7):
        response = proxy.chat(long_answer, token=token)
        if response.status_code == 429:
            break
        read_stream(response, until=lambda r: bool(r.data_events()), seconds=10)
        response.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # the client is gone
        response.close()
        deadline = time.monotonic() + 30
        while abandoned(proxy) < asked:
            assert time.monotonic() < deadline, "the answer was never abandoned"
            time.sleep(0.1)
    assert response.status_code == 429, "never refused after 6 abandoned answers"
    assert response.json()["code"] == "token_budget_exceeded"
    # Dify ended each answer itself once told to stop, with its usage report
    assert {c["stream_end"] for c in standin.chats()} == {"stopped"}


def abandoned(proxy: Proxy) -> float:
    text = requests.get(f"{proxy.url}/metrics", timeout=5).text
    return metric(text, "dify_proxy_answers_abandoned_total")


# -- Redis outage ----------------------------------------------------------------------------


def test_when_redis_stops_chat_keeps_working_and_readyz_reports_it(start_proxy, redis_server):
    proxy = start_proxy(
        REDIS_URL=redis_server.url,
        RATE_LIMIT="100/minute",
        MAX_STREAMS_PER_USER="2",
        DAILY_TOKEN_BUDGET="100000",
    )
    assert requests.get(f"{proxy.url}/readyz", timeout=5).json()["checks"]["redis"] == "ok"
    redis_server.stop()
    for _ in range(6):
        assert ask(proxy, user(12)).status_code == 200
        received = read_stream(
            proxy.chat(scenario(events=2, interval=0), token=tokens.hs256(sub=user(12)))
        )
        assert received.kinds()[-2:] == ["message_end", "workflow_finished"]
    ready = requests.get(f"{proxy.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "degraded",
        "checks": {"config": "ok", "redis": "unavailable"},
    }
    errors = [line for line in proxy.log().splitlines() if "redis unavailable" in line]
    assert 1 <= len(errors) <= 2  # once per interval, per worker (two workers)


def test_redis_going_silent_mid_request_is_not_a_500(start_proxy, redis_server, standin):
    """The rate limit is counted after the view (so that refused input costs nothing); a
    Redis that stops answering by then used to turn a good answer into a 500 (the benchmark's
    hold mode, with Redis saturated, lost 238 of 5,000 streams that way)."""
    proxy = start_proxy(REDIS_URL=redis_server.url, RATE_LIMIT="100/minute")
    assert ask(proxy, user(14)).status_code == 200  # the limiter is on Redis, not fallen back
    pool = ThreadPoolExecutor(1)
    asked = pool.submit(ask, proxy, user(14), header_delay=1.5)
    time.sleep(0.5)  # past the limiter's check, while the view waits for Dify's head
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        response = asked.result(timeout=30)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
        pool.shutdown()
    assert response.status_code == 200, proxy.log()[-4000:]
    assert response.json()["event"] == "message"


def test_when_redis_is_down_limits_fall_back_to_the_process(start_proxy, redis_server):
    proxy = start_proxy(REDIS_URL=redis_server.url, MAX_STREAMS_PER_USER="1", WEB_CONCURRENCY="1")
    redis_server.stop()
    first = open_stream(proxy, user(13))
    assert first.status_code == 200
    assert open_stream(proxy, user(13)).status_code == 429
    first.close()


def test_readyz_says_ok_when_redis_comes_back(start_proxy, redis_server):
    proxy = start_proxy(REDIS_URL=redis_server.url)
    redis_server.stop()
    assert requests.get(f"{proxy.url}/readyz", timeout=5).json()["status"] == "degraded"
    redis_server.start()
    assert requests.get(f"{proxy.url}/readyz", timeout=5).json()["status"] == "ok"


# -- metrics, request ids --------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}(?:\{{{wanted}\}})? ([0-9.e+]+)$" if wanted else rf"^{name} ([0-9.e+]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_requests_across_both_workers(start_proxy):
    proxy = start_proxy(WEB_CONCURRENCY="2", RATE_LIMIT="off", MAX_STREAMS_PER_USER="0")

    def one_stream(_: int) -> None:
        read_stream(proxy.chat(scenario(events=3, interval=0.2)))

    with ThreadPoolExecutor(max_workers=20) as pool:  # at once, so both workers take some
        list(pool.map(one_stream, range(40)))
    served_by = set(re.findall(r"\[(\d+)\] \[DEBUG\] POST /api/chat", proxy.log()))
    assert len(served_by) == 2
    text = requests.get(f"{proxy.url}/metrics", timeout=5).text
    assert (
        metric(text, "dify_proxy_requests_total", method="POST", route="/api/chat", status="200")
        == 40
    )
    assert metric(text, "dify_proxy_stream_ends_total", reason="completed") == 40


def test_metrics_report_streams_tokens_and_end_reasons(start_proxy):
    proxy = start_proxy(RATE_LIMIT="off")
    read_stream(proxy.chat(scenario(events=3, interval=0)))
    read_stream(proxy.chat(scenario(events=1, end="drop")))
    text = requests.get(f"{proxy.url}/metrics", timeout=5).text
    assert metric(text, "dify_proxy_stream_ends_total", reason="completed") == 1
    assert metric(text, "dify_proxy_stream_ends_total", reason="upstream_dropped") == 1
    assert metric(text, "dify_proxy_upstream_errors_total", kind="stream_upstream_dropped") == 1
    # 5 from the first answer's usage report; the dropped one brought none, so it counts one
    # token per event Dify sent: workflow_started and one message
    assert metric(text, "dify_proxy_tokens_total") == 5 + 2
    assert metric(text, "dify_proxy_time_to_first_byte_seconds_count") == 2
    assert metric(text, "dify_proxy_open_streams") == 0


def test_metrics_can_require_a_token(start_proxy):
    proxy = start_proxy(METRICS_TOKEN="metrics-secret")
    assert requests.get(f"{proxy.url}/metrics", timeout=5).status_code == 401
    ok = requests.get(
        f"{proxy.url}/metrics", timeout=5, headers={"Authorization": "Bearer metrics-secret"}
    )
    assert ok.status_code == 200


def test_a_request_id_is_echoed_logged_and_sent_on_to_dify(start_proxy, standin):
    proxy = start_proxy()
    response = proxy.chat(scenario(events=1, interval=0), headers={"X-Request-ID": "abc-123"})
    read_stream(response)
    assert response.headers["X-Request-ID"] == "abc-123"
    (call,) = standin.chats()
    assert call["headers"]["x-request-id"] == "abc-123"
    lines = [json.loads(line) for line in proxy.log().splitlines() if '"abc-123"' in line]
    assert any(entry.get("message") == "request" for entry in lines)


def test_a_request_id_is_generated_when_absent_or_unsafe(start_proxy):
    proxy = start_proxy()
    plain = requests.get(f"{proxy.url}/healthz", timeout=5)
    unsafe = requests.get(
        f"{proxy.url}/healthz", timeout=5, headers={"X-Request-ID": "bad id\twith spaces"}
    )
    assert re.fullmatch(r"[0-9a-f]{32}", plain.headers["X-Request-ID"])
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["X-Request-ID"])


# -- temporary directories -------------------------------------------------------------------


def test_no_temporary_directory_outlives_the_server_even_after_a_reload(start_proxy, tmp_path):
    """gunicorn.conf.py makes the metrics and spool directories; a SIGHUP (reload) re-reads
    that file, and the server must still remove them when it stops."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proxy = start_proxy(TMPDIR=str(tmp))
    made = sorted(p.name for p in tmp.glob("dify-proxy-*"))
    assert [name.rsplit("-", 1)[0] for name in made] == [
        "dify-proxy-answers",
        "dify-proxy-metrics",
    ]
    old_workers = set(processes.children(proxy.process.pid))

    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while (workers := set(processes.children(proxy.process.pid))) & old_workers or not workers:
        assert time.monotonic() < deadline, "gunicorn did not reload its workers"
        time.sleep(0.1)
    assert requests.get(f"{proxy.url}/healthz", timeout=5).ok
    processes.stop(proxy.process)

    assert list(tmp.glob("dify-proxy-*")) == []
