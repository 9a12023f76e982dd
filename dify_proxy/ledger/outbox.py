"""Rows that could not be written to the ledger yet, kept on local disk until they can.

A SQLite file (the standard library's), shared by every worker of the instance: a worker that
exits or dies leaves its rows for the others to send. Sending twice is harmless, since the
ledger ignores a row whose answer id it has; losing one is not, so a row leaves the outbox
only after the ledger has committed it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from .sqlitewal import BUSY_TIMEOUT_SECONDS, use_wal

_SCHEMA = (
    "create table if not exists rows (answer_id text primary key, row text not null)",
    "create table if not exists resumes (answer_id text not null, since real not null)",
)


class Outbox:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:  # outside a transaction, where SQLite allows it; every worker asks the same
            use_wal(db)
        finally:
            db.close()
        with self._connect() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            db.execute("begin immediate")
            yield db
            db.execute("commit")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("rollback")
            raise
        finally:
            db.close()

    def put(self, rows: list[dict[str, Any]], resumes: list[tuple[str, float]]) -> None:
        with self._connect() as db:
            db.executemany(
                "insert or ignore into rows values (?, ?)",
                [(row["answer_id"], json.dumps(row, default=_encode)) for row in rows],
            )
            db.executemany("insert into resumes values (?, ?)", resumes)

    def peek(self, limit: int = 500) -> tuple[list[dict[str, Any]], list[tuple[str, float]]]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            rows = [
                _decode(text) for (text,) in db.execute("select row from rows limit ?", (limit,))
            ]
            resumes = list(db.execute("select answer_id, since from resumes limit ?", (limit,)))
        finally:
            db.close()
        return rows, resumes

    def remove(self, answer_ids: list[str], resumes: list[tuple[str, float]]) -> None:
        with self._connect() as db:
            db.executemany("delete from rows where answer_id = ?", [(a,) for a in answer_ids])
            for answer_id, since in resumes:
                db.execute(
                    "delete from resumes where rowid in (select rowid from resumes"
                    " where answer_id = ? and since = ? limit 1)",
                    (answer_id, since),
                )

    def pending_count(self) -> int:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            return db.execute("select count(*) from rows").fetchone()[0]
        finally:
            db.close()


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$time": value.isoformat()}
    raise TypeError(type(value).__name__)


def _decode(text: str) -> dict[str, Any]:
    def hook(item: dict[str, Any]) -> Any:
        if "$decimal" in item:
            return Decimal(item["$decimal"])
        if "$time" in item:
            return datetime.fromisoformat(item["$time"])
        return item

    return json.loads(text, object_hook=hook)
