"""Stream leases and token budgets without Redis, and when Redis cannot be reached."""

import logging
import socket
import time
from datetime import UTC, datetime

import pytest
import redis

from dify_proxy import quotas as quotas_module
from dify_proxy import redisconn
from dify_proxy.quotas import Quotas
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer


def local(max_streams=2, lease_seconds=60.0, budget=0) -> Quotas:
    return Quotas(
        None, max_streams=max_streams, lease_seconds=lease_seconds, daily_token_budget=budget
    )


def test_a_user_gets_at_most_max_streams_leases():
    quotas = local(max_streams=2)
    assert quotas.acquire_stream("u") and quotas.acquire_stream("u")
    assert quotas.acquire_stream("u") is None


def test_a_released_lease_frees_its_slot():
    quotas = local(max_streams=1)
    lease = quotas.acquire_stream("u")
    quotas.release_stream("u", lease)
    assert quotas.acquire_stream("u") is not None


def test_leases_are_per_user():
    quotas = local(max_streams=1)
    assert quotas.acquire_stream("a") and quotas.acquire_stream("b")


def test_an_expired_lease_frees_its_slot(monkeypatch):
    quotas = local(max_streams=1, lease_seconds=10)
    now = [1000.0]
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: now[0])
    quotas.acquire_stream("u")
    now[0] += 11
    assert quotas.acquire_stream("u") is not None


def test_a_renewed_lease_does_not_expire(monkeypatch):
    quotas = local(max_streams=1, lease_seconds=10)
    now = [1000.0]
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: now[0])
    lease = quotas.acquire_stream("u")
    now[0] += 8
    quotas.renew_stream("u", lease)
    now[0] += 8
    assert quotas.acquire_stream("u") is None


def test_zero_max_streams_means_unlimited():
    quotas = local(max_streams=0)
    assert all(quotas.acquire_stream("u") for _ in range(50))


def test_tokens_add_up_against_the_budget():
    quotas = local(budget=100)
    quotas.add_tokens("u", 60)
    assert not quotas.over_budget("u")
    quotas.add_tokens("u", 40)
    assert quotas.over_budget("u")
    assert not quotas.over_budget("someone-else")


def test_without_a_budget_nobody_is_over_it():
    quotas = local(budget=0)
    quotas.add_tokens("u", 10**9)
    assert not quotas.over_budget("u")


@pytest.fixture
def unreachable() -> Quotas:
    """Redis configured but nothing listening: a real refused connection."""
    return Quotas(
        f"redis://127.0.0.1:{free_port()}/0", max_streams=1, lease_seconds=60, daily_token_budget=10
    )


def test_when_redis_is_unreachable_leases_fall_back_to_the_process(unreachable):
    assert unreachable.acquire_stream("u") is not None
    assert unreachable.acquire_stream("u") is None


def test_when_redis_is_unreachable_budgets_fall_back_to_the_process(unreachable):
    unreachable.add_tokens("u", 10)
    assert unreachable.over_budget("u")


def test_an_unreachable_redis_is_logged_once_per_interval(unreachable, caplog, monkeypatch):
    monkeypatch.setattr(redisconn, "REDIS_RETRY_SECONDS", 0)  # try Redis every time
    with caplog.at_level(logging.ERROR, logger="dify_proxy.redisconn"):
        for _ in range(5):
            unreachable.acquire_stream("u")
            unreachable.conn.check()
    assert len([r for r in caplog.records if "redis unavailable" in r.getMessage()]) == 1


def test_without_redis_configured_redis_is_never_usable():
    assert local().conn.usable() is False


def test_a_configured_redis_is_usable_until_it_fails(unreachable):
    assert unreachable.conn.usable() is True


def test_a_failure_seen_by_another_user_of_redis_backs_the_limits_off_it_too(unreachable):
    """The answer records share this Redis: their failure puts leases and budgets on local
    counts at once, without each paying a timeout to find out."""
    unreachable.conn.failed(redis.ConnectionError("down"))
    assert unreachable.conn.usable() is False
    assert unreachable.conn.error == "ConnectionError"


def test_redis_is_tried_again_after_the_back_off(unreachable, monkeypatch):
    unreachable.conn.failed(redis.TimeoutError("slow"))
    later = time.monotonic() + redisconn.REDIS_RETRY_SECONDS + 1
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: later)
    assert unreachable.conn.usable() is True


def test_a_redis_check_reports_an_unreachable_redis(unreachable):
    assert unreachable.conn.check() is False


