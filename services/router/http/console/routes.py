"""The console's routes: pages under /console/ (Jinja2, a little JavaScript) and the JSON endpoints their
scripts call under /console/api/. Every page needs a signed-in session (admin or operator-read); every
change needs the admin session and its CSRF token, and goes through the admin operations AdminService
uses (`services/router/admin.py`) or billing's operator RPCs (`services/router/billing_operator.py`)."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from services.common import audit_timeline
from services.common.errors import DomainError, InvalidInput, PermissionDenied, Unauthenticated
from services.router.admin import Admin
from services.router.billing_operator import BillingOperator
from services.router.gateway import Gateway
from services.router.http import errors
from services.router.http.console import forms, views
from services.router.http.console.live import LiveSeries
from services.router.http.console.session import COOKIE, CSRF_HEADER, Session, Sessions
from services.router.replica_monitor import ReplicaMonitor

ACTOR = "console"
SPEND_BY = {"tenant": "tenant", "model": "model", "tag": "tag", "key": "api_key"}
SINCE = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
AUDIT_PAGE = 25
AUDIT_PAGE_MAX = 200
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


class ConsoleBackend(Protocol):
    """The parts of the router the console uses (RouterApp has them)."""

    admin: Admin
    billing_operator: BillingOperator
    gateway: Gateway
    monitor: ReplicaMonitor


class Console:
    """What the console keeps: its sessions, the Live page's series, whether cookies are Secure."""

    def __init__(self, sessions: Sessions, live: LiveSeries, secure_cookie: bool = True) -> None:
        self.sessions = sessions
        self.live = live
        self.secure_cookie = secure_cookie


def _console(request: Request) -> Console:
    return request.app.state.console  # type: ignore[no-any-return]


def _parts(request: Request) -> ConsoleBackend:
    return request.app.state.backend  # type: ignore[no-any-return]


class SignIn(Exception):
    """A page asked for without a session: the browser is sent to the sign-in page."""


def viewer(request: Request) -> Session:
    try:
        return _console(request).sessions.session(request.cookies.get(COOKIE, ""))
    except Unauthenticated:
        if request.url.path.startswith("/console/api/"):
            raise
        raise SignIn() from None


def changer(request: Request, session: Annotated[Session, Depends(viewer)]) -> Session:
    """The session of a change: admin, its CSRF token in the header, and sent by a console page of this origin."""
    origin = request.headers.get("origin")
    if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
        raise PermissionDenied("a console change must come from the console's own pages")
    Sessions.check_change(session, request.headers.get(CSRF_HEADER, ""))
    return session


Viewer = Annotated[Session, Depends(viewer)]
Changer = Annotated[Session, Depends(changer)]
router = APIRouter(prefix="/console", include_in_schema=False)


# Pages run only the console's own scripts and styles, are never framed and never cached.
PAGE_HEADERS = {"content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
                "x-frame-options": "DENY", "cache-control": "no-store", "referrer-policy": "same-origin",
                "x-content-type-options": "nosniff"}


def page(request: Request, name: str, session: Session | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"session": session, "page": name.removesuffix(".html"),
                                                      **context}, headers=PAGE_HEADERS)


