"""`GET /api/usage`: the session's own usage from the ledger, and the one call through which
an answer is booked (its money budgets checked, its row recorded when it ends)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, current_app, g

from .auth import require_session
from .budgets import Budgets
from .errors import ApiError
from .ledger import Entry, Ledger, Row, day_start, month_start
from .limits import user_limit

bp = Blueprint("usage", __name__, url_prefix="/api")


def book(user: str, app_mode: str = "chat") -> Entry:
    """Before Dify is called: a 429 when a money budget is used up, else the answer's ledger
    entry (holding its share of the budgets until its row is written). Call `entry.streamed`
    or `entry.answered` when it ends, or `entry.cancel()` when Dify was never asked."""
    budgets: Budgets = current_app.extensions["dify_proxy.budgets"]
    ledger: Ledger = current_app.extensions["dify_proxy.ledger"]
    hold = budgets.reserve(
        user,
        daily=user_limit("daily_cost_budget"),
        monthly=user_limit("monthly_cost_budget"),
    )
    return ledger.open(
        user,
        g.get("request_id"),
        app_mode,
        on_recorded=budgets.held(user, hold),
        on_cancel=lambda: budgets.cancel(user, hold),
    )


@bp.get("/usage")
@require_session
def own_usage() -> dict[str, Any]:
    ledger: Ledger = current_app.extensions["dify_proxy.ledger"]
    now = datetime.now(UTC)
    try:
        today = ledger.totals(g.user_id, day_start(now))
        month = ledger.totals(g.user_id, month_start(now))
        recent = ledger.recent(g.user_id)
    except Exception:  # noqa: BLE001 -- the database is away: say so, without its error
        raise ApiError(
            503, "usage_unavailable", "Usage cannot be read right now; try again shortly."
        ) from None
    return {"today": period(today), "month": period(month), "recent": [answer(r) for r in recent]}


def period(sums: list[Row]) -> dict[str, Any]:
    """One period's totals. Prices in different currencies are never added together: the
    currency with the most answers is the period's, and any others are listed beside it."""
    if not sums:
        return {"answers": 0, "total_tokens": 0, "total_price": "0", "currency": None}
    ordered = sorted(sums, key=lambda s: -s["answers"])
    main = ordered[0]
    result: dict[str, Any] = {
        "answers": sum(s["answers"] for s in sums),
        "total_tokens": sum(s["total_tokens"] for s in sums),
        "total_price": money(main["total_price"]),
        "currency": main["currency"],
    }
    if len(ordered) > 1:
        result["by_currency"] = [
            {
                "currency": s["currency"],
                "answers": s["answers"],
                "total_tokens": s["total_tokens"],
                "total_price": money(s["total_price"]),
            }
            for s in ordered
        ]
    return result


def answer(row: Row) -> dict[str, Any]:
    return {
        "answer_id": row["answer_id"],
        "request_id": row["request_id"],
        "app_mode": row["app_mode"],
        "conversation_id": row["conversation_id"],
        "message_id": row["message_id"],
        "task_id": row["task_id"],
        "workflow_run_id": row["workflow_run_id"],
        "started_at": row["started_at"].isoformat(),
        "ended_at": row["ended_at"].isoformat(),
        "end_reason": row["end_reason"],
        "first_event_ms": row["first_event_ms"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["total_tokens"],
        "total_price": None if row["total_price"] is None else money(row["total_price"]),
        "currency": row["currency"],
        "resumes": row["resumes"],
    }


def money(value: Decimal) -> str:
    """A decimal string, never a float and never `1E-7`."""
    return format(value, "f")