def test_uploads_have_their_own_cap_apart_from_streams():
    quotas = Quotas(None, max_streams=1, lease_seconds=60, daily_token_budget=0, max_uploads=2)
    assert quotas.acquire_stream("u")
    first, second = quotas.acquire_upload("u"), quotas.acquire_upload("u")
    assert first and second
    assert quotas.acquire_upload("u") is None
    quotas.release_upload("u", first)
    assert quotas.acquire_upload("u") is not None
    assert quotas.acquire_stream("u") is None


def test_rediss_skips_certificate_checks_unless_the_url_asks_for_them():
    plain = redisconn.redis_options("redis://h:6379/0")
    tls = redisconn.redis_options("rediss://h:6380/0")
    asked = redisconn.redis_options("rediss://h:6380/0?ssl_cert_reqs=required")
    assert "ssl_cert_reqs" not in plain
    assert tls["ssl_cert_reqs"] == "none" and tls["ssl_check_hostname"] is False
    assert "ssl_cert_reqs" not in asked


def test_releasing_one_local_lease_keeps_the_users_other_leases():
    quotas = local(max_streams=2)
    first = quotas.acquire_stream("u")
    assert quotas.acquire_stream("u")
    quotas.release_stream("u", first)
    assert quotas.acquire_stream("u") is not None
    assert quotas.acquire_stream("u") is None


def test_releasing_a_lease_twice_frees_only_one_slot():
    quotas = local(max_streams=2)
    first = quotas.acquire_stream("u")
    assert quotas.acquire_stream("u")
    quotas.release_stream("u", first)
    quotas.release_stream("u", first)
    assert quotas.acquire_stream("u") is not None
    assert quotas.acquire_stream("u") is None


def test_a_lease_expires_exactly_lease_seconds_after_it_was_taken(monkeypatch):
    quotas = local(max_streams=1, lease_seconds=10)
    now = [1000.0]
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: now[0])
    quotas.acquire_stream("u")
    now[0] += 9.9
    assert quotas.acquire_stream("u") is None
    now[0] += 0.1
    assert quotas.acquire_stream("u") is not None


def test_renewing_an_unknown_or_released_lease_takes_no_slot(monkeypatch):
    quotas = local(max_streams=1)
    lease = quotas.acquire_stream("u")
    quotas.release_stream("u", lease)
    quotas.renew_stream("u", lease)
    quotas.renew_stream("nobody", lease)
    assert quotas.acquire_stream("u") is not None


def test_yesterdays_tokens_do_not_count_today(monkeypatch):
    quotas = local(budget=100)
    monkeypatch.setattr(quotas_module, "_today", lambda: "20260101")
    quotas.add_tokens("u", 100)
    assert quotas.over_budget("u")
    monkeypatch.setattr(quotas_module, "_today", lambda: "20260102")
    assert not quotas.over_budget("u")
    assert quotas.tokens_used("u") == 0


def test_zero_or_negative_usage_adds_nothing():
    quotas = local(budget=10)
    quotas.add_tokens("u", 0)
    quotas.add_tokens("u", -5)
    assert quotas.tokens_used("u") == 0


def test_reaching_the_budget_exactly_is_over_it():
    quotas = local(budget=10)
    quotas.add_tokens("u", 9)
    assert not quotas.over_budget("u")
    quotas.add_tokens("u", 1)
    assert quotas.over_budget("u")


# --- shared through a real Redis -----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


def shared(redis_url, max_streams=2, lease_seconds=60.0, budget=0) -> Quotas:
    return Quotas(
        redis_url, max_streams=max_streams, lease_seconds=lease_seconds, daily_token_budget=budget
    )


def test_two_instances_share_a_users_stream_slots_through_redis(redis_url):
    a, b = shared(redis_url, max_streams=2), shared(redis_url, max_streams=2)
    assert a.acquire_stream("u") and b.acquire_stream("u")
    assert a.acquire_stream("u") is None
    assert b.acquire_stream("someone-else") is not None


def test_a_lease_released_on_one_instance_frees_the_slot_on_another(redis_url):
    a, b = shared(redis_url, max_streams=1), shared(redis_url, max_streams=1)
    lease = a.acquire_stream("u")
    assert b.acquire_stream("u") is None
    a.release_stream("u", lease)
    assert b.acquire_stream("u") is not None


def test_a_redis_lease_that_is_not_renewed_expires(redis_url):
    """A worker killed mid-stream never releases its lease; Redis's clock frees the slot."""
    quotas = shared(redis_url, max_streams=1, lease_seconds=0.2)
    quotas.acquire_stream("u")
    time.sleep(0.3)
    assert quotas.acquire_stream("u") is not None


