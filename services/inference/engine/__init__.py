"""The generation engine: ONNX Runtime session, KV-cache, continuous batching, sampling, streaming."""
