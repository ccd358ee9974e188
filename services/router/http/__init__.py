"""The router's OpenAI-compatible HTTP API: a second thin transport over the same gateway as gRPC."""
