"""The router deletes what it keeps once past its retention: finished batch jobs and idle
conversations go on the periodic purge, without a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import MODEL, start_mesh
from tests.integration.router.test_router_batch import finished, items, job_until
from tests.integration.router.test_router_vertical import bearer
from tests.waiting import wait_until

WAIT_S = 60.0


def stored_turns(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0])


async def test_finished_jobs_and_idle_contexts_are_purged_after_their_retention(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, job_retention_s=0.5, context_retention_s=0.5,
                            retention_purge_interval_s=0.1, batch_poll_s=0.05)
    try:
        secret, _ = await mesh.create_key("acme")
        stub = mesh.router_stub
        job = (await stub.SubmitBatch(pb2.SubmitBatchRequest(model=MODEL, items=items(1)), metadata=bearer(secret),
                                      timeout=10)).job
        assert (await job_until(stub, secret, job.job_id, finished, "finished")).state == pb2.JOB_STATE_SUCCEEDED
        turn = pb2.CompleteRequest(model=MODEL, prompt="My name is Ada.", context_id="chat",
                                   sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=2))
        await stub.Complete(turn, metadata=bearer(secret), timeout=60)
        contexts_db = tmp_path / "router" / "contexts.db"


        async def job_purged() -> bool:
            try:
                await stub.GetJob(pb2.GetJobRequest(job_id=job.job_id), metadata=bearer(secret), timeout=10)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False

        await wait_until(job_purged, WAIT_S, "the finished job to be purged", interval=0.1)
        await wait_until(lambda: stored_turns(contexts_db) == 0, WAIT_S, "the idle context to be purged",
                         interval=0.1)
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
