"""Workers that open the ledger's SQLite files at the same moment all start.

Switching a new SQLite file to WAL takes a lock SQLite does not wait for, so before the fix
about a third of the rounds below had one process fail with "database is locked": in gunicorn,
a worker that failed to boot, and the instance shut down.

The processes are spawned, not forked: a fork of the test process copies locks that its other
threads (earlier tests' ledger flushers) may hold, and a child can hang on one for good.
"""

from __future__ import annotations

import multiprocessing
import queue

from sqlalchemy import text

from dify_proxy.ledger.outbox import Outbox
from dify_proxy.ledger.schema import make_engine

ROUNDS = 20
PROCESSES = 3
WAIT_SECONDS = 60


def _open_outbox(path: str) -> None:
    Outbox(path)


def _open_ledger(path: str) -> None:
    with make_engine(None, path).connect() as connection:
        connection.execute(text("select 1"))


def _opener(opens, paths: list[str], barrier, results) -> None:
    """One worker: for each round, wait for the others, then open that round's new file."""
    for path in paths:
        barrier.wait(WAIT_SECONDS)
        try:
            opens(path)
            results.put("ok")
        except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
            results.put(repr(exc))


def _all_at_once(opens, tmp_path) -> list[str]:
    context = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / f"round-{n}.sqlite3") for n in range(ROUNDS)]
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [
        context.Process(target=_opener, args=(opens, paths, barrier, results), daemon=True)
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=WAIT_SECONDS) for _ in range(ROUNDS * PROCESSES)]
    except queue.Empty:
        outcomes = ["a process hung"]
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return [outcome for outcome in outcomes if outcome != "ok"]


def test_workers_opening_a_new_outbox_at_once_all_start(tmp_path):
    assert _all_at_once(_open_outbox, tmp_path) == []


def test_workers_opening_a_new_sqlite_ledger_at_once_all_start(tmp_path):
    assert _all_at_once(_open_ledger, tmp_path) == []
