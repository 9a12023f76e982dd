"""Money budgets per user: DAILY_COST_BUDGET and MONTHLY_COST_BUDGET, in Dify's currency, over
UTC days and months, checked before Dify is called.

The reservation rule: a new answer is refused when what the ledger has recorded for the user,
plus a hold for each of the user's answers in flight, reaches a budget. Each hold counts as
the user's dearest answer this month (nothing, before the first priced answer), since nobody
knows what an answer will cost until Dify says so. A hold is taken before Dify is called and
given back once the answer's row is in the ledger (or the answer never started), so an answer
counts once: as a hold, then as its row. Holds live in Redis beside the stream leases, so they
count across instances; each lapses after HOLD_SECONDS if its worker died.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from .errors import ApiError
from .ledger import Ledger, Row, day_start, next_month
from .limits import SLOT_RETRY_SECONDS, in_words, over_limit
from .quotas import Quotas

log = logging.getLogger(__name__)

HOLD_SECONDS = 3600.0
ERROR_LOG_INTERVAL_SECONDS = 60.0


class Budgets:
    def __init__(self, daily: Decimal, monthly: Decimal, quotas: Quotas, ledger: Ledger) -> None:
        self.daily = daily
        self.monthly = monthly
        self.quotas = quotas
        self.ledger = ledger
        self._holds: dict[str, tuple[str, str]] = {}  # by answer id: (user, hold)
        self._lock = threading.Lock()
        self._logged_at = -ERROR_LOG_INTERVAL_SECONDS

    @property
    def enabled(self) -> bool:
        return self.daily > 0 or self.monthly > 0

    def reserve(
        self,
        user: str,
        now: datetime | None = None,
        *,
        daily: Decimal | None = None,
        monthly: Decimal | None = None,
    ) -> str | None:
        """A hold for one more answer of `user`'s, or an ApiError (429) naming the budget.
        `daily` and `monthly` are the user's plan's budgets where PLANS sets them (else the
        variables'). None when budgets are off, or when the ledger cannot be read (logged): a
        database outage must not stop every answer."""
        daily = self.daily if daily is None else daily
        monthly = self.monthly if monthly is None else monthly
        if not (daily > 0 or monthly > 0):
            return None
        now = now or datetime.now(UTC)
        try:
            recorded = self.ledger.spent(user, now)
        except Exception as exc:  # noqa: BLE001 -- budgets degrade, chat goes on
            self._unreadable(exc)
            return None
        limits = []
        if daily > 0:
            limits.append(("daily", daily, recorded.day, day_start(now) + _DAY, "today's"))
        if monthly > 0:
            limits.append(("monthly", monthly, recorded.month, next_month(now), "this month's"))
        for name, budget, used, renews, label in limits:
            if used >= budget:
                raise _refusal(name, label, budget, renews, now, running=False)
        # How many answers may be in flight at once before a budget would be reached.
        cap = min(_cap(budget, used, recorded.dearest) for _, budget, used, _, _ in limits)
        hold = self.quotas.acquire_hold(user, cap, HOLD_SECONDS)
        if hold is None:
            name, budget, used, renews, label = min(
                limits, key=lambda item: _cap(item[1], item[2], recorded.dearest)
            )
            raise _refusal(name, label, budget, renews, now, running=True)
        return hold

    def held(self, user: str, hold: str | None) -> Callable[[str], None]:
        """What the answer's ledger entry calls with its answer id once its row is recorded:
        the hold then waits for the row to be written."""

        def recorded(answer_id: str) -> None:
            if hold is not None:
                with self._lock:
                    self._holds[answer_id] = (user, hold)

        return recorded

    def cancel(self, user: str, hold: str | None) -> None:
        """The answer never started (Dify refused, the stream limit): give the hold back."""
        if hold is not None:
            self.quotas.release_hold(user, hold)

    def written(self, rows: list[Row]) -> None:
        """The ledger wrote these rows: their holds are given back."""
        for row in rows:
            with self._lock:
                found = self._holds.pop(row["answer_id"], None)
            if found is not None:
                self.quotas.release_hold(*found)

    def _unreadable(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_INTERVAL_SECONDS:
            self._logged_at = now
            log.error("usage ledger unreadable (%s): cost budgets not enforced", type(exc).__name__)


_DAY = timedelta(days=1)


def _cap(budget: Decimal, used: Decimal, dearest: Decimal) -> int:
    """The most holds with which recorded + holds x dearest stays under the budget."""
    if dearest <= 0:
        return 1_000_000
    return max(0, math.ceil((budget - used) / dearest))


def _refusal(
    name: str, label: str, budget: Decimal, renews: datetime, now: datetime, running: bool
) -> ApiError:
    """The money budgets' 429, in the words of every per-user limit (limits.over_limit)."""
    code = f"{name}_cost_budget_exceeded"
    reached = f"{name.capitalize()} cost budget reached"
    allowance = f"{budget} a {'day' if name == 'daily' else 'month'}"
    if running:
        return over_limit(
            "cost",
            code,
            reached,
            allowance,
            "the answers you have running would use up the rest; wait for one to finish",
            SLOT_RETRY_SECONDS,
        )
    seconds = max(1, math.ceil((renews - now).total_seconds()))
    at = "00:00 UTC" if name == "daily" else renews.strftime("%Y-%m-%d 00:00 UTC")
    return over_limit(
        "cost", code, reached, allowance, f"it renews at {at}, in {in_words(seconds)}", seconds
    )
