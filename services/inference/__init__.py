"""The inference service: INT8 ONNX causal LMs with a KV-cache and continuous batching."""
