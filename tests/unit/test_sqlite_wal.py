"""Workers that open the ledger's SQLite files at the same moment all start.

Switching a new SQLite file to WAL takes a lock SQLite does not wait for, so before the fix
about a third of the rounds below had one process fail with "database is locked": in gunicorn,
a worker that failed to boot, and the instance shut down.
"""

from __future__ import annotations

import multiprocessing

from sqlalchemy import text

from dify_proxy.ledger.outbox import Outbox
from dify_proxy.ledger.schema import make_engine

ROUNDS = 20
PROCESSES = 3


def _open_outbox(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        Outbox(path)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
        results.put(repr(exc))


def _open_ledger(path: str, barrier, results) -> None:
    engine = make_engine(None, path)
    barrier.wait()
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        results.put("ok")
    except Exception as exc:  # noqa: BLE001
        results.put(repr(exc))


def _all_at_once(target, tmp_path) -> list[str]:
    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(ROUNDS):
        path = str(tmp_path / f"round-{round_}.sqlite3")
        barrier, results = context.Barrier(PROCESSES), context.Queue()
        processes = [
            context.Process(target=target, args=(path, barrier, results)) for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=30) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        failures += [outcome for outcome in outcomes if outcome != "ok"]
    return failures


def test_workers_opening_a_new_outbox_at_once_all_start(tmp_path):
    assert _all_at_once(_open_outbox, tmp_path) == []


def test_workers_opening_a_new_sqlite_ledger_at_once_all_start(tmp_path):
    assert _all_at_once(_open_ledger, tmp_path) == []
