"""Money budgets: refused before Dify is called when what the ledger recorded, plus a hold per
answer in flight (each as dear as the user's dearest answer this month), reaches a budget."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from dify_proxy.budgets import Budgets
from dify_proxy.errors import ApiError
from dify_proxy.ledger import Ledger, migrate
from dify_proxy.ledger.schema import make_engine, usage
from dify_proxy.quotas import Quotas

OUTBOX_DIR = Path(tempfile.mkdtemp(prefix="budgets-outbox-"))
NOW = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
USER = "user-a"


@pytest.fixture(autouse=True)
def request_context(app):
    """A 429 names the user's plan, which it reads from the request's session."""
    with app.test_request_context():
        yield


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(None, str(tmp_path / "usage.sqlite3"))
    migrate(engine)
    yield engine
    engine.dispose()


def add(engine, price: str, at: datetime = NOW, user: str = USER) -> None:
    with engine.begin() as connection:
        connection.execute(
            usage.insert().values(
                answer_id=f"a-{price}-{at.isoformat()}-{user}",
                user_id=user,
                started_at=at,
                ended_at=at,
                end_reason="completed",
                total_tokens=10,
                total_price=Decimal(price),
                currency="USD",
            )
        )


def budgets(engine, daily="0", monthly="0") -> Budgets:
    quotas = Quotas(None, max_streams=3, lease_seconds=60, daily_token_budget=0)
    ledger = Ledger(engine, str(OUTBOX_DIR / f"outbox-{id(engine)}.sqlite3")) if engine else None
    return Budgets(Decimal(daily), Decimal(monthly), quotas, ledger)


def test_with_both_budgets_off_no_hold_is_taken_and_the_ledger_is_not_read():
    assert budgets(engine=None).reserve(USER, NOW) is None


def test_a_used_up_daily_budget_is_a_429_that_says_so_and_when_it_renews(engine):
    add(engine, "0.60")
    add(engine, "0.40")

    with pytest.raises(ApiError) as refused:
        budgets(engine, daily="1.00").reserve(USER, NOW)

    assert refused.value.status == 429
    assert refused.value.code == "daily_cost_budget_exceeded"
    assert refused.value.message.startswith("Daily cost budget reached: 1.00 a day;")
    assert "00:00 UTC" in refused.value.message
    assert refused.value.headers["Retry-After"] == str(6 * 3600)


def test_a_used_up_monthly_budget_renews_on_the_first_of_next_month(engine):
    add(engine, "3", at=NOW - timedelta(days=5))

    with pytest.raises(ApiError) as refused:
        budgets(engine, monthly="3").reserve(USER, NOW)

    assert refused.value.code == "monthly_cost_budget_exceeded"
    assert "2027-01-01 00:00 UTC" in refused.value.message
    renews = datetime(2027, 1, 1, tzinfo=UTC)
    assert refused.value.headers["Retry-After"] == str(int((renews - NOW).total_seconds()))


def test_yesterdays_spending_does_not_count_against_today(engine):
    add(engine, "5", at=NOW - timedelta(days=1))

    assert budgets(engine, daily="1").reserve(USER, NOW) is not None


def test_another_users_spending_does_not_count(engine):
    add(engine, "5", user="user-b")

    assert budgets(engine, daily="1").reserve(USER, NOW) is not None


def test_each_answer_in_flight_holds_as_much_as_the_dearest_answer_this_month(engine):
    add(engine, "0.85")
    add(engine, "0.05")  # recorded 0.90, dearest 0.85
    add(engine, "0.01", at=NOW - timedelta(days=40))  # last month: not dearest this month
    limits = budgets(engine, daily="2.00")

    first = limits.reserve(USER, NOW)  # 0.90 + 0 held < 2.00
    second = limits.reserve(USER, NOW)  # 0.90 + 0.85 held < 2.00
    with pytest.raises(ApiError) as refused:  # 0.90 + 1.70 held >= 2.00
        limits.reserve(USER, NOW)

    assert first and second
    assert refused.value.code == "daily_cost_budget_exceeded"
    assert "the answers you have running would use up the rest" in refused.value.message
    assert refused.value.headers["Retry-After"] == "5"


def test_a_hold_is_given_back_once_the_answers_row_is_written(engine):
    add(engine, "0.50")
    limits = budgets(engine, daily="1.00")
    hold = limits.reserve(USER, NOW)  # 0.50 + 0 < 1; a second would make 0.50 + 0.50
    with pytest.raises(ApiError):
        limits.reserve(USER, NOW)

    limits.held(USER, hold)("answer-1")
    limits.written([{"answer_id": "answer-1"}])

    assert limits.reserve(USER, NOW) is not None


def test_a_hold_is_given_back_when_the_answer_never_started(engine):
    add(engine, "0.50")
    limits = budgets(engine, daily="1.00")
    hold = limits.reserve(USER, NOW)

    limits.cancel(USER, hold)

    assert limits.reserve(USER, NOW) is not None


def test_before_the_first_priced_answer_holds_cost_nothing(engine):
    limits = budgets(engine, daily="0.01")

    assert all(limits.reserve(USER, NOW) for _ in range(20))


def test_an_unreadable_ledger_does_not_refuse_questions(caplog):
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", "")

    assert budgets(engine, daily="1").reserve(USER, NOW) is None
    assert "cost budgets not enforced" in caplog.text
