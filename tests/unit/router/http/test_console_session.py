"""Console sessions: which token opens which role, what a cookie must be to count, what a change needs."""

from __future__ import annotations

import pytest

from services.common.errors import PermissionDenied, Unauthenticated
from services.router.http.console.session import Role, Sessions

SECRET = b"s" * 32
ADMIN = "admin-token-for-the-console-tests"
READ = "read-token-for-the-console-tests"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_each_token_opens_its_role_and_nothing_else_opens_any() -> None:
    sessions = Sessions(SECRET, ADMIN, READ)
    admin, admin_cookie = sessions.sign_in(ADMIN)
    read, read_cookie = sessions.sign_in(READ)
    assert (admin.role, read.role) == (Role.ADMIN, Role.READ)
    assert sessions.session(admin_cookie) == admin and sessions.session(read_cookie) == read
    for wrong in ("", "nope", ADMIN[:-1], ADMIN + "x"):
        with pytest.raises(Unauthenticated):
            sessions.sign_in(wrong)


def test_without_a_read_token_nobody_signs_in_read_only() -> None:
    sessions = Sessions(SECRET, ADMIN, "")
    with pytest.raises(Unauthenticated):
        sessions.sign_in("")


def test_a_cookie_forged_expired_or_from_a_replaced_token_is_no_session() -> None:
    clock = Clock()
    sessions = Sessions(SECRET, ADMIN, READ, lifetime_s=60, clock=clock)
    _, cookie = sessions.sign_in(READ)
    payload, mac = cookie.split(".")
    admin_payload = sessions.sign_in(ADMIN)[1].split(".")[0]
    for forged in ("", "garbage", f"{admin_payload}.{mac}", f"{payload}.{mac[:-1]}A" if mac[-1] != "A" else
                   f"{payload}.{mac[:-1]}B", payload):
        with pytest.raises(Unauthenticated):
            sessions.session(forged)
    with pytest.raises(Unauthenticated):
        Sessions(SECRET, ADMIN, "another-read-token-entirely", clock=clock).session(cookie)
    with pytest.raises(Unauthenticated):
        Sessions(b"t" * 32, ADMIN, READ, clock=clock).session(cookie)
    clock.now += 61
    with pytest.raises(Unauthenticated, match="expired"):
        sessions.session(cookie)


def test_a_change_needs_the_admin_role_and_the_sessions_csrf_token() -> None:
    sessions = Sessions(SECRET, ADMIN, READ)
    admin, _ = sessions.sign_in(ADMIN)
    read, _ = sessions.sign_in(READ)
    Sessions.check_change(admin, admin.csrf)
    with pytest.raises(PermissionDenied, match="operator-read token may view"):
        Sessions.check_change(read, read.csrf)
    for wrong in ("", read.csrf, admin.csrf[:-1]):
        with pytest.raises(PermissionDenied, match="x-csrf-token"):
            Sessions.check_change(admin, wrong)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        Sessions(b"short", ADMIN)
