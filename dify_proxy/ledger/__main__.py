"""`python -m dify_proxy.ledger migrate`: create or upgrade the ledger's table (DATABASE_URL's
PostgreSQL, or the local SQLite file). `python -m dify_proxy.ledger report --from 2026-12-01
--to 2026-12-31`: usage per user over those UTC days (both included), as CSV on stdout."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from datetime import UTC, datetime, timedelta

from dotenv import load_dotenv
from sqlalchemy import Engine

from ..settings import ConfigError, ledger_location
from . import migrate, totals
from .schema import make_engine, shown


def _day(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date such as 2026-12-01") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dify_proxy.ledger", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create or upgrade public.dify_usage")
    report = commands.add_parser("report", help="usage per user as CSV")
    report.add_argument("--from", dest="start", type=_day, required=True, metavar="YYYY-MM-DD")
    report.add_argument("--to", dest="end", type=_day, required=True, metavar="YYYY-MM-DD")
    args = parser.parse_args(argv)

    load_dotenv(override=False)
    try:
        where = ledger_location(os.environ)
    except ConfigError as exc:
        print(f"dify-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(where["database_url"], where["usage_sqlite_path"])
    try:
        if args.command == "migrate":
            migrate(engine)
            label = shown(where["database_url"], where["usage_sqlite_path"])
            print(f"usage ledger ready: {label}", file=sys.stderr)
            return 0
        return write_report(engine, args.start, args.end + timedelta(days=1))
    finally:
        engine.dispose()


def write_report(engine: Engine, since: datetime, until: datetime) -> int:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["user", "answers", "tokens", "price", "currency"])
    for row in totals(engine, None, since, until):
        out.writerow(
            [
                row["user_id"],
                row["answers"],
                row["total_tokens"],
                format(row["total_price"], "f"),
                row["currency"] or "",
            ]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
