"""Policies refuse without echoing the term list; contexts persist and trim by the documented rule;
task templates validate their inputs."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

import pytest

from services.common.errors import InvalidInput, PermissionDenied
from services.router.contexts import ContextStore, fit_to_window
from services.router.policy import Policy, PolicyStore
from services.router.tasks import LengthUnit, OutputFormat, TaskKind, TaskSpec, render_task
from services.router.types import Message, Role


def test_blocked_terms_name_the_policy_not_the_terms(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "p.db")
    store.set("", Policy(name="house-rules", blocked_terms=("Project Zeus",), max_tokens_cap=64))
    policy = PolicyStore(tmp_path / "p.db").for_tenant("acme")  # global applies, persisted
    with pytest.raises(PermissionDenied) as refused:
        policy.check_text("tell me about project zeus", ())
    assert "house-rules" in refused.value.message and "zeus" not in refused.value.message.lower()
    policy.check_text("tell me about apollo", ())
    with pytest.raises(InvalidInput, match="cap"):
        policy.check_max_tokens(65)
    store.set("acme", Policy(name="acme", max_prompt_tokens=10))
    assert store.for_tenant("acme").name == "acme" and store.for_tenant("other").name == "house-rules"
    with pytest.raises(InvalidInput):
        store.for_tenant("acme").check_prompt_tokens(11)


def _m(role: Role, text: str) -> Message:
    return Message(role, text)


async def test_context_turns_persist_and_trim_oldest_exchanges_keeping_system(tmp_path: Path) -> None:
    store = ContextStore(tmp_path / "c.db")
    store.append("acme", "chat", (_m(Role.SYSTEM, "be brief"), _m(Role.USER, "one"), _m(Role.ASSISTANT, "1")))
    store.append("acme", "chat", (_m(Role.USER, "two"), _m(Role.ASSISTANT, "2")))
    history = ContextStore(tmp_path / "c.db").history("acme", "chat")
    assert [m.content for m in history] == ["be brief", "one", "1", "two", "2"]
    assert store.history("other-tenant", "chat") == ()

    async def count(messages: tuple[Message, ...]) -> int:
        return 10 * len(messages)

    new = (_m(Role.USER, "three"),)
    kept, tokens = await fit_to_window(history, new, max_tokens=5, context_window=45, count=count)
    assert [m.content for m in kept] == ["be brief", "two", "2", "three"] and tokens == 40
    with pytest.raises(InvalidInput, match="context window"):
        await fit_to_window(history, new, max_tokens=100, context_window=45, count=count)


def test_task_templates() -> None:
    system, user = render_task(TaskSpec(TaskKind.SUMMARIZE, "Long text.", LengthUnit.WORDS, 20, OutputFormat.BULLETS))
    assert system.role == Role.SYSTEM and "at most 20 words" in user.content and "bulleted" in user.content
    assert "Long text." in user.content
    assert "positive, negative" in render_task(TaskSpec(TaskKind.CLASSIFY, "x", labels=("positive", "negative")))[1].content
    for spec, field in [
        (TaskSpec(TaskKind.TRANSLATE, "x"), "target_language"),
        (TaskSpec(TaskKind.CLASSIFY, "x"), "labels"),
        (TaskSpec(TaskKind.EXTRACT, "x"), "fields"),
        (TaskSpec(TaskKind.REWRITE, "x"), "style"),
        (TaskSpec(TaskKind.UNSPECIFIED, "x"), "kind"),
        (TaskSpec(TaskKind.SUMMARIZE, " "), "content"),
    ]:
        with pytest.raises(InvalidInput) as bad:
            render_task(spec)
        assert bad.value.field == field


def test_ten_thousand_blocked_terms_match_in_one_pass_with_the_same_semantics(tmp_path: Path) -> None:
    rng = random.Random(12)
    terms = tuple("".join(rng.choices(string.ascii_lowercase, k=rng.randint(6, 14))) for _ in range(9_996))
    terms += ("Project ZEUS", "Straße", "日本語", "")  # mixed case, non-ASCII, and an empty term (ignored)
    PolicyStore(tmp_path / "p.db").set("", Policy(name="big", blocked_terms=terms))
    policy = PolicyStore(tmp_path / "p.db").for_tenant("acme")  # reloaded from disk, matcher rebuilt
    clean = "The quick brown fox jumps over the lazy dog. " * 24_000  # ~1 MiB that matches no term
    started = time.perf_counter()
    policy.check_text(clean, (Message(Role.USER, clean),))
    elapsed = time.perf_counter() - started
    # A loop over 10,000 terms takes tens of seconds on this text; one automaton pass takes ~50 ms.
    assert elapsed < 2.0, f"checking 10,000 terms over 2 MiB took {elapsed:.1f} s"
    for prompt, messages in [
        (clean + terms[4321], ()),  # a term at the very end
        ("", (Message(Role.SYSTEM, "x"), Message(Role.USER, terms[0].upper()))),  # case folded, any message
        ("all about project zeus", ()),
        ("STRASSE is not Straße", ()),
        ("日本語のテキスト", ()),
    ]:
        with pytest.raises(PermissionDenied) as refused:
            policy.check_text(prompt, messages)
        assert "big" in refused.value.message and refused.value.reason == "POLICY_BLOCKED"
    # A term split across two messages is not a match (each text is matched on its own), nor is "strasse".
    policy.check_text("", (Message(Role.USER, "project"), Message(Role.USER, "zeus")))
    policy.check_text("strasse", ())


def test_cache_sharing_is_an_explicit_opt_in_per_model(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "p.db")
    assert not store.for_tenant("acme").shares_cache_of("m")  # no policy: isolated
    store.set("acme", Policy(name="acme", shared_cache_models=("m",)))
    reloaded = PolicyStore(tmp_path / "p.db").for_tenant("acme")
    assert reloaded.shares_cache_of("m") and not reloaded.shares_cache_of("other")
    with pytest.raises(InvalidInput) as bad:
        store.set("acme", Policy(shared_cache_models=("",)))
    assert bad.value.field == "policy.shared_cache_models"


def test_a_context_keeps_at_most_its_bounds_dropping_the_oldest_exchanges_first(tmp_path: Path) -> None:
    store = ContextStore(tmp_path / "c.db", max_messages=6, max_bytes=910)
    store.append("acme", "chat", (_m(Role.SYSTEM, "be brief"), _m(Role.USER, "q0"), _m(Role.ASSISTANT, "a0")))
    for i in range(1, 50):
        store.append("acme", "chat", (_m(Role.USER, f"q{i}"), _m(Role.ASSISTANT, f"a{i}")))
    # 6 messages at most: the system message and the newest whole exchanges that fit.
    assert [m.content for m in store.history("acme", "chat")] == ["be brief", "q48", "a48", "q49", "a49"]
    # Bytes: a long exchange pushes older ones out; the newest one is kept even when it alone is over.
    store.append("acme", "chat", (_m(Role.USER, "x" * 600), _m(Role.ASSISTANT, "y" * 300)))
    assert [m.content[:1] for m in store.history("acme", "chat")] == ["b", "x", "y"]
    store.append("acme", "chat", (_m(Role.USER, "z" * 2000), _m(Role.ASSISTANT, "ok")))
    assert [m.content[:1] for m in store.history("acme", "chat")] == ["z", "o"]  # over alone: kept, system gone
    assert store.history("acme", "other") == () and store.history("globex", "chat") == ()


def test_idle_contexts_expire_and_are_purged(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = ContextStore(tmp_path / "c.db", retention_s=3600, clock=lambda: now[0])
    store.append("acme", "old", (_m(Role.USER, "q"), _m(Role.ASSISTANT, "a")))
    now[0] += 3000
    store.append("acme", "recent", (_m(Role.USER, "q"), _m(Role.ASSISTANT, "a")))
    store.append("acme", "old", (_m(Role.USER, "q2"), _m(Role.ASSISTANT, "a2")))  # active again: kept whole
    now[0] += 3000
    assert len(store.history("acme", "old")) == 4 and store.purge() == 0
    now[0] += 1000  # both idle for more than an hour
    assert store.history("acme", "old") == ()  # expired: replays as empty before any purge
    store.append("acme", "old", (_m(Role.USER, "fresh"), _m(Role.ASSISTANT, "start")))
    assert [m.content for m in store.history("acme", "old")] == ["fresh", "start"]
    assert store.purge() == 1 and store.history("acme", "recent") == ()
    assert len(store.history("acme", "old")) == 2