async def _json(request: Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except ValueError:
        raise InvalidInput("the request body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    return doc


# --- sign-in ---------------------------------------------------------------------------------------
@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/console/spend", 303)


@router.get("/login")
async def login(request: Request) -> HTMLResponse:
    return page(request, "login.html", None)


@router.post("/api/session")
async def sign_in(request: Request) -> JSONResponse:
    console = _console(request)
    session, cookie = console.sessions.sign_in(str((await _json(request)).get("token", "")))
    answer = JSONResponse({"role": str(session.role), "expires": session.expires})
    answer.set_cookie(COOKIE, cookie, max_age=console.sessions.lifetime_s, path="/console", httponly=True,
                      secure=console.secure_cookie, samesite="strict")
    return answer


@router.post("/api/session/end")
async def sign_out(session: Changer) -> JSONResponse:
    answer = JSONResponse({"signed_out": True})
    answer.delete_cookie(COOKIE, path="/console")
    return answer


# --- Spend ---------------------------------------------------------------------------------------------
def _spend_query(by: str, since: str, granularity: str, tag_key: str) -> tuple[str, int, str, str]:
    if by not in SPEND_BY:
        raise InvalidInput(f"by must be one of {', '.join(SPEND_BY)}", field="by")
    if since not in SINCE:
        raise InvalidInput(f"since must be one of {', '.join(SINCE)}", field="since")
    if granularity not in ("hour", "day", "minute"):
        raise InvalidInput("granularity must be minute, hour or day", field="granularity")
    if by == "tag" and not tag_key:
        raise InvalidInput("grouping by tag needs the tag key (e.g. team)", field="tag_key")
    return SPEND_BY[by], SINCE[since], granularity, tag_key


async def _spend(request: Request, by: str, since: str, granularity: str, tag_key: str) -> dict[str, Any]:
    dimension, window, granularity, tag_key = _spend_query(by, since, granularity, tag_key)
    billing = _parts(request).billing_operator
    end_us = int(time.time() * 1e6) + 1
    start_us = end_us - window * 1_000_000
    # Two reports at once (billing scans for both in parallel): the chart's rows, and the top keys.
    report, keys = await asyncio.gather(billing.usage_report(start_us, end_us, [dimension], granularity, tag_key),
                                        billing.usage_report(start_us, end_us, ["api_key"], "none", top_n=10))
    rows, _ = views.spend(report, dimension)
    _, top_keys = views.spend(keys, "api_key")
    total = report.get("total", {})
    return {"rows": rows, "top_keys": top_keys,
            "total": {"requests": int(total.get("requests") or 0), "cost": views.money((total.get("cost") or {}).get(
                "micros")), "tokens": int(total.get("prompt_tokens") or 0) + int(total.get("completion_tokens") or 0)}}


@router.get("/spend")
async def spend_page(request: Request, session: Viewer, by: str = "tenant", since: str = "24h",
                     granularity: str = "hour", tag_key: str = "") -> HTMLResponse:
    _spend_query(by, since, granularity if granularity else "hour", tag_key or "x")
    return page(request, "spend.html", session, by=by, since=since, granularity=granularity, tag_key=tag_key,
                choices_by=list(SPEND_BY), choices_since=list(SINCE))


@router.get("/api/spend")
async def spend_data(request: Request, session: Viewer, by: str = "tenant", since: str = "24h",
                     granularity: str = "hour", tag_key: str = "") -> dict[str, Any]:
    return await _spend(request, by, since, granularity, tag_key)


@router.get("/api/spend.csv")
async def spend_csv(request: Request, session: Viewer, by: str = "tenant", since: str = "24h",
                    granularity: str = "hour", tag_key: str = "") -> Response:
    data = await _spend(request, by, since, granularity, tag_key)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["bucket", by, "requests", "prompt_tokens", "completion_tokens", "cost", "anomalous"])
    for row in data["rows"]:
        writer.writerow([row["bucket"], row["group"], row["requests"], row["prompt_tokens"],
                         row["completion_tokens"], row["cost"], "yes" if row["anomalous"] else ""])
    return Response(out.getvalue(), media_type="text/csv",
                    headers={"content-disposition": f'attachment; filename="spend-by-{by}-{since}.csv"'})


# --- Budgets -------------------------------------------------------------------------------------------
@router.get("/budgets")
async def budgets_page(request: Request, session: Viewer) -> HTMLResponse:
    budgets = [views.budget(s) for s in await _parts(request).billing_operator.list_budgets()]
    return page(request, "budgets.html", session, budgets=budgets)


@router.post("/api/budgets")
async def budget_create(request: Request, session: Changer) -> dict[str, Any]:
    fields = forms.budget(await _json(request))
    return await _parts(request).billing_operator.save_budget(fields, ACTOR, update=False)


@router.post("/api/budgets/{budget_id}")
async def budget_update(request: Request, budget_id: str, session: Changer) -> dict[str, Any]:
    fields = forms.budget(await _json(request), budget_id)
    return await _parts(request).billing_operator.save_budget(fields, ACTOR, update=True)


@router.post("/api/budgets/{budget_id}/delete")
async def budget_delete(request: Request, budget_id: str, session: Changer) -> dict[str, Any]:
    await _parts(request).billing_operator.delete_budget(budget_id, ACTOR)
    return {"deleted": budget_id}


# --- Keys ----------------------------------------------------------------------------------------------
@router.get("/keys")
async def keys_page(request: Request, session: Viewer) -> HTMLResponse:
    keys = [views.key(k) for k in await _parts(request).admin.list_keys("", include_revoked=True)]
    return page(request, "keys.html", session, keys=keys)


@router.get("/api/keys/last-use")
async def key_last_use(request: Request, session: Viewer) -> dict[str, str]:
    """Per key, the hour of its latest usage event in billing's ledger over the last 7 days (the Keys page
    fills its "last use" column from it after loading)."""
    end_us = int(time.time() * 1e6) + 1
    report = await _parts(request).billing_operator.usage_report(end_us - 7 * 86400 * 1_000_000, end_us,
                                                                 ["api_key"], "hour")
    return views.last_use(report)


@router.post("/api/keys")
async def key_create(request: Request, session: Changer) -> dict[str, Any]:
    record, secret = await _parts(request).admin.create_key(forms.new_key(await _json(request)), actor=ACTOR)
    return {**views.key(record), "secret": secret}  # the only answer that ever carries it


@router.post("/api/keys/{key_id}/revoke")
async def key_revoke(request: Request, key_id: str, session: Changer) -> dict[str, Any]:
    return views.key(await _parts(request).admin.revoke_key(key_id, actor=ACTOR))


# --- Models --------------------------------------------------------------------------------------------
async def _models(request: Request) -> list[dict[str, Any]]:
    parts = _parts(request)
    rollbacks, _ = await parts.admin.audit_page("model.rollback", 100, "")
    return [views.model(m, parts.gateway.balancer, parts.admin.healthy_replicas(m), rollbacks, parts.monitor.latest)
            for m in parts.gateway.registry.models()]


@router.get("/models")
async def models_page(request: Request, session: Viewer) -> HTMLResponse:
    return page(request, "models.html", session, models=await _models(request))


@router.get("/api/models")
async def models_data(request: Request, session: Viewer) -> dict[str, Any]:
    """The Models page's figures: each version's replicas with health and their latest load report."""
    return {"models": await _models(request)}


@router.post("/api/models/{model}/split")
async def model_split(request: Request, model: str, session: Changer) -> dict[str, Any]:
    entry = await _parts(request).admin.set_split(model, forms.split(await _json(request)), actor=ACTOR)
    return {"model": entry.name, "weights": {v.version: v.weight_permille for v in entry.versions}}


# --- Audit ---------------------------------------------------------------------------------------------
def _audit_logs(parts: ConsoleBackend) -> dict[str, audit_timeline.Fetch]:
    """The two logs the Audit page merges, read through the same operations as AdminService's and billing's
    ListAuditEvents."""
    async def router_log(action: str, size: int, token: str) -> tuple[list[audit_timeline.TimelineEvent], str]:
        found, next_token = await parts.admin.audit_page(action, size, token)
        return [views.router_event(e) for e in found], next_token

    async def billing_log(action: str, size: int, token: str) -> tuple[list[audit_timeline.TimelineEvent], str]:
        found, next_token = await parts.billing_operator.audit_page(action, size, token)
        return [views.billing_event(e) for e in found], next_token

    return {"router": router_log, "billing": billing_log}


async def _audit(request: Request, source: str, action: str, page_token: str,
                 page_size: int = AUDIT_PAGE) -> dict[str, Any]:
    if not 1 <= page_size <= AUDIT_PAGE_MAX:
        raise InvalidInput(f"page_size must be 1 to {AUDIT_PAGE_MAX}, got {page_size}", field="page_size")
    events, next_token = await audit_timeline.timeline_page(_audit_logs(_parts(request)), action.strip(),
                                                            page_size, page_token, source)
    return {"events": [views.audit(e) for e in events], "next_page_token": next_token}


@router.get("/audit")
async def audit_page(request: Request, session: Viewer, source: str = "all", action: str = "",
                     page_token: str = "") -> HTMLResponse:
    found = await _audit(request, source, action, page_token)
    return page(request, "audit.html", session, events=found["events"], source=source, action=action,
                next_token=found["next_page_token"], choices_source=audit_timeline.CHOICES)


@router.get("/api/audit")
async def audit_data(request: Request, session: Viewer, source: str = "all", action: str = "",
                     page_token: str = "", page_size: int = AUDIT_PAGE) -> dict[str, Any]:
    """The Audit page's events as JSON: both logs merged newest first, `next_page_token` for the next page."""
    return await _audit(request, source, action, page_token, page_size)


# --- Live ----------------------------------------------------------------------------------------------
@router.get("/live")
async def live_page(request: Request, session: Viewer) -> HTMLResponse:
    return page(request, "live.html", session, interval_s=_console(request).live.interval_s)


@router.get("/api/live")
async def live_data(request: Request, session: Viewer) -> dict[str, Any]:
    return {"points": _console(request).live.points(), "interval_s": _console(request).live.interval_s}


def install(app: Any, console: Console) -> None:
    """Mount the console on the HTTP API's app: routes, static files (Chart.js vendored), the sign-in redirect."""
    from fastapi.staticfiles import StaticFiles

    app.state.console = console
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=Path(__file__).parent / "static"), name="console-static")

    async def to_sign_in(request: Request, exc: Exception) -> RedirectResponse:
        return RedirectResponse("/console/login", 303)

    app.add_exception_handler(SignIn, to_sign_in)
    api_errors = app.exception_handlers[DomainError]

    async def on_error(request: Request, exc: Exception) -> Response:
        """A page's error as a page (its status, the message); the JSON endpoints answer the API's way."""
        path = request.url.path
        if not path.startswith("/console/") or path.startswith("/console/api/"):
            return await api_errors(request, exc)  # type: ignore[no-any-return]
        status, body, headers = errors.domain_error_parts(exc)
        try:
            session: Session | None = _console(request).sessions.session(request.cookies.get(COOKIE, ""))
        except Unauthenticated:
            session = None
        answer = page(request, "error.html", session, message=body["error"]["message"])
        answer.status_code = status
        answer.headers.update(headers)
        return answer

    app.add_exception_handler(DomainError, on_error)
