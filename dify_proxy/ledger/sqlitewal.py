"""Turning a SQLite file shared by several processes to WAL, which SQLite will not wait for.

Every worker of an instance opens the ledger's SQLite file and the outbox at start, often in
the same millisecond. Switching a new file to WAL needs a lock that SQLite does not wait on
(its busy timeout does not apply), so one of two workers starting together got "database is
locked", failed to boot, and gunicorn shut the whole instance down. Once the file is WAL, the
same pragma needs no such lock; until then, retrying is all there is.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

# Every connection to the ledger's SQLite files waits this long for another process's lock,
# and turning a file to WAL is retried as long.
BUSY_TIMEOUT_SECONDS = 10.0


def use_wal(connection: Any, wait: float = BUSY_TIMEOUT_SECONDS) -> None:
    """Put `connection`'s database (a DB-API connection of the sqlite3 module) in WAL mode,
    retrying while another process holds the lock it needs."""
    deadline = time.monotonic() + wait
    while True:
        cursor = connection.cursor()
        try:
            cursor.execute("pragma journal_mode=wal")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        finally:
            cursor.close()
        time.sleep(0.01)
