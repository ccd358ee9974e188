"""Console forms refuse what `autoglm` refuses, with its message, and build what it would send."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidInput
from services.common.generation import TrafficClass
from services.router.http.console import forms


def test_a_key_form_reads_as_keys_create() -> None:
    spec = forms.new_key({"tenant": "acme", "name": "ci", "models": "a, b", "rpm": "60", "tpm": "", "traffic_class":
                          "batch"})
    assert (spec.tenant_id, spec.name, spec.allowed_models) == ("acme", "ci", ("a", "b"))
    assert (spec.requests_per_minute, spec.tokens_per_minute, spec.traffic_class) == (60, 0, TrafficClass.BATCH)


@pytest.mark.parametrize(("form", "message"), [
    ({}, "the following arguments are required: --tenant"),
    ({"tenant": "acme", "rpm": "lots"}, "argument --rpm: invalid int value: 'lots'"),
    ({"tenant": "acme", "traffic_class": "gold"}, "argument --traffic-class: invalid choice: 'gold'"),
    ({"tenant": ["acme"]}, "tenant must be text"),
])
def test_a_bad_key_form_gets_the_cli_message(form: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        forms.new_key(form)


def test_a_budget_form_reads_as_budget_set() -> None:
    fields = forms.budget({"tenant": "acme", "amount": "2.5", "period": "rolling7d", "soft": True}, "b1")
    assert fields == {"tenant": "acme", "key": "", "tag": "", "amount": 2_500_000, "tokens": None,
                      "period": "rolling7d", "tz": "UTC", "soft": True, "webhook": "", "budget_id": "b1",
                      "currency": "USD"}


@pytest.mark.parametrize(("form", "message"), [
    ({"tenant": "acme", "amount": "abc"}, "argument --amount: 'abc' is not an amount like 2.5"),
    ({"tenant": "acme", "amount": "-5"}, "argument --amount: '-5': amounts are >= 0 with at most 6 decimals"),
    ({"tenant": "acme", "amount": "0.0000001"}, "at most 6 decimals"),
    ({"tenant": "acme", "tokens": "1.5"}, "argument --tokens: invalid int value: '1.5'"),
])
def test_a_bad_budget_form_gets_the_cli_message(form: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(".", r"\.")):
        forms.budget(form)


def test_a_split_form_needs_whole_per_mille_weights() -> None:
    assert forms.split({"weights": {"v1": "900", "v2": 100}}) == {"v1": 900, "v2": 100}
    with pytest.raises(InvalidInput, match="whole number of per-mille"):
        forms.split({"weights": {"v1": "9x"}})
    with pytest.raises(InvalidInput, match="weights must map"):
        forms.split({"weights": []})
