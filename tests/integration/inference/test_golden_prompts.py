"""The golden prompts (tests/data/golden.json, recorded by services/inference/modelbuild/record_golden.py)
are exactly the prompts serving builds from the same chat: the build and the engine render through one
chat template with the model's special tokens."""

from __future__ import annotations

import json
from pathlib import Path

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from services.common.generation import ChatMessage, Role
from services.inference.chat_template import ChatTemplate
from services.inference.modelbuild.record_golden import PROMPTS, chat_ids

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "data" / "golden.json").read_text(encoding="utf-8"))


async def test_golden_prompts_are_the_prompts_serving_renders(inference, model) -> None:
    stub = await inference()
    recorder = ChatTemplate.for_model(model.manifest, model.tokenizer)
    assert [case["user"] for case in GOLDEN["prompts"]] == PROMPTS
    for case in GOLDEN["prompts"]:
        served = model.encode(model.template.render((ChatMessage(Role.USER, case["user"]),)))
        assert served == case["prompt_ids"], case["user"]
        assert chat_ids(recorder, model.tokenizer, case["user"]) == case["prompt_ids"], case["user"]
        counted = await stub.CountTokens(pb2.CountTokensRequest(messages=[generation_pb2.ChatMessage(
            role=generation_pb2.CHAT_ROLE_USER, content=case["user"])]), timeout=10)
        assert counted.token_count == len(case["prompt_ids"]), case["user"]
