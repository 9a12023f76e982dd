"""Plans under real gunicorn, two instances sharing a real Redis: a `free` and a `pro` token
get their own rate, stream limit and token budget, and a token without the claim gets the
variables' own values."""

from __future__ import annotations

import json

import requests

from tests.integration.conftest import Proxy, scenario
from tests.support import tokens
from tests.support.sse_client import read_stream

# Each test's plans set only the limit it is about (with "Pro" to show names ignore case).
FREE = {"rate_limit": "1/minute", "max_streams_per_user": 1, "daily_token_budget": 10}
PRO = {"rate_limit": "3/minute", "max_streams_per_user": 3, "daily_token_budget": 30}


def user(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def token(plan: str | None, n: int) -> str:
    if plan is None:
        return tokens.hs256(sub=user(n))
    return tokens.on_plan(plan, sub=user(n))


def ask(proxy: Proxy, plan: str | None, n: int, events: int = 1) -> requests.Response:
    body = {**scenario(events=events, interval=0), "response_mode": "blocking"}
    return proxy.chat(body, token=token(plan, n))


def open_stream(proxy: Proxy, plan: str | None, n: int) -> requests.Response:
    """A stream Dify keeps open until the client closes it."""
    response = proxy.chat(scenario(events=1, end="hang"), token=token(plan, n))
    if response.status_code == 200:
        read_stream(response, until=lambda r: bool(r.data_events()), seconds=10)
    return response


def two_instances(start_proxy, redis_server, key: str, **variables: str) -> tuple[Proxy, Proxy]:
    """Two instances sharing Redis, with plans that set `key` and nothing else."""
    plans = json.dumps({"free": {key: FREE[key]}, "Pro": {key: PRO[key]}})
    env = {"REDIS_URL": redis_server.url, "PLANS": plans, **variables}
    return start_proxy(**env), start_proxy(**env)


def test_each_plan_gets_its_own_rate_across_instances(start_proxy, redis_server, standin):
    a, b = two_instances(start_proxy, redis_server, "rate_limit", RATE_LIMIT="2/minute")
    seen = {
        plan: [ask(proxy, plan, n).status_code for proxy in (a, b, a, b)]
        for plan, n in (("free", 1), ("PRO", 2), (None, 3), ("gold", 4))
    }
    assert seen == {
        "free": [200, 429, 429, 429],
        "PRO": [200, 200, 200, 429],
        None: [200, 200, 429, 429],
        "gold": [200, 200, 429, 429],  # a plan PLANS does not name: the variables' values
    }
    refused = ask(b, "free", 1)
    retry_after = int(refused.headers["Retry-After"])
    assert 0 < retry_after <= 60
    assert refused.json()["message"].startswith(
        "Request rate limit reached: 1 per minute on the free plan; it renews in "
    )


def test_each_plan_gets_its_own_stream_limit_across_instances(start_proxy, redis_server):
    a, b = two_instances(
        start_proxy, redis_server, "max_streams_per_user", MAX_STREAMS_PER_USER="2"
    )
    held = []
    try:
        for plan, n, slots in (("free", 5, 1), ("pro", 6, 3), (None, 7, 2)):
            for i in range(slots):
                stream = open_stream((a, b)[i % 2], plan, n)
                held.append(stream)
                assert stream.status_code == 200, (plan, i)
            refused = open_stream(b, plan, n)
            assert refused.status_code == 429, plan
            assert refused.json()["code"] == "too_many_streams"
            assert refused.headers["Retry-After"] == "5"
            on_plan = f" on the {plan} plan" if plan else ""
            assert refused.json()["message"] == (
                f"Answer limit reached: {slots} at a time{on_plan}; a slot frees when one of"
                " your answers ends (or you stop one)."
            )
    finally:
        for stream in held:
            stream.close()


def test_each_plan_gets_its_own_daily_token_budget_across_instances(
    start_proxy, redis_server, standin
):
    a, b = two_instances(start_proxy, redis_server, "daily_token_budget", DAILY_TOKEN_BUDGET="20")
    seen = {}
    for plan, n in (("free", 8), ("pro", 9), (None, 10)):
        # 12 tokens an answer (ten events); the budget is checked before each question
        seen[plan] = [ask(proxy, plan, n, events=10).status_code for proxy in (a, b, a, b)]
    assert seen == {
        "free": [200, 429, 429, 429],
        "pro": [200, 200, 200, 429],
        None: [200, 200, 429, 429],
    }
    calls = len(standin.chats())
    refused = ask(a, "pro", 9)
    assert len(standin.chats()) == calls  # Dify is not called
    assert refused.json()["code"] == "token_budget_exceeded"
    assert refused.json()["message"].startswith(
        "Daily token budget reached: 30 tokens a day on the pro plan; it renews at 00:00 UTC, in "
    )
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
