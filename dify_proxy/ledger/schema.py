"""The ledger's table, the same on PostgreSQL and SQLite, and how to reach the database.

SQLAlchemy Core gives one table definition and one insert for both databases (Alembic's
migrations need SQLAlchemy anyway); psycopg 3 is the PostgreSQL driver, which cooperates with
gevent's monkey-patching by itself (since 3.1.14), so a query waits without blocking a worker's
event loop.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    Column,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    text,
)

from .sqlitewal import BUSY_TIMEOUT_SECONDS, use_wal

TABLE = "dify_usage"
VERSION_TABLE = "dify_usage_alembic_version"  # not `alembic_version`: the team may have its own


class ExactPrice(TypeDecorator):
    """`numeric` on PostgreSQL; text on SQLite, whose NUMERIC would turn prices into floats."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value) if dialect.name == "sqlite" else Decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(str(value))


class UtcTime(TypeDecorator):
    """`timestamptz` on PostgreSQL; on SQLite naive UTC text, which sorts and compares as time."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

usage = Table(
    TABLE,
    metadata,
    # The proxy's own id for the answer (a streaming answer's stream id, which its SSE event ids
    # carry): the key that makes a row written twice a row written once. Not the request id,
    # which a client may choose (X-Request-ID) and so may repeat.
    Column("answer_id", Text, primary_key=True),
    Column("request_id", Text),
    Column("user_id", Text, nullable=False),  # the session's `sub`
    Column("app_mode", Text, nullable=False, server_default="chat"),
    Column("conversation_id", Text),
    Column("message_id", Text),
    Column("task_id", Text),
    Column("workflow_run_id", Text),
    Column("started_at", UtcTime, nullable=False),
    Column("ended_at", UtcTime, nullable=False),
    Column("end_reason", Text, nullable=False),
    Column("first_event_ms", Integer),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("total_tokens", Integer, nullable=False, server_default="0"),
    Column("total_price", ExactPrice),
    Column("currency", String(16)),
    Column("resumes", Integer, nullable=False, server_default="0"),
    Index("dify_usage_user_started", "user_id", "started_at"),
    schema=None,
)


def engine_url(database_url: str | None, sqlite_path: str) -> str:
    """SQLAlchemy's URL: psycopg 3 for PostgreSQL (Heroku's `postgres://` included), else the
    SQLite file."""
    if not database_url:
        return f"sqlite:///{os.path.abspath(sqlite_path)}"
    scheme, _, rest = database_url.partition("://")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return f"postgresql+psycopg://{rest}"
    raise ValueError("DATABASE_URL must be a postgres:// or postgresql:// URL")


def make_engine(database_url: str | None, sqlite_path: str) -> Engine:
    url = engine_url(database_url, sqlite_path)
    if url.startswith("sqlite"):
        os.makedirs(os.path.dirname(os.path.abspath(sqlite_path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_size=2,
        max_overflow=4,
        pool_timeout=5,
        pool_pre_ping=True,
        pool_recycle=300,
        connect_args={
            # Supabase's transaction pooler (port 6543, Supavisor) does not support prepared
            # statements; psycopg prepares none with this, and a direct connection loses little.
            "prepare_threshold": None,
            "connect_timeout": 5,
            "application_name": "dify-proxy",
        },
    )


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    """WAL: every worker of the instance writes the same file, and readers never wait."""
    use_wal(connection)
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def shown(database_url: str | None, sqlite_path: str) -> str:
    """Where the ledger is, for a log line or the run banner: never the password."""
    if not database_url:
        return f"SQLite file {os.path.abspath(sqlite_path)}"
    parts = urlsplit(database_url)
    port = f":{parts.port}" if parts.port else ""
    return f"PostgreSQL {parts.hostname}{port}{parts.path}"


def has_table(engine: Engine) -> bool:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            found = connection.execute(
                text("select 1 from sqlite_master where type = 'table' and name = :n"),
                {"n": TABLE},
            )
        else:
            found = connection.execute(text("select to_regclass('public.dify_usage')"))
            return found.scalar() is not None
        return found.first() is not None