def test_renewing_a_redis_lease_pushes_its_expiry_out(redis_url):
    quotas = shared(redis_url, max_streams=1, lease_seconds=60)
    lease = quotas.acquire_stream("u")
    client = redis.Redis.from_url(redis_url)
    (key,) = client.keys("*")
    before = client.zrange(key, 0, -1, withscores=True)[0][1]
    quotas.lease_seconds = 600
    quotas.renew_stream("u", lease)
    after = client.zrange(key, 0, -1, withscores=True)[0][1]
    assert after - before > 500
    assert client.ttl(key) > 500


def test_renewing_a_released_redis_lease_does_not_bring_it_back(redis_url):
    quotas = shared(redis_url, max_streams=1)
    lease = quotas.acquire_stream("u")
    quotas.release_stream("u", lease)
    quotas.renew_stream("u", lease)
    assert quotas.acquire_stream("u") is not None


def test_a_users_leases_key_expires_with_its_last_lease(redis_url):
    quotas = shared(redis_url, max_streams=1, lease_seconds=30)
    quotas.acquire_stream("u")
    client = redis.Redis.from_url(redis_url)
    (key,) = client.keys("*")
    assert 30 <= client.ttl(key) <= 31


def test_tokens_add_up_across_instances_through_redis(redis_url):
    a, b = shared(redis_url, budget=100), shared(redis_url, budget=100)
    a.add_tokens("u", 60)
    b.add_tokens("u", 39)
    assert a.tokens_used("u") == 99 and not b.over_budget("u")
    a.add_tokens("u", 1)
    assert b.over_budget("u")


def test_a_days_token_count_is_kept_two_days_then_forgotten(redis_url):
    quotas = shared(redis_url, budget=100)
    quotas.add_tokens("u", 5)
    client = redis.Redis.from_url(redis_url)
    (key,) = client.keys("*")
    assert 2 * 86400 - 5 <= client.ttl(key) <= 2 * 86400


def test_without_a_budget_nothing_is_written_to_redis(redis_url):
    quotas = shared(redis_url, budget=0)
    quotas.add_tokens("u", 5)
    assert redis.Redis.from_url(redis_url).keys("*") == []


def test_a_redis_check_reports_a_reachable_redis_and_clears_the_last_error(redis_url):
    quotas = shared(redis_url)
    quotas.conn.error = "ConnectionError"
    assert quotas.conn.check() is True
    assert quotas.conn.error is None


def test_after_a_redis_failure_counts_stay_local_until_the_retry_interval_passes(monkeypatch):
    server = RedisServer()  # not started yet: Redis is down
    quotas = shared(server.url, max_streams=5)
    now = [1000.0]
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: now[0])
    assert quotas.acquire_stream("u") is not None
    assert quotas.conn.error == "ConnectionError"
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        now[0] += redisconn.REDIS_RETRY_SECONDS - 0.1
        quotas.acquire_stream("u")
        assert client.keys("*") == []
        now[0] += 0.1
        quotas.acquire_stream("u")
        assert len(client.keys("*")) == 1
    finally:
        server.stop()


# --- what the last survivors of mutation testing showed --------------------------------------


def test_without_redis_the_redis_check_reports_ready():
    assert local().conn.check() is True


def test_releasing_a_lease_of_a_user_with_none_left_is_harmless():
    quotas = local(max_streams=1)
    lease = quotas.acquire_stream("u")
    quotas.release_stream("u", lease)
    quotas.release_stream("u", lease)
    quotas.release_stream("nobody", lease)
    assert quotas.acquire_stream("u") is not None


def test_a_user_whose_last_local_lease_is_released_is_forgotten():
    """One entry per user ever seen would grow without bound in a long-running worker."""
    quotas = local(max_streams=2)
    leases = [quotas.acquire_stream(f"user-{n}") for n in range(3)]
    for n, lease in enumerate(leases):
        quotas.release_stream(f"user-{n}", lease)
    assert quotas._local_leases == {}


def test_a_budget_of_one_token_is_enforced():
    quotas = local(budget=1)
    assert not quotas.over_budget("u")
    quotas.add_tokens("u", 1)
    assert quotas.over_budget("u")


