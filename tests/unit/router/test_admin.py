"""The operator operations without a transport: each credential or policy change is in the audit log once,
with its actor, and a secret list of blocked terms is logged as a count only."""

from __future__ import annotations

from pathlib import Path

from services.router.admin import Admin
from services.router.auth.api_keys import NewApiKey
from services.router.auth.key_store import KeyStore
from services.router.policy import Policy, PolicyStore
from services.router.ports import ModelInfo
from services.router.registry import CanaryPolicy, ModelEntry, Registry


class OneReplica:
    async def model_info(self, address: str) -> ModelInfo:
        return ModelInfo("tiny", "v1", 2048)


def make_admin(tmp_path: Path) -> Admin:
    return Admin(KeyStore(tmp_path / "keys.db", b"p" * 32), Registry(tmp_path / "registry.db"),
                 PolicyStore(tmp_path / "policies.db"), OneReplica(),  # type: ignore[arg-type]
                 lambda model: {v.version: len(v.replicas) for v in model.versions})


async def test_key_policy_and_model_changes_are_audited_once_with_their_actor(tmp_path: Path) -> None:
    admin = make_admin(tmp_path)
    record, secret = await admin.create_key(NewApiKey(tenant_id="acme", name="ci"), actor="console:alice")
    assert secret and await admin.list_keys("acme", include_revoked=False) == [record]
    await admin.revoke_key(record.key_id)
    await admin.revoke_key(record.key_id)  # twice: recorded once
    assert await admin.list_keys("acme", include_revoked=False) == []
    stored = await admin.set_policy("acme", Policy(blocked_terms=("secret-word",)))
    assert admin.get_policy("acme") == stored
    model: ModelEntry = await admin.register("tiny", "v1", ("127.0.0.1:1",), (), CanaryPolicy())
    assert model.context_window == 2048
    assert admin.healthy_replicas(admin.get_model("tiny")) == {"v1": 1}

    events, _ = await admin.audit_page("", 100, "")
    by_action = {e.action: e for e in events}
    assert [e.action for e in events].count("key.revoke") == 1
    assert by_action["key.create"].actor == "console:alice"
    assert by_action["policy.set"].details["blocked_terms"] == 1
    assert "secret-word" not in str([e.details for e in events])
