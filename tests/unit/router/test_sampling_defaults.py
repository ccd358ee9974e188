"""A model version's default sampling: filled into the fields a request leaves unset, never into an
explicit greedy request, checked at registration, and kept by the registry across restarts and
re-registrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import InvalidInput
from services.common.generation import Sampling
from services.router.registry import Registry
from services.router.sampling_defaults import apply_defaults, check_defaults

CARD = Sampling(temperature=0.2, top_p=0.9, repetition_penalty=1.1)


def test_unset_fields_take_the_versions_defaults_and_set_ones_are_kept() -> None:
    assert apply_defaults(Sampling(max_tokens=8), CARD) == Sampling(temperature=0.2, top_p=0.9,
                                                                    repetition_penalty=1.1, max_tokens=8)
    assert apply_defaults(Sampling(temperature=0.7, seed=3), CARD) == Sampling(
        temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=3)
    assert apply_defaults(Sampling(top_p=0.5, repetition_penalty=1.0), CARD) == Sampling(
        temperature=0.2, top_p=0.5, repetition_penalty=1.0)
    assert apply_defaults(Sampling(), Sampling()) == Sampling()


def test_an_explicit_temperature_0_stays_plain_greedy() -> None:
    greedy = Sampling(temperature=0.0, max_tokens=4)
    assert apply_defaults(greedy, CARD) == greedy
    assert apply_defaults(greedy, CARD).deterministic


@pytest.mark.parametrize(("defaults", "field"), [
    (Sampling(temperature=2.5), "default_sampling.temperature"),
    (Sampling(temperature=-1.0), "default_sampling.temperature"),
    (Sampling(top_p=0.0), "default_sampling.top_p"),
    (Sampling(top_k=-1), "default_sampling.top_k"),
    (Sampling(repetition_penalty=0.9), "default_sampling.repetition_penalty"),
    (Sampling(seed=1), "default_sampling.seed"),
    (Sampling(max_tokens=10), "default_sampling.max_tokens"),
    (Sampling(stop=("\n",)), "default_sampling.stop"),
])
def test_defaults_out_of_range_or_per_request_are_refused_naming_the_field(defaults: Sampling, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_defaults(defaults)
    assert caught.value.field == field


def test_the_registry_keeps_a_versions_defaults(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.register("m", "v1", ("127.0.0.1:1",), default_sampling=CARD)
    registry.register("m", "v2", ("127.0.0.1:2",))
    # Registered again (new replicas, as the router's bootstrap does at every start): the defaults stay.
    registry.register("m", "v1", ("127.0.0.1:3",))
    reopened = Registry(tmp_path / "r.db")
    assert reopened.get("m").version("v1").default_sampling == CARD
    assert reopened.get("m").version("v1").replicas == ("127.0.0.1:3",)
    assert reopened.get("m").version("v2").default_sampling == Sampling()
    registry.register("m", "v2", ("127.0.0.1:2",), default_sampling=Sampling(temperature=0.5))
    assert Registry(tmp_path / "r.db").get("m").version("v2").default_sampling == Sampling(temperature=0.5)
    assert registry.audit_events("model.register")[0].details["default_sampling"] == {"temperature": 0.5}
    with pytest.raises(InvalidInput, match="top_p"):
        registry.register("m", "v3", ("127.0.0.1:4",), default_sampling=Sampling(top_p=1.5))
    assert [v.version for v in registry.get("m").versions] == ["v1", "v2"]
