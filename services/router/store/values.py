"""How values the router keeps in its store are spelled in a row, shared by the stores of every domain:
times as integer microseconds since the epoch (UTC), a caller's principal as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime

from services.common.generation import TrafficClass
from services.router.types import Principal


def us(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1_000_000)


def dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1_000_000, UTC)


def principal_json(p: Principal) -> str:
    data = asdict(p)
    data["traffic_class"] = int(p.traffic_class)
    return json.dumps(data)


def principal_from_json(text: str) -> Principal:
    data = json.loads(text)
    data["traffic_class"] = TrafficClass(data["traffic_class"])
    data["allowed_models"] = tuple(data["allowed_models"])
    return Principal(**data)
