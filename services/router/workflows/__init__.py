"""Durable workflows: DAGs of LLM tasks (RunTask kinds or free generations) submitted to the router.

Built on the router's own store (services/router/store: SQLite by default, PostgreSQL shared by routers)
and the standard library's `graphlib.TopologicalSorter`, not on a durable-execution library. DBOS Transact
checkpoints decorated Python functions in its own system database and schema, needs one global DBOS
instance launched per process with its own executor and queues, and replays a workflow by re-running its
function code, which would put a second scheduler and a second database beside the router's asyncio loop,
its store (and its migrations and backends) and the gateway path that bills each request exactly once by
its event id; Procrastinate is a PostgreSQL-only job queue (no SQLite, no DAGs, its own worker process
model). A workflow here is rows: `model.py` the plain data, `validate.py` the submit-time checks
(duplicate ids, unknown references, cycles named by `CycleError`, size), `template.py` the
`{{nodes.<id>.output}}` references, `store.py` the tables (each node's state and output committed before
its dependants start), `runner.py` the scheduler (earliest deadline first within a traffic class, a cap per
workflow and per router, retries, cancellation) that runs each node through the gateway under the request
id `<workflow>.<node>.<attempt>`, so a node re-run after a crash is still one usage event, and
`mermaid.py` the picture.
"""
