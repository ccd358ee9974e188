"""Who is a billing operator: the operator token (constant-time), or a forwarded mesh identity that billing
was told to trust and lists; anything else is UNAUTHENTICATED / PERMISSION_DENIED with an actionable message."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.billing.config import BillingConfig
from services.billing.operators import OperatorAuth, forwarded_uri, load_or_create_token
from services.common.errors import PermissionDenied, Unauthenticated

TOKEN = "a-billing-operator-token"
OPS = "spiffe://autoglm.local/ns/default/sa/operator"
ROUTER = "spiffe://autoglm.local/ns/default/sa/router"


def test_the_token_makes_an_operator_and_nothing_else_does() -> None:
    auth = OperatorAuth(TOKEN)
    assert auth.operator({"authorization": f"Bearer {TOKEN}"}).actor == "operator-token"
    assert auth.operator({"authorization": f"bearer   {TOKEN} "}).actor == "operator-token"
    with pytest.raises(Unauthenticated, match="need a billing operator: send 'authorization: Bearer <token>'"):
        auth.operator({})
    for wrong in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN):
        with pytest.raises(Unauthenticated, match="operator token is not valid"):
            auth.operator({"authorization": wrong})
    # Not trusted: a forwarded identity header is ignored, whatever it says.
    with pytest.raises(Unauthenticated):
        OperatorAuth(TOKEN, frozenset({OPS})).operator({"x-forwarded-client-cert": f"URI={OPS}"})


def test_a_trusted_forwarded_identity_is_an_operator_only_when_listed() -> None:
    auth = OperatorAuth(TOKEN, frozenset({OPS}), trust_forwarded=True)
    header = f"By=spiffe://autoglm.local/ns/default/sa/billing;Hash=ab12;URI={OPS}"
    assert auth.operator({"x-forwarded-client-cert": header}).actor == OPS
    with pytest.raises(PermissionDenied, match="not a billing operator") as denied:
        auth.operator({"x-forwarded-client-cert": f"URI={ROUTER}"})
    assert "spiffe" not in denied.value.message  # no mesh identity in what the caller sees
    # An element a caller appended before the sidecar's own (the last) does not count.
    with pytest.raises(PermissionDenied):
        auth.operator({"x-forwarded-client-cert": f"URI={OPS},By=x;URI={ROUTER}"})


def test_forwarded_uri_reads_the_last_element() -> None:
    assert forwarded_uri(f'By=a;URI="{OPS}"') == OPS
    assert forwarded_uri(f"URI=spiffe://x,By=b;Hash=c;URI={ROUTER}") == ROUTER
    assert forwarded_uri("By=a;Hash=b") == ""


def test_token_file_is_private_from_creation_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "data" / "billing_operator_token"
    first = load_or_create_token(path)
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == first
    with pytest.raises(ValueError):
        OperatorAuth("")


def test_the_token_comes_from_the_setting_the_token_file_or_the_data_dir(tmp_path: Path) -> None:
    assert BillingConfig(operator_token="x" * 20, data_dir=tmp_path).operator_token_value() == "x" * 20
    (tmp_path / "secret").write_text("from-a-mounted-secret\n")
    shared = BillingConfig(operator_token_file=str(tmp_path / "secret"), data_dir=tmp_path / "d")
    assert shared.operator_token_value() == "from-a-mounted-secret"
    assert not (tmp_path / "d" / "billing_operator_token").exists()
    made = BillingConfig(data_dir=tmp_path / "d").operator_token_value()
    assert (tmp_path / "d" / "billing_operator_token").read_text().strip() == made
    (tmp_path / "short").write_text("short")
    with pytest.raises(ValueError, match="at least 16"):
        BillingConfig(operator_token_file=str(tmp_path / "short")).operator_token_value()
    with pytest.raises(ValueError, match="at least 16"):
        BillingConfig(operator_token="short")
