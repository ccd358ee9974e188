"""The router and the inference engine share one definition of chat messages and sampling parameters:
what the router builds arrives in the engine as equal values, through the real proto conversions."""

from __future__ import annotations

from autoglm.inference.v1 import inference_service_pb2 as inf_pb2
from services.inference import convert as inference_convert
from services.inference.chat_template import ChatTemplate
from services.router.inference_client import messages_to_proto, sampling_to_proto
from services.router.types import Message, Role, Sampling

CONVERSATION = (Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Hi."), Message(Role.ASSISTANT, "Hello."),
                Message(Role.USER, "Name a colour."))
# Values a float32 holds exactly, so the proto's float fields carry them unchanged.
SAMPLING = Sampling(temperature=0.5, top_p=0.75, top_k=40, repetition_penalty=1.25, seed=7, stop=("\n\n", "END"),
                    max_tokens=12)


def test_what_the_router_sends_reaches_the_engine_as_the_same_messages_and_sampling() -> None:
    wire = inf_pb2.GenerateRequest(request_id="r1", messages=messages_to_proto(CONVERSATION),
                                   sampling=sampling_to_proto(SAMPLING))
    received = inference_convert.generation_request(wire)
    assert received.messages == CONVERSATION
    assert received.sampling == SAMPLING
    assert inference_convert.generation_request(
        inf_pb2.GenerateRequest(prompt="x", sampling=sampling_to_proto(Sampling()))).sampling == Sampling()


def test_the_router_s_messages_render_through_the_engine_s_template() -> None:
    rendered = ChatTemplate(None).render(CONVERSATION)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
                        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                        "<|im_start|>assistant\n")
