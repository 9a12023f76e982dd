"""The usage ledger: one row per answer, in the team's PostgreSQL (DATABASE_URL) or a local
SQLite file, so that what each user asked for and what it cost is on the books.

Recording never touches the database on the request's path: `record` appends to memory, and a
background flusher (one per process, like the answer records') writes what has gathered in one
statement every FLUSH_SECONDS. When the database is away, rows go to an outbox on local disk
and are sent when it is back; the table's key (the answer id) makes a row sent twice a row
written once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .outbox import Outbox
from .schema import has_table, make_engine, shown, usage

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.05  # how long rows wait in memory, gathering into one insert
RETRY_SECONDS = 1.0  # after a failed write, how long the database is left alone
ERROR_LOG_INTERVAL_SECONDS = 60.0
RESUME_KEEP_SECONDS = 3600.0  # a resume whose answer has no row yet is kept this long
RECENT = 20  # answers listed in /api/usage's `recent`
OUTBOX_BATCH = 500

Row = dict[str, Any]
_instances: list[Ledger] = []


def flush_all(timeout: float = 2.0) -> None:
    """Write what every ledger of this process holds (a worker about to exit)."""
    for ledger in _instances:
        ledger.flush(timeout)


def migrate(engine: Engine) -> None:
    """Create or upgrade the ledger's table to the newest revision (Alembic)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def price(value: Any) -> Decimal | None:
    """Dify's `total_price` exactly as reported (a decimal string; a JSON number is read from
    its text, never through a float's rounding)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        return None
    return result if result.is_finite() else None


def _tokens(usage_report: Mapping[str, Any], name: str) -> int:
    value = usage_report.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_fields(report: Any) -> Row:
    """The row's usage columns from Dify's `message_end.metadata.usage`, or from a workflow's
    `workflow_finished.data` (which carries `total_tokens` only)."""
    report = report if isinstance(report, Mapping) else {}
    currency = report.get("currency")
    return {
        "prompt_tokens": _tokens(report, "prompt_tokens"),
        "completion_tokens": _tokens(report, "completion_tokens"),
        "total_tokens": _tokens(report, "total_tokens"),
        "total_price": price(report.get("total_price")),
        "currency": currency if isinstance(currency, str) and currency else None,
    }


@dataclass
class Entry:
    """One answer being booked: opened before Dify is called, closed once when it ends."""

    ledger: Ledger
    user: str
    request_id: str | None
    app_mode: str = "chat"
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # A budget's hold on this answer: told the answer id once the row is recorded, or let go
    # when the answer never started.
    on_recorded: Callable[[str], None] = lambda answer_id: None
    on_cancel: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        """Dify was never asked, or refused before answering: no row, and the hold goes."""
        self.on_cancel()

    def streamed(
        self,
        stats: Any,
        *,
        usage_report: Any = None,
        workflow_run_id: str | None = None,
    ) -> None:
        """A streaming answer ended (StreamStats): however it ended, with the usage Dify
        reported, if any (`usage_report` overrides `stats.usage`: a workflow's totals)."""
        first = stats.first_event
        self.ledger.record(
            {
                "answer_id": stats.stream_id.decode(),
                "conversation_id": stats.conversation_id,
                "message_id": stats.message_id,
                "task_id": stats.task_id,
                "workflow_run_id": workflow_run_id or getattr(stats, "workflow_run_id", None),
                "end_reason": stats.answer_end,
                "first_event_ms": None if first is None else round((first - stats.started) * 1000),
                **usage_fields(usage_report if usage_report is not None else stats.usage),
            },
            self,
        )

    def answered(self, answer_id: str, body: Any, end_reason: str = "completed") -> None:
        """A blocking answer ended: Dify's JSON body (or None when it was unreadable)."""
        body = body if isinstance(body, Mapping) else {}
        data = body.get("data") if isinstance(body.get("data"), Mapping) else {}
        report = (body.get("metadata") or {}).get("usage") if "metadata" in body else data
        self.ledger.record(
            {
                "answer_id": answer_id,
                "conversation_id": _text(body.get("conversation_id")),
                "message_id": _text(body.get("message_id") or body.get("id")),
                "task_id": _text(body.get("task_id")),
                "workflow_run_id": _text(body.get("workflow_run_id")),
                "end_reason": end_reason,
                "first_event_ms": None,
                **usage_fields(report),
            },
            self,
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class Ledger:
    def __init__(
        self,
        engine: Engine,
        outbox_path: str,
        where: str = "",
        on_written: Callable[[list[Row]], None] = lambda rows: None,
    ) -> None:
        self.engine = engine
        self.where = where
        self.outbox = Outbox(outbox_path)
        self.on_written = on_written
        self._rows: collections.deque[Row] = collections.deque()
        self._resumes: collections.deque[tuple[str, float]] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # the flusher's writes and a worker's last flush
        self._start_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._backlog = True  # the outbox may hold rows (another worker's, a previous run's)
        self._retry_at = 0.0
        self._logged_at = -ERROR_LOG_INTERVAL_SECONDS
        self.error: str | None = None
        self._ready = False
        _instances.append(self)
        if self.outbox.pending_count():  # left by a previous run: send them without waiting
            self._wake_flusher()

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> Ledger:
        engine = make_engine(settings.database_url, settings.usage_sqlite_path)
        where = shown(settings.database_url, settings.usage_sqlite_path)
        return cls(engine, settings.usage_outbox_path, where=where, **kwargs)

    # -- recording (the request's side: memory only) -------------------------------------------

    def open(
        self, user: str, request_id: str | None, app_mode: str = "chat", **hooks: Any
    ) -> Entry:
        return Entry(self, user, request_id, app_mode, **hooks)

    def record(self, row: Row, entry: Entry) -> None:
        row = {
            **row,
            "request_id": entry.request_id,
            "user_id": entry.user,
            "app_mode": entry.app_mode,
            "started_at": entry.started_at,
            "ended_at": datetime.now(UTC),
            "resumes": 0,
        }
        entry.on_recorded(row["answer_id"])
        self._rows.append(row)
        self._wake_flusher()

    def resumed(self, answer_id: str) -> None:
        """A client resumed this answer: its row's `resumes` goes up by one, whenever the row
        is written (a resume usually comes while the answer is still running)."""
        self._resumes.append((answer_id, time.time()))
        self._wake_flusher()

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            with self._start_lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_forever, name="ledger", daemon=True
                    )
                    self._flusher.start()
        if not self._wake.is_set():
            self._wake.set()

    # -- writing (the flusher's side) ----------------------------------------------------------

    def _flush_forever(self) -> None:
        while True:
            self._wake.wait(RETRY_SECONDS if self._backlog else None)
            self._wake.clear()
            time.sleep(FLUSH_SECONDS)  # what comes meanwhile goes in the same insert
            try:
                self._flush_once()
            except Exception:  # noqa: BLE001 -- the flusher must outlive anything
                log.exception("usage ledger flush failed")

    def flush(self, timeout: float = 2.0) -> None:
        """Write (or keep on disk) what is held now; wait at most `timeout` for the flusher."""
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
            self._flush_once()

    def _flush_once(self) -> None:
        with self._lock:
            rows, resumes = _take(self._rows), _take(self._resumes)
            if rows or resumes:
                if time.monotonic() >= self._retry_at:
                    try:
                        unmatched = self._write(rows, resumes)
                    except Exception as exc:  # noqa: BLE001 -- any failure: keep them on disk
                        self._failed(exc)
                    else:
                        self._written(rows)
                        rows, resumes = [], unmatched
                if rows or resumes:
                    self._keep(rows, resumes)
            if self._backlog and time.monotonic() >= self._retry_at:
                self._send_outbox()

    def _keep(self, rows: list[Row], resumes: list[tuple[str, float]]) -> None:
        try:
            self.outbox.put(rows, resumes)
            self._backlog = True
        except Exception as exc:  # noqa: BLE001 -- a full disk: hold them in memory instead
            log.error("usage outbox write failed (%s): rows kept in memory", type(exc).__name__)
            self._rows.extendleft(reversed(rows))
            self._resumes.extendleft(reversed(resumes))

    def _send_outbox(self) -> None:
        while True:
            rows, resumes = self.outbox.peek(OUTBOX_BATCH)
            if not rows and not resumes:
                self._backlog = False
                return
            try:
                unmatched = self._write(rows, resumes)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                return
            kept = set(unmatched)
            expired = time.time() - RESUME_KEEP_SECONDS
            self.outbox.remove(
                [row["answer_id"] for row in rows],
                [r for r in resumes if r not in kept or r[1] < expired],
            )
            self._written(rows)
            if kept and len(rows) < OUTBOX_BATCH:
                return  # resumes waiting for their rows: try again in RETRY_SECONDS

    def _write(self, rows: list[Row], resumes: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """Insert the rows (ignoring any already there) and count the resumes, in one
        transaction; returns the resumes whose answer has no row yet."""
        unmatched = []
        self._ensure_table()
        with self.engine.begin() as connection:
            if rows:
                dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
                statement = dialect.insert(usage).on_conflict_do_nothing(
                    index_elements=["answer_id"]
                )
                connection.execute(statement, rows)
            for answer_id, since in resumes:
                counted = connection.execute(
                    update(usage)
                    .where(usage.c.answer_id == answer_id)
                    .values(resumes=usage.c.resumes + 1)
                )
                if counted.rowcount == 0:
                    unmatched.append((answer_id, since))
        if self.error is not None:
            log.warning("usage ledger reachable again (%s)", self.where)
            self.error = None
        return unmatched

    def _ensure_table(self) -> None:
        """The local SQLite file is made on first use (PostgreSQL's table, by the migrate
        command in the release phase, since the proxy's database user may not own the schema)."""
        if not self._ready:
            if self.engine.dialect.name == "sqlite" and not has_table(self.engine):
                try:
                    migrate(self.engine)
                except Exception:
                    if not has_table(self.engine):  # else another worker made it meanwhile
                        raise
            self._ready = True

    def _written(self, rows: list[Row]) -> None:
        if rows:
            self.on_written(rows)

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._retry_at = now + RETRY_SECONDS
        self.error = type(exc).__name__
        if now - self._logged_at >= ERROR_LOG_INTERVAL_SECONDS:
            self._logged_at = now
            log.error(
                "usage ledger unavailable (%s): rows wait in the outbox %s",
                self.error,
                self.outbox.path,
            )

    # -- reading ---------------------------------------------------------------------------

    def totals(self, user: str | None, since: datetime, until: datetime | None = None) -> list[Row]:
        self._ensure_table()
        return totals(self.engine, user, since, until)

    def recent(self, user: str, limit: int = RECENT) -> list[Row]:
        self._ensure_table()
        return recent(self.engine, user, limit)

    def spent(self, user: str, now: datetime) -> Spent:
        self._ensure_table()
        return spent(self.engine, user, now)


def _take(pending: collections.deque) -> list:
    taken = []
    while pending:
        taken.append(pending.popleft())
    return taken


def _add_up(found: Iterable[Any]) -> list[Row]:
    sums: dict[tuple[str, str | None], Row] = {}
    for user_id, currency, tokens, amount in found:
        entry = sums.setdefault(
            (user_id, currency),
            {
                "user_id": user_id,
                "currency": currency,
                "answers": 0,
                "total_tokens": 0,
                "total_price": Decimal(0),
            },
        )
        entry["answers"] += 1
        entry["total_tokens"] += tokens or 0
        entry["total_price"] += amount or 0
    return [sums[key] for key in sorted(sums, key=lambda k: (k[0], k[1] or ""))]


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def next_month(now: datetime) -> datetime:
    start = month_start(now)
    return (start + timedelta(days=32)).replace(day=1)


def totals(
    engine: Engine, user: str | None, since: datetime, until: datetime | None = None
) -> list[Row]:
    """Answers, tokens and price per user and currency, for answers started in
    [since, until)."""
    where = [usage.c.started_at >= since]
    if until is not None:
        where.append(usage.c.started_at < until)
    if user is not None:
        where.append(usage.c.user_id == user)
    key = (usage.c.user_id, usage.c.currency)
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":  # prices are text there: add them up exactly here
            found = connection.execute(
                select(*key, usage.c.total_tokens, usage.c.total_price).where(*where)
            )
            return _add_up(found)
        found = connection.execute(
            select(
                *key,
                func.count().label("answers"),
                func.coalesce(func.sum(usage.c.total_tokens), 0).label("total_tokens"),
                func.coalesce(func.sum(usage.c.total_price), 0).label("total_price"),
            )
            .where(*where)
            .group_by(*key)
            .order_by(*key)
        )
        return [{**row._asdict(), "total_price": Decimal(row.total_price)} for row in found]


def recent(engine: Engine, user: str, limit: int = RECENT) -> list[Row]:
    with engine.connect() as connection:
        found = connection.execute(
            select(usage)
            .where(usage.c.user_id == user)
            .order_by(usage.c.started_at.desc())
            .limit(limit)
        )
        return [row._asdict() for row in found]


@dataclass(frozen=True)
class Spent:
    """What the ledger holds for one user: this UTC day's and month's prices added up, and the
    dearest answer of the month (what each answer in flight is counted at by the budgets)."""

    day: Decimal
    month: Decimal
    dearest: Decimal


def spent(engine: Engine, user: str, now: datetime) -> Spent:
    today, month = day_start(now), month_start(now)
    with engine.connect() as connection:
        where = (usage.c.user_id == user, usage.c.started_at >= month)
        if engine.dialect.name == "sqlite":
            found = connection.execute(
                select(usage.c.started_at, usage.c.total_price).where(*where)
            ).all()
            prices = [(at, amount or Decimal(0)) for at, amount in found]
            return Spent(
                day=sum((amount for at, amount in prices if at >= today), Decimal(0)),
                month=sum((amount for _, amount in prices), Decimal(0)),
                dearest=max((amount for _, amount in prices), default=Decimal(0)),
            )
        price_col = func.coalesce(usage.c.total_price, 0)
        row = connection.execute(
            select(
                func.coalesce(func.sum(price_col).filter(usage.c.started_at >= today), 0),
                func.coalesce(func.sum(price_col), 0),
                func.coalesce(func.max(price_col), 0),
            ).where(*where)
        ).one()
        return Spent(*(Decimal(value) for value in row))
