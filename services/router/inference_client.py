"""gRPC adapter for inference replicas: generation streams, token counts, model info, load reports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import grpc
import structlog
from google.protobuf.message import Message as ProtoMessage

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.common.errors import Unavailable
from services.common.generation import FinishReason
from services.common.peer_errors import inference_error
from services.common.tracing import outgoing_metadata
from services.common.usage import Usage
from services.router.billing_client import RECONNECT_OPTIONS
from services.router.ports import InferenceCall, LoadReport, ModelInfo
from services.router.types import Chunk, Message, Sampling

log = structlog.get_logger(__name__)


def sampling_to_proto(sampling: Sampling) -> generation_pb2.SamplingParams:
    params = generation_pb2.SamplingParams(stop=list(sampling.stop))
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens"):
        value = getattr(sampling, name)
        if value is not None:
            setattr(params, name, value)
    return params


def messages_to_proto(messages: tuple[Message, ...]) -> list[generation_pb2.ChatMessage]:
    return [generation_pb2.ChatMessage(role=int(m.role), content=m.content) for m in messages]  # type: ignore[arg-type]


class GrpcInference:
    """Replicas are named by their mesh address (what the shared registry stores); `dial` maps a name to
    the address this router reaches it through (its own sidecar's outbound listener for that replica)."""

    def __init__(self, timeout_s: float = 600.0, router_id: str = "",
                 dial: Mapping[str, str] | None = None) -> None:
        self._router_id = router_id  # sent with each generation: replicas report it to billing
        self._dial = dict(dial or {})
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb2_grpc.InferenceServiceStub] = {}
        self._timeout_s = timeout_s
        self._closing: set[asyncio.Task[None]] = set()  # finished streams whose status is still on its way

    def stub(self, address: str) -> pb2_grpc.InferenceServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(self._dial.get(address, address),
                                                                          options=RECONNECT_OPTIONS)
            stub = self._stubs[address] = pb2_grpc.InferenceServiceStub(channel)
        return stub

    def channel(self, address: str) -> grpc.aio.Channel:
        self.stub(address)
        return self._channels[address]

    async def generate(
        self, address: str, call: InferenceCall, ready: asyncio.Event | None = None
    ) -> AsyncIterator[Chunk]:
        request = pb2.GenerateRequest(
            request_id=call.request_id, prompt=call.prompt, messages=messages_to_proto(call.messages),
            sampling=sampling_to_proto(call.sampling), traffic_class=int(call.traffic_class),  # type: ignore[arg-type]
            stream_options=generation_pb2.StreamOptions(coalesce_ms=call.coalesce_ms,
                                                        coalesce_tokens=call.coalesce_tokens),
            tenant_id=call.tenant_id, api_key_id=call.api_key_id, model=call.model, model_version=call.model_version,
            tags=call.tags, router_id=self._router_id, trace_id=call.trace_id,
        )
        stream = self.stub(address).Generate(request, metadata=outgoing_metadata(), timeout=self._timeout_s)
        finished = False
        try:
            if ready is not None:
                await ready.wait()  # the request is on its way; its replies wait for the go-ahead
            async for reply in stream:
                usage = None
                if reply.HasField("usage"):
                    usage = Usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)
                finish = FinishReason(reply.finish_reason)
                yield Chunk(delta=reply.delta, tokens=len(reply.token_ids), finish_reason=finish, usage=usage)
                if finish != FinishReason.UNSPECIFIED:
                    # The message with the finish reason is the generation's last: the caller is answered
                    # now, and the call's closing status is collected in the background.
                    finished = True
                    return
        except grpc.aio.AioRpcError as exc:
            raise inference_error(exc, address) from None
        finally:
            if finished and not stream.done():
                self._collect_status(stream, address)
            else:
                stream.cancel()

    def _collect_status(self, stream: grpc.aio.UnaryStreamCall, address: str) -> None:
        async def collect() -> None:
            try:
                code = await stream.code()
            except asyncio.CancelledError:
                stream.cancel()
                raise
            if code != grpc.StatusCode.OK:
                log.warning("inference_stream_closed_badly", replica=address, code=code.name,
                            details=await stream.details())

        task = asyncio.ensure_future(collect())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def count_tokens(self, address: str, prompt: str, messages: tuple[Message, ...]) -> tuple[int, int]:
        reply = await self._unary(address, "CountTokens",
                                  pb2.CountTokensRequest(prompt=prompt, messages=messages_to_proto(messages)))
        return reply.token_count, reply.context_window

    async def model_info(self, address: str) -> ModelInfo:
        reply = await self._unary(address, "GetModelInfo", pb2.GetModelInfoRequest(), timeout=5.0)
        return ModelInfo(reply.name, reply.version, reply.context_window, reply.replica_id)

    async def _unary(self, address: str, method: str, request: ProtoMessage, timeout: float = 10.0) -> ProtoMessage:
        try:
            return await getattr(self.stub(address), method)(request, metadata=outgoing_metadata(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise inference_error(exc, address) from None

    async def watch_load(self, address: str, interval_ms: int) -> AsyncIterator[LoadReport]:
        stream = self.stub(address).WatchLoad(pb2.WatchLoadRequest(interval_ms=interval_ms))
        try:
            async for reply in stream:
                yield LoadReport(reply.replica_id, reply.queue_depth, reply.active_sequences, reply.ready,
                                 queue_capacity=reply.queue_capacity, kv_cache_bytes=reply.kv_cache_bytes,
                                 kv_budget_bytes=reply.kv_budget_bytes, tokens_per_second=reply.tokens_per_second)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"load reports from {address} stopped ({exc.code().name})") from None
        finally:
            stream.cancel()

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
