"""The usage ledger for real: gunicorn against the stand-in, the rows in a real PostgreSQL
server (Debian's package, started by the tests) or in the local SQLite file, each test on both
but the ones about PostgreSQL itself. The schema is made by the documented command."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import uuid
from decimal import Decimal

import pytest
import requests
from sqlalchemy import select, text

from dify_proxy.ledger.schema import make_engine, usage
from tests.integration.conftest import DIFY_KEY, scenario
from tests.support import tokens
from tests.support.postgres_server import PostgresServer
from tests.support.processes import ROOT
from tests.support.sse_client import read_stream

SSE = {"Accept": "text/event-stream"}
ALICE = "5b1f0c2e-1111-4a6f-9d3e-0a1b2c3d4e5f"
BOB = "6c2e1d3f-2222-4b7a-8e4f-1b2c3d4e5f60"
SUPABASE_MIGRATION = next((ROOT / "supabase" / "migrations").glob("*_dify_usage.sql"))


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


class Ledger:
    """Where one test's rows go: the environment for the proxy and the commands, and a look
    at the rows."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.engine = make_engine(env.get("DATABASE_URL"), env.get("USAGE_SQLITE_PATH", ""))

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dify_proxy.ledger", *args],
            cwd=ROOT,
            env={"PATH": os.environ["PATH"], **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    def rows(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [r._asdict() for r in connection.execute(select(usage))]

    def wait_for_rows(self, count: int, seconds: float = 20) -> list[dict]:
        deadline = time.monotonic() + seconds
        while True:
            try:
                rows = self.rows()
            except Exception:  # noqa: BLE001 -- the database is still coming back
                rows = []
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger(request, tmp_path) -> Ledger:
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        name = f"t_{uuid.uuid4().hex[:12]}"
        with server.connect() as connection:
            connection.execute(f"create database {name}")
        env = {"DATABASE_URL": f"postgres://postgres@127.0.0.1:{server.port}/{name}"}
    else:
        env = {"USAGE_SQLITE_PATH": str(tmp_path / "usage.sqlite3")}
    env["USAGE_OUTBOX_PATH"] = str(tmp_path / "outbox.sqlite3")
    found = Ledger(env)
    found.command("migrate")
    yield found
    found.engine.dispose()


def ask(proxy, knobs=None, sub=ALICE, **extra):
    body = {**scenario(**(knobs or {"events": 3})), **extra}
    return proxy.chat(body, token=tokens.hs256(sub=sub), headers=SSE)


def stream_id(received) -> str:
    return received.ids()[0].rsplit("-", 1)[0]


def usage_of(received) -> dict:
    return received.last("message_end")["metadata"]["usage"]


# --- one row per answer -------------------------------------------------------------------------


def test_a_workflow_run_is_one_row_with_its_run_id_and_total_tokens(start_proxy, ledger):
    proxy = start_proxy(DIFY_API_KEY=f"{DIFY_KEY}-workflow", **ledger.env)
    received = read_stream(
        requests.post(
            f"{proxy.url}/api/workflows/run",
            json={"inputs": {"text": "hello workflow"}},
            headers={"Authorization": f"Bearer {tokens.hs256(sub=ALICE)}"},
            stream=True,
            timeout=30,
        )
    )
    end = received.data()[-1]
    assert end["event"] == "workflow_finished"

    (row,) = ledger.wait_for_rows(1)

    assert (row["app_mode"], row["end_reason"], row["user_id"]) == ("workflow", "completed", ALICE)
    assert (row["workflow_run_id"], row["task_id"]) == (end["workflow_run_id"], end["task_id"])
    assert row["total_tokens"] == end["data"]["total_tokens"]


def test_a_streamed_answer_is_one_row_with_the_usage_dify_reported(start_proxy, ledger):
    proxy = start_proxy(**ledger.env)
    received = read_stream(ask(proxy))
    end = received.last("message_end")

    (row,) = ledger.wait_for_rows(1)

    reported = end["metadata"]["usage"]
    assert row["answer_id"] == stream_id(received)
    assert row["user_id"] == ALICE
    assert (row["app_mode"], row["end_reason"]) == ("chat", "completed")
    assert (row["conversation_id"], row["message_id"], row["task_id"]) == (
        end["conversation_id"],
        end["message_id"],
        end["task_id"],
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        reported["prompt_tokens"],
        reported["completion_tokens"],
        reported["total_tokens"],
    )
    assert row["total_price"] == Decimal(reported["total_price"])
    assert format(row["total_price"], "f") == reported["total_price"]  # not one digit lost
    assert row["currency"] == "USD"
    assert row["started_at"] <= row["ended_at"]
    assert row["first_event_ms"] is not None and row["resumes"] == 0


def test_a_blocking_answer_is_one_row(start_proxy, ledger):
    proxy = start_proxy(**ledger.env)
    response = proxy.chat(
        {**scenario(events=2), "response_mode": "blocking"}, token=tokens.hs256(sub=ALICE)
    )
    body = response.json()

    (row,) = ledger.wait_for_rows(1)

    assert row["message_id"] == body["message_id"]
    assert row["end_reason"] == "completed"
    assert row["total_tokens"] == body["metadata"]["usage"]["total_tokens"]
    assert row["total_price"] == Decimal(body["metadata"]["usage"]["total_price"])


def test_a_stopped_answer_is_a_row_with_what_dify_reported_at_the_stop(start_proxy, ledger):
    proxy = start_proxy(**ledger.env)
    response = ask(proxy, {"events": 1, "end": "hang"})
    first = read_stream(response, until=lambda r: bool(r.data()), seconds=10)
    task_id = first.data()[0]["task_id"]
    stop = requests.post(
        f"{proxy.url}/api/chat/{task_id}/stop",
        headers={"Authorization": f"Bearer {tokens.hs256(sub=ALICE)}"},
        timeout=10,
    )
    rest = read_stream(response)

    (row,) = ledger.wait_for_rows(1)

    assert stop.status_code == 200
    assert row["task_id"] == task_id
    assert row["total_tokens"] == usage_of(rest)["total_tokens"] > 0


def test_an_abandoned_answer_is_a_row(start_proxy, standin, ledger):
    proxy = start_proxy(RESUME_GRACE="1", **ledger.env)
    response = ask(proxy, {"events": 1, "end": "hang"})
    first = read_stream(response, until=lambda r: bool(r.data()), seconds=10)
    response.close()

    (row,) = ledger.wait_for_rows(1)

    assert row["answer_id"] == stream_id(first)
    assert row["end_reason"] == "abandoned"
    assert standin.stops()


def test_a_resumed_answer_counts_its_resume_in_its_row(start_proxy, ledger):
    proxy = start_proxy(RESUME_GRACE="10", **ledger.env)
    response = ask(proxy, {"events": 12, "interval": 0.15, "text": "word "})
    first = read_stream(response, until=lambda r: len(r.data()) >= 2)
    response.close()
    headers = {
        "Authorization": f"Bearer {tokens.hs256(sub=ALICE)}",
        "Last-Event-ID": first.ids()[-1],
        **SSE,
    }
    rest = read_stream(
        requests.post(f"{proxy.url}/api/chat", json={}, headers=headers, stream=True, timeout=30)
    )
    assert rest.kinds()[-2:] == ["message_end", "workflow_finished"]

    deadline = time.monotonic() + 20
    while (rows := ledger.rows()) == [] or rows[0]["resumes"] == 0:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)

    assert len(rows) == 1 and rows[0]["resumes"] == 1


# --- reading it back ----------------------------------------------------------------------------


def test_api_usage_and_the_csv_report_agree_with_the_rows(start_proxy, ledger):
    proxy = start_proxy(**ledger.env)
    for sub, events in ((ALICE, 3), (ALICE, 5), (BOB, 2)):
        read_stream(ask(proxy, {"events": events}, sub=sub))
    rows = ledger.wait_for_rows(3)
    alices = [r for r in rows if r["user_id"] == ALICE]

    mine = requests.get(
        f"{proxy.url}/api/usage",
        headers={"Authorization": f"Bearer {tokens.hs256(sub=ALICE)}"},
        timeout=10,
    ).json()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    report = ledger.command("report", "--from", today, "--to", today).stdout

    alice_price = sum((r["total_price"] for r in alices), Decimal(0))
    alice_tokens = sum(r["total_tokens"] for r in alices)
    for period in (mine["today"], mine["month"]):
        assert period == {
            "answers": 2,
            "total_tokens": alice_tokens,
            "total_price": format(alice_price, "f"),
            "currency": "USD",
        }
    assert {a["answer_id"] for a in mine["recent"]} == {r["answer_id"] for r in alices}
    assert all(a["total_price"] is not None for a in mine["recent"])
    lines = list(csv.DictReader(io.StringIO(report)))
    by_user = {line["user"]: line for line in lines}
    assert set(by_user) == {ALICE, BOB}
    for user in (ALICE, BOB):
        own = [r for r in rows if r["user_id"] == user]
        assert by_user[user] == {
            "user": user,
            "answers": str(len(own)),
            "tokens": str(sum(r["total_tokens"] for r in own)),
            "price": format(sum((r["total_price"] for r in own), Decimal(0)), "f"),
            "currency": "USD",
        }


# --- PostgreSQL: away and back, and Supabase's row-level security -------------------------------


def test_while_postgres_is_down_every_answer_streams_and_every_row_arrives_once(
    start_proxy, postgres, tmp_path
):
    name = f"t_{uuid.uuid4().hex[:12]}"
    with postgres.connect() as connection:
        connection.execute(f"create database {name}")
    ledger = Ledger(
        {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{postgres.port}/{name}",
            "USAGE_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
        }
    )
    ledger.command("migrate")
    proxy = start_proxy(**ledger.env)
    before = [read_stream(ask(proxy)) for _ in range(3)]
    assert len(ledger.wait_for_rows(3)) == 3

    postgres.stop()
    try:
        meanwhile = [read_stream(ask(proxy)) for _ in range(10)]
    finally:
        postgres.start()
    rows = ledger.wait_for_rows(13)
    time.sleep(1.5)  # a resend from the outbox, if any were to come, would land by now
    rows = ledger.rows()

    assert [r.data()[-1]["event"] if r.data() else r.body for r in meanwhile] == [
        "workflow_finished"
    ] * 10, proxy.log()[-3000:]
    streamed = sorted(stream_id(r) for r in before + meanwhile)
    assert sorted(row["answer_id"] for row in rows) == streamed
    assert '"usage ledger unavailable' in proxy.log()
    ledger.engine.dispose()


# Supabase's `authenticated` role (roles belong to the whole server: made once) and its
# `auth.uid()`, which reads the `sub` of the claims PostgREST sets for each request.
STAND_IN_AUTH = """
do $$ begin
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin;
  end if;
end $$;
create schema auth;
create function auth.uid() returns uuid language sql stable as $$
  select nullif(
    nullif(current_setting('request.jwt.claims', true), '')::json->>'sub', ''
  )::uuid
$$;
grant usage on schema auth to authenticated;
grant usage on schema public to authenticated;
"""


def test_the_supabase_migration_lets_a_signed_in_user_read_only_their_own_rows(postgres):
    name = f"t_{uuid.uuid4().hex[:12]}"
    with postgres.connect() as connection:
        connection.execute(f"create database {name}")
    url = f"postgresql://postgres@127.0.0.1:{postgres.port}/{name}"
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(STAND_IN_AUTH)
        db.execute(SUPABASE_MIGRATION.read_text())
        for n, user in enumerate((ALICE, ALICE, BOB)):
            db.execute(
                "insert into public.dify_usage (answer_id, user_id, started_at, ended_at,"
                " end_reason, total_tokens, total_price, currency)"
                " values (%s, %s, now(), now(), 'completed', 10, 0.0000200, 'USD')",
                (f"answer-{n}", user),
            )
        with db.transaction():
            db.execute("set local role authenticated")
            db.execute(
                "select set_config('request.jwt.claims', %s, true)",
                (f'{{"sub": "{ALICE}", "role": "authenticated"}}',),
            )
            seen = db.execute("select user_id, total_price from public.dify_usage").fetchall()
        with db.transaction():
            db.execute("set local role authenticated")
            nobody = db.execute("select count(*) from public.dify_usage").fetchone()

    assert seen == [(ALICE, Decimal("0.0000200"))] * 2
    assert nobody == (0,)


def test_the_supabase_migration_and_the_migrate_command_make_the_same_table(postgres, tmp_path):
    import psycopg

    columns = {}
    for way in ("supabase", "command", "both"):
        name = f"t_{uuid.uuid4().hex[:12]}"
        with postgres.connect() as connection:
            connection.execute(f"create database {name}")
        url = f"postgresql://postgres@127.0.0.1:{postgres.port}/{name}"
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(STAND_IN_AUTH)
            if way in ("supabase", "both"):
                db.execute(SUPABASE_MIGRATION.read_text())
        if way in ("command", "both"):
            Ledger({"DATABASE_URL": url}).command("migrate")
        with psycopg.connect(url, autocommit=True) as db:
            columns[way] = (
                db.execute(
                    "select column_name, data_type, is_nullable, column_default"
                    " from information_schema.columns where table_name = 'dify_usage'"
                    " order by column_name"
                ).fetchall()
                + db.execute(
                    "select policyname, cmd, roles::text, qual from pg_policies"
                    " where tablename = 'dify_usage'"
                ).fetchall()
                + db.execute(
                    "select relrowsecurity from pg_class where relname = 'dify_usage'"
                ).fetchall()
            )

    assert columns["supabase"] == columns["command"] == columns["both"]


def test_no_statement_is_prepared_so_supabases_transaction_pooler_works(postgres):
    engine = make_engine(postgres.url, "")
    with engine.connect() as connection:
        for _ in range(10):  # psycopg prepares a statement from its 5th run, unless told not to
            connection.execute(text("select relname from pg_class where relname = :n"), {"n": "x"})
        prepared = connection.exec_driver_sql("select count(*) from pg_prepared_statements")
        assert prepared.scalar() == 0
    engine.dispose()


GEVENT_CHECK = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from sqlalchemy import text
from dify_proxy.ledger.schema import make_engine
engine = make_engine(sys.argv[1], "")
ticks, spans = [], []
def ticker():
    while not spans or len(spans) < 2:
        ticks.append(time.monotonic()); gevent.sleep(0.01)
def query():
    with engine.connect() as connection:
        spans.append(time.monotonic())
        connection.execute(text("select pg_sleep(0.5)"))
        spans.append(time.monotonic())
gevent.joinall([gevent.spawn(ticker), gevent.spawn(query)])
print(sum(1 for t in ticks if spans[0] < t < spans[1]))
"""


def test_a_query_under_gevent_lets_the_workers_other_greenlets_run(postgres):
    ran = subprocess.run(
        [sys.executable, "-c", GEVENT_CHECK, postgres.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(ran.stdout) > 1  # a blocking driver would let nothing run until it returned


# --- money budgets ------------------------------------------------------------------------------


def test_answers_opened_at_once_on_two_instances_cannot_slip_past_a_cost_budget(
    start_proxy, postgres, redis_server, tmp_path
):
    name = f"t_{uuid.uuid4().hex[:12]}"
    with postgres.connect() as connection:
        connection.execute(f"create database {name}")
    ledger = Ledger(
        {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{postgres.port}/{name}",
            "USAGE_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
        }
    )
    ledger.command("migrate")
    shared = {
        **ledger.env,
        "REDIS_URL": redis_server.url,
        "DAILY_COST_BUDGET": "0.000022",
        "MAX_STREAMS_PER_USER": "10",
    }
    one = start_proxy(**shared)
    two = start_proxy(**{**shared, "USAGE_OUTBOX_PATH": str(tmp_path / "outbox-2.sqlite3")})
    first = read_stream(ask(one, {"events": 3}))  # 4 tokens: 0.0000080 recorded
    assert usage_of(first)["total_price"] == "0.0000080"
    ledger.wait_for_rows(1)

    # Recorded 0.0000080, and each answer in flight holds 0.0000080 (the dearest so far): two
    # may run at once (0.0000080 + 2 x 0.0000080 is within 0.000022; a third is not).
    running = [ask(one, {"events": 1, "end": "hang"}), ask(two, {"events": 1, "end": "hang"})]
    for response in running:
        read_stream(response, until=lambda r: bool(r.data()), seconds=10)
    refused = ask(two, {"events": 1})
    body = refused.json()

    assert refused.status_code == 429
    assert body["code"] == "daily_cost_budget_exceeded"
    assert "answers you have running" in body["message"]
    assert refused.headers["Retry-After"] == "5"

    # The answer ends; once its row is written (with the usage Dify reported for the stopped
    # answer: 2 tokens, 0.0000040), its hold is given back: 0.0000120 + 1 hold x 0.0000080
    # leaves room for one more.
    running[0].close()
    ledger.wait_for_rows(2)
    deadline = time.monotonic() + 10
    while (again := ask(two, {"events": 1})).status_code == 429:
        assert time.monotonic() < deadline, again.json()
        time.sleep(0.2)
    assert read_stream(again).kinds()[-2:] == ["message_end", "workflow_finished"]
    running[1].close()
    ledger.engine.dispose()
