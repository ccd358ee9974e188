"""Asynchronous batch jobs: durable storage, the public operations, and the background runner."""
