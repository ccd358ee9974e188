"""Price and budget changes: validation, storage and their audit records (transactional functions)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from services.billing import audit, budgets, periods
from services.billing.catalog import (
    BUDGET_COLUMNS,
    PRICE_COLUMNS,
    budget_from_row,
    budget_to_row,
    bump_version,
    price_from_row,
)
from services.billing.model import Budget, Enforcement, PeriodKind, ScopeKind, Thresholds
from services.billing.store.base import Tx
from services.billing.validation import check_text
from services.billing.webhooks import WebhookPolicy
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from services.common.pricing import Price

MAX_PRICE = 10**12  # one million currency units per million tokens


def check_price(price: Price, currency: str) -> None:
    check_text(price.model, "price.model", required=True)
    check_text(price.model_version, "price.model_version", required=False)
    if price.currency != currency:
        raise InvalidInput(f"price currency is {price.currency!r} but this ledger keeps {currency}; "
                           f"give every amount in {currency}", field="price.input_per_million.currency_code")
    for name, value in (("input_per_million", price.input_per_million),
                        ("output_per_million", price.output_per_million),
                        ("cached_per_million", price.cached_per_million or 0)):
        if not 0 <= value <= MAX_PRICE:
            raise InvalidInput(f"price.{name} must be 0 to {MAX_PRICE} micro-units, got {value}",
                               field=f"price.{name}")


def create_price(tx: Tx, price: Price, actor: str, now_us: int, claimed: str = "") -> Price:
    stored = dataclasses.replace(price, price_id=price.price_id or uuid.uuid4().hex[:12],
                                 effective_us=price.effective_us or now_us)
    if tx.one("SELECT 1 FROM prices WHERE model = ? AND model_version = ? AND effective_us = ?",
              (stored.model, stored.model_version, stored.effective_us)):
        raise AlreadyExists(f"{stored.model} {stored.model_version or '(all versions)'} already has a price taking "
                            "effect at that exact time; pick another effective_time", field="price.effective_time")
    tx.execute(f"INSERT INTO prices ({PRICE_COLUMNS}, create_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (stored.price_id, stored.model, stored.model_version, stored.input_per_million,
                stored.output_per_million, stored.cached_per_million, stored.effective_us, stored.currency, now_us))
    bump_version(tx)
    audit.record(tx, now_us, actor, "price.create", f"price/{stored.price_id}", {"new": dataclasses.asdict(stored)},
                 claimed)
    return stored


def list_prices(tx: Tx, model: str) -> list[Price]:
    sql = f"SELECT {PRICE_COLUMNS} FROM prices"
    rows = tx.all(sql + " WHERE model = ? ORDER BY model, model_version, effective_us", (model,)) if model else \
        tx.all(sql + " ORDER BY model, model_version, effective_us")
    return [price_from_row(r) for r in rows]


def delete_price(tx: Tx, price_id: str, actor: str, now_us: int, claimed: str = "") -> None:
    row = tx.one(f"SELECT {PRICE_COLUMNS} FROM prices WHERE price_id = ?", (price_id,))
    if row is None:
        raise NotFound(f"price {price_id[:80]!r} does not exist; list prices with `autoglm price list`",
                       field="price_id")
    price = price_from_row(row)
    if price.effective_us <= now_us:
        raise FailedPrecondition(f"price {price_id} is already in force (events were priced with it) and cannot be "
                                 "deleted; add a newer price instead", field="price_id")
    tx.execute("DELETE FROM prices WHERE price_id = ?", (price_id,))
    bump_version(tx)
    audit.record(tx, now_us, actor, "price.delete", f"price/{price_id}", {"old": dataclasses.asdict(price)}, claimed)


def check_budget(b: Budget, currency: str, amount_currency: str) -> Budget:
    """Validate a budget and fill its defaults; returns the budget to store."""
    s = b.scope
    if s.kind == ScopeKind.UNSPECIFIED:
        raise InvalidInput("budget.scope.kind is required: TENANT, API_KEY or TAG", field="budget.scope.kind")
    if s.kind in (ScopeKind.TENANT, ScopeKind.API_KEY) and not s.tenant_id:
        raise InvalidInput("budget.scope.tenant_id is required for TENANT and API_KEY budgets",
                           field="budget.scope.tenant_id")
    if s.kind == ScopeKind.API_KEY and not s.api_key_id:
        raise InvalidInput("budget.scope.api_key_id is required for an API_KEY budget", field="budget.scope.api_key_id")
    if s.kind == ScopeKind.TAG and not (s.tag_key and s.tag_value):
        raise InvalidInput("budget.scope.tag_key and tag_value are required for a TAG budget",
                           field="budget.scope.tag_key")
    for name, value in (("tenant_id", s.tenant_id), ("api_key_id", s.api_key_id), ("tag_key", s.tag_key),
                        ("tag_value", s.tag_value)):
        check_text(value, f"budget.scope.{name}", required=False, limit=64 if name.startswith("tag") else 256)
    p = b.period
    if p.kind == PeriodKind.UNSPECIFIED:
        raise InvalidInput("budget.period.kind is required: DAILY, WEEKLY, MONTHLY or ROLLING_DAYS",
                           field="budget.period.kind")
    if p.kind == PeriodKind.ROLLING_DAYS and not 1 <= p.rolling_days <= 366:
        raise InvalidInput("budget.period.rolling_days must be 1 to 366 for a ROLLING_DAYS budget",
                           field="budget.period.rolling_days")
    periods.zone(p.time_zone)
    if b.auto is not None:
        if p.kind == PeriodKind.ROLLING_DAYS:
            raise InvalidInput("an auto budget needs a calendar period (DAILY, WEEKLY or MONTHLY)",
                               field="budget.auto")
        a = b.auto
        if not 1 <= a.lookback_periods <= 36 or not 1 <= a.factor_permille <= 100_000:
            raise InvalidInput("budget.auto needs lookback_periods 1 to 36 and factor_permille 1 to 100000",
                               field="budget.auto")
        if (a.floor_micros > 0) == (a.floor_tokens > 0) or a.floor_micros < 0 or a.floor_tokens < 0:
            raise InvalidInput("budget.auto needs exactly one floor: floor_amount (money) or floor_tokens",
                               field="budget.auto")
    elif (b.amount_micros > 0) == (b.tokens > 0) or b.amount_micros < 0 or b.tokens < 0:
        raise InvalidInput("a budget is limited by exactly one positive amount or tokens (or set auto)",
                           field="budget.amount")
    if (b.amount_micros or (b.auto and b.auto.floor_micros)) and amount_currency not in ("", currency):
        raise InvalidInput(f"budget currency is {amount_currency!r} but this ledger keeps {currency}",
                           field="budget.amount.currency_code")
    t = b.thresholds
    if not 0 < t.warning <= t.critical <= t.emergency <= 10_000:
        raise InvalidInput("thresholds must satisfy 0 < warning <= critical <= emergency <= 10000 (percent)",
                           field="budget.thresholds")
    if b.webhook_url:
        WebhookPolicy.parse(b.webhook_url)  # where it may point is checked by the service (it resolves the host)
    if b.enforcement == Enforcement.UNSPECIFIED:
        b = dataclasses.replace(b, enforcement=Enforcement.HARD)
    return b


def with_default_thresholds(t: Thresholds, default: Thresholds) -> Thresholds:
    return Thresholds(t.warning or default.warning, t.critical or default.critical, t.emergency or default.emergency)


def get_budget(tx: Tx, budget_id: str) -> Budget:
    row = tx.one(f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE budget_id = ?", (budget_id,))
    if row is None:
        raise NotFound(f"budget {budget_id[:80]!r} does not exist; list budgets with `autoglm budget list`",
                       field="budget_id")
    return budget_from_row(row)


def create_budget(tx: Tx, budget: Budget, actor: str, now_us: int, claimed: str = "") -> Budget:
    stored = dataclasses.replace(budget, budget_id=budget.budget_id or uuid.uuid4().hex[:12], create_us=now_us,
                                 update_us=now_us, generation=0)
    if tx.one("SELECT 1 FROM budgets WHERE budget_id = ?", (stored.budget_id,)):
        raise AlreadyExists(f"budget {stored.budget_id!r} already exists; update it instead", field="budget.budget_id")
    tx.execute(f"INSERT INTO budgets ({BUDGET_COLUMNS}) VALUES ({', '.join('?' * 20)})", budget_to_row(stored))
    bump_version(tx)
    audit.record(tx, now_us, actor, "budget.create", f"budget/{stored.budget_id}", {"new": _plain(stored)}, claimed)
    return stored


def update_budget(tx: Tx, changes: Budget, actor: str, now_us: int, claimed: str = "") -> Budget:
    old = get_budget(tx, changes.budget_id)
    tx.lock_budgets([old.budget_id])
    new = dataclasses.replace(old, amount_micros=changes.amount_micros, tokens=changes.tokens,
                              enforcement=changes.enforcement, thresholds=changes.thresholds, auto=changes.auto,
                              webhook_url=changes.webhook_url, update_us=now_us)
    before = budgets.effective_limit(tx, old, now_us)
    auto_changed = new.auto is not None and new.auto != old.auto
    after = budgets.auto_limit(tx, new, now_us) if auto_changed else budgets.effective_limit(tx, new, now_us)
    if after[0] > before[0] or after[1] > before[1]:
        new = dataclasses.replace(new, generation=old.generation + 1)  # raising the limit re-arms the alerts
    if auto_changed:
        tx.execute("UPDATE budget_usage SET limit_micros = ?, limit_tokens = ? WHERE budget_id = ? AND bucket_us = ?",
                   (*after, new.budget_id, periods.bucket_start(new.period, now_us)))
    tx.execute(f"UPDATE budgets SET ({BUDGET_COLUMNS}) = ({', '.join('?' * 20)}) WHERE budget_id = ?",
               (*budget_to_row(new), new.budget_id))
    bump_version(tx)
    audit.record(tx, now_us, actor, "budget.update", f"budget/{new.budget_id}", {"old": _plain(old), "new": _plain(new)},
                 claimed)
    return new


def delete_budget(tx: Tx, budget_id: str, actor: str, now_us: int, claimed: str = "") -> None:
    old = get_budget(tx, budget_id)
    tx.lock_budgets([budget_id])
    for table in ("budget_usage", "hold_budgets"):
        tx.execute(f"DELETE FROM {table} WHERE budget_id = ?", (budget_id,))
    tx.execute("DELETE FROM budgets WHERE budget_id = ?", (budget_id,))
    bump_version(tx)
    audit.record(tx, now_us, actor, "budget.delete", f"budget/{budget_id}", {"old": _plain(old)}, claimed)


def _plain(b: Budget) -> dict[str, Any]:
    doc = dataclasses.asdict(b)
    doc["scope"]["kind"] = b.scope.kind.name
    doc["period"]["kind"] = b.period.kind.name
    doc["enforcement"] = b.enforcement.name
    return doc
