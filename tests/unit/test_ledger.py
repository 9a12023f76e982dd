"""The usage ledger in-process: what a row holds, that a row written twice is one row, that
rows wait in the outbox while the database is away, and the routes that use it."""

from __future__ import annotations

import dataclasses
import json
import time
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dify_proxy.ledger import Ledger, migrate, usage_fields
from dify_proxy.ledger.schema import engine_url, make_engine, usage
from dify_proxy.relay import StreamStats
from tests.conftest import DIFY_URL

CHAT = f"{DIFY_URL}/chat-messages"
USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 7,
    "total_tokens": 12,
    "total_price": "0.0000240",
    "currency": "USD",
}
STREAM = (
    b'data: {"event":"message","task_id":"t","conversation_id":"c","message_id":"m",'
    b'"answer":"Hi"}\n\n'
    b'data: {"event":"message_end","task_id":"t","conversation_id":"c","message_id":"m",'
    b'"metadata":{"usage":' + json.dumps(USAGE).encode() + b"}}\n\n"
)
EVENT_STREAM = {"Content-Type": "text/event-stream; charset=utf-8"}


def rows_of(engine) -> list[dict]:
    with engine.connect() as connection:
        return [r._asdict() for r in connection.execute(select(usage))]


def wait_for_rows(engine, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        try:
            rows = rows_of(engine)
        except OperationalError:  # the flusher has not made the SQLite file's table yet
            rows = []
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


@pytest.fixture
def ledger(tmp_path):
    engine = make_engine(None, str(tmp_path / "usage.sqlite3"))
    migrate(engine)
    ledger = Ledger(engine, str(tmp_path / "outbox.sqlite3"))
    yield ledger
    engine.dispose()


def stats(stream_id: bytes = b"s" * 22, usage=USAGE) -> StreamStats:
    return StreamStats(
        stream_id=stream_id,
        task_id="t",
        conversation_id="c",
        message_id="m",
        usage=usage,
        answer_end="completed",
    )


# --- what a row holds ---------------------------------------------------------------------------


def test_a_price_is_kept_exactly_as_dify_wrote_it():
    assert usage_fields(USAGE)["total_price"] == Decimal("0.0000240")
    assert str(usage_fields(USAGE)["total_price"]) == "0.0000240"


def test_a_price_sent_as_a_json_number_is_read_from_its_text_not_through_a_float():
    assert usage_fields(json.loads('{"total_price": 0.1}'))["total_price"] == Decimal("0.1")


def test_a_workflows_total_tokens_are_counted():
    fields = usage_fields({"total_tokens": 321, "elapsed_time": 1.2})
    assert (fields["total_tokens"], fields["total_price"], fields["currency"]) == (321, None, None)


def test_an_answer_without_a_usage_report_is_a_row_with_no_tokens():
    fields = usage_fields(None)
    assert (fields["prompt_tokens"], fields["total_tokens"], fields["total_price"]) == (0, 0, None)


def test_heroku_postgres_urls_use_psycopg_3():
    assert engine_url("postgres://u:p@h:5432/d", "") == "postgresql+psycopg://u:p@h:5432/d"
    assert engine_url("postgresql://u:p@h:6543/d", "") == "postgresql+psycopg://u:p@h:6543/d"


# --- writing ------------------------------------------------------------------------------------


def test_a_streamed_answer_is_written_by_the_flusher(ledger):
    ledger.open("user-a", "req-1").streamed(stats())

    (row,) = wait_for_rows(ledger.engine, 1)

    assert row["answer_id"] == "s" * 22
    assert (row["user_id"], row["request_id"], row["end_reason"]) == (
        "user-a",
        "req-1",
        "completed",
    )
    assert row["total_price"] == Decimal("0.0000240")


def test_a_row_sent_twice_is_written_once(ledger):
    entry = ledger.open("user-a", "req-1")
    entry.streamed(stats())
    ledger.flush()
    entry.streamed(stats())
    ledger.flush()

    assert len(rows_of(ledger.engine)) == 1


def test_rows_wait_in_the_outbox_while_the_database_is_away_and_go_once_it_is_back(tmp_path):
    away = make_engine("postgresql://nobody@127.0.0.1:1/none", "")
    ledger = Ledger(away, str(tmp_path / "outbox.sqlite3"))
    for n in range(3):
        ledger.open("user-a", None).streamed(stats(stream_id=b"%022d" % n))
    ledger.flush()
    assert ledger.outbox.pending_count() == 3

    back = make_engine(None, str(tmp_path / "usage.sqlite3"))
    migrate(back)
    ledger.engine = back  # the same database, reachable again
    ledger._retry_at = 0.0
    ledger.flush()

    assert sorted(r["answer_id"] for r in rows_of(back)) == [
        b"%022d".decode() % n for n in range(3)
    ]
    assert ledger.outbox.pending_count() == 0


def test_a_resume_that_comes_before_its_row_is_counted_once_the_row_is_there(ledger):
    ledger.resumed("s" * 22)
    ledger.flush()
    ledger.open("user-a", None).streamed(stats())
    ledger.flush()
    ledger._retry_at = 0.0
    ledger.flush()

    (row,) = rows_of(ledger.engine)
    assert row["resumes"] == 1


# --- the routes ---------------------------------------------------------------------------------


def test_a_streamed_answer_through_the_app_is_a_row(app, client, auth, requests_mock):
    requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    client.post("/api/chat", json={"message": "hi"}, headers=auth).get_data()

    (row,) = wait_for_rows(app.extensions["dify_proxy.ledger"].engine, 1)

    assert (row["message_id"], row["total_tokens"]) == ("m", 12)


def test_a_blocking_answer_through_the_app_is_a_row(app, client, auth, requests_mock):
    requests_mock.post(CHAT, json={"answer": "Hi", "message_id": "m", "metadata": {"usage": USAGE}})
    client.post("/api/chat", json={"message": "hi", "response_mode": "blocking"}, headers=auth)

    (row,) = wait_for_rows(app.extensions["dify_proxy.ledger"].engine, 1)

    assert (row["message_id"], row["total_price"]) == ("m", Decimal("0.0000240"))


def test_api_usage_needs_a_session(client):
    assert client.get("/api/usage").status_code == 401


def test_api_usage_with_no_answers_yet_is_all_zero(client, auth):
    body = client.get("/api/usage", headers=auth).json
    empty = {"answers": 0, "total_tokens": 0, "total_price": "0", "currency": None}
    assert body == {"today": empty, "month": empty, "recent": []}


@pytest.fixture
def budgeted(settings):
    return dataclasses.replace(settings, daily_cost_budget=Decimal("0.00001"))


def test_a_used_up_cost_budget_is_a_429_before_dify_is_called(budgeted, auth, requests_mock):
    from dify_proxy import create_app

    app = create_app(budgeted)
    client = app.test_client()
    requests_mock.post(CHAT, content=STREAM, headers=EVENT_STREAM)
    client.post("/api/chat", json={"message": "hi"}, headers=auth).get_data()
    wait_for_rows(app.extensions["dify_proxy.ledger"].engine, 1)

    refused = client.post("/api/chat", json={"message": "hi"}, headers=auth)

    assert refused.status_code == 429
    assert refused.json["code"] == "daily_cost_budget_exceeded"
    assert int(refused.headers["Retry-After"]) > 0
    assert requests_mock.call_count == 1


def test_rows_left_in_the_outbox_by_a_previous_run_are_sent_at_start(tmp_path):
    away = make_engine("postgresql://nobody@127.0.0.1:1/none", "")
    before = Ledger(away, str(tmp_path / "outbox.sqlite3"))
    before.open("user-a", None).streamed(stats())
    before.flush()
    assert before.outbox.pending_count() == 1

    back = make_engine(None, str(tmp_path / "usage.sqlite3"))
    Ledger(back, str(tmp_path / "outbox.sqlite3"))  # the next run, no answer asked yet

    assert [r["answer_id"] for r in wait_for_rows(back, 1)] == ["s" * 22]
