"""Stream leases and token budgets without Redis, and when Redis cannot be reached."""

import logging

import pytest

from dify_proxy import quotas as quotas_module
from dify_proxy.quotas import Quotas
from tests.support.processes import free_port


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
    monkeypatch.setattr(quotas_module, "REDIS_RETRY_SECONDS", 0)  # try Redis every time
    with caplog.at_level(logging.ERROR, logger="dify_proxy.quotas"):
        for _ in range(5):
            unreachable.acquire_stream("u")
            unreachable.check_redis()
    assert len([r for r in caplog.records if "redis unavailable" in r.getMessage()]) == 1


def test_check_redis_reports_an_unreachable_redis(unreachable):
    assert unreachable.check_redis() is False


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
    plain = quotas_module.redis_options("redis://h:6379/0")
    tls = quotas_module.redis_options("rediss://h:6380/0")
    asked = quotas_module.redis_options("rediss://h:6380/0?ssl_cert_reqs=required")
    assert "ssl_cert_reqs" not in plain
    assert tls["ssl_cert_reqs"] == "none" and tls["ssl_check_hostname"] is False
    assert "ssl_cert_reqs" not in asked