class FakeDatetime:
    """`datetime.now(tz)` for the token day; only a UTC-aware call is expected."""

    now_utc = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)

    @classmethod
    def now(cls, tz=None):
        assert tz is UTC, "the token day is the UTC day"
        return cls.now_utc


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_token_budget_covers_one_utc_day_from_midnight_to_midnight(monkeypatch, store, request):
    monkeypatch.setattr(quotas_module, "datetime", FakeDatetime)
    quotas = (
        local(budget=10)
        if store == "local"
        else shared(request.getfixturevalue("redis_url"), budget=10)
    )
    FakeDatetime.now_utc = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    quotas.add_tokens("u", 6)
    FakeDatetime.now_utc = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
    quotas.add_tokens("u", 4)
    assert quotas.over_budget("u")
    FakeDatetime.now_utc = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
    assert quotas.tokens_used("u") == 0


def test_a_user_with_no_tokens_in_redis_has_used_none(redis_url):
    assert shared(redis_url, budget=10).tokens_used("new-user") == 0


def test_a_hanging_redis_costs_one_timeout_then_counts_go_local():
    """A Redis that accepts connections and never answers must not hold a chat request."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host, port = silent.getsockname()
        quotas = Quotas(
            f"redis://{host}:{port}/0", max_streams=1, lease_seconds=60, daily_token_budget=0
        )
        assert quotas.acquire_stream("u") is not None
        assert quotas.conn.error == "TimeoutError"


@pytest.mark.parametrize(
    "operation",
    [
        "check",
        "acquire_stream",
        "renew_stream",
        "release_stream",
        "tokens_used",
        "add_tokens",
    ],
)
def test_every_redis_operation_that_fails_records_why_for_readyz(monkeypatch, operation):
    monkeypatch.setattr(redisconn, "REDIS_RETRY_SECONDS", 0)
    server = RedisServer()
    server.start()
    quotas = shared(server.url, max_streams=2, budget=10)
    lease = quotas.acquire_stream("u")
    assert lease is not None and quotas.conn.error is None
    server.stop()
    calls = {
        "check": lambda: quotas.conn.check(),
        "acquire_stream": lambda: quotas.acquire_stream("u"),
        "renew_stream": lambda: quotas.renew_stream("u", lease),
        "release_stream": lambda: quotas.release_stream("u", lease),
        "tokens_used": lambda: quotas.tokens_used("u"),
        "add_tokens": lambda: quotas.add_tokens("u", 1),
    }
    calls[operation]()
    assert quotas.conn.error == "ConnectionError"


def test_the_redis_error_log_line_names_the_error(unreachable, caplog):
    with caplog.at_level(logging.ERROR, logger="dify_proxy.redisconn"):
        unreachable.acquire_stream("u")
    assert "(ConnectionError)" in caplog.records[0].getMessage()


def test_a_redis_that_stays_down_is_logged_again_after_each_interval(
    unreachable, caplog, monkeypatch
):
    monkeypatch.setattr(redisconn, "REDIS_RETRY_SECONDS", 0)
    now = [5000.0]
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="dify_proxy.redisconn"):
        unreachable.acquire_stream("u")
        now[0] += redisconn.ERROR_LOG_INTERVAL_SECONDS - 0.5
        unreachable.acquire_stream("u")
        now[0] += 0.5
        unreachable.acquire_stream("u")
    assert len(caplog.records) == 2


# -- per-call limits: a user's plan ---------------------------------------------------------


def test_a_per_call_maximum_replaces_the_instances():
    quotas = local(max_streams=1)
    assert quotas.acquire_stream("u", 2) and quotas.acquire_stream("u", 2)
    assert quotas.acquire_stream("u", 2) is None


def test_a_per_call_maximum_of_zero_is_no_limit():
    quotas = local(max_streams=1)
    assert all(quotas.acquire_stream("u", 0) for _ in range(5))


def test_a_per_call_budget_replaces_the_instances():
    quotas = local(budget=100)
    quotas.add_tokens("u", 10)
    assert quotas.over_budget("u", 10) and not quotas.over_budget("u", 11)
    assert not quotas.over_budget("u", 0)


def test_tokens_are_counted_for_plans_even_without_a_budget_of_the_instances_own():
    quotas = Quotas(None, max_streams=1, lease_seconds=60, daily_token_budget=0, count_tokens=True)
    quotas.add_tokens("u", 7)
    assert quotas.tokens_used("u") == 7


def test_without_any_budget_tokens_are_not_counted():
    quotas = local(budget=0)
    quotas.add_tokens("u", 7)
    assert quotas.tokens_used("u") == 0


def test_a_per_call_maximum_holds_across_instances_through_redis(redis_url):
    a, b = shared(redis_url, max_streams=1), shared(redis_url, max_streams=1)
    assert a.acquire_stream("u", 2) and b.acquire_stream("u", 2)
    assert a.acquire_stream("u", 2) is None and b.acquire_stream("u", 3) is not None
