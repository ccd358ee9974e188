"""A user with grpcurl creates a key through AdminService and streams tokens from Generate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from services.inference.engine.model import LoadedModel
from tests.conftest import tool
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, loaded_model, start_mesh

__all__ = ["loaded_model"]


async def grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        tool("grpcurl"), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_creates_a_key_and_streams_generate(serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model)
    try:
        address = mesh.router.address
        created = json.loads(await grpcurl(
            "-plaintext", "-H", f"authorization: Bearer {ADMIN_TOKEN}", "-d", '{"tenant_id": "acme"}',
            address, "autoglm.router.v1.AdminService/CreateApiKey"))
        secret = created["secret"]
        body = json.dumps({"model": MODEL, "prompt": "Name a fruit.",
                           "sampling": {"temperature": 0, "max_tokens": 5}})
        out = await grpcurl("-plaintext", "-H", f"authorization: Bearer {secret}", "-d", body,
                            address, "autoglm.router.v1.RouterService/Generate")
        messages = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
        assert len(messages) >= 2 and "".join(m.get("delta", "") for m in messages)
        summary = messages[-1]["summary"]
        assert summary["usage"]["completionTokens"] == sum(m.get("deltaTokens", 0) for m in messages[:-1])
        assert int(summary["cost"]["micros"]) > 0
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
