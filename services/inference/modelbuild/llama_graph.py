"""Writes a Llama-family decoder as a compact ONNX graph with a KV-cache.

The graph is built op by op from the weights (no tracing), using ONNX Runtime's fused
contrib ops (SkipSimplifiedLayerNormalization, RotaryEmbedding) so that one decode step is a
few hundred nodes instead of the ~10k a traced export produces.

Interface (left padding, Hugging Face convention):
  inputs   input_ids       int64   [batch, sequence]
           attention_mask  int64   [batch, past_sequence + sequence]   1 = real token, 0 = pad
           position_ids    int64   [batch, sequence]
           past_key_values.{i}.key / .value  float32 [batch, kv_heads, past_sequence, head_dim]
  outputs  logits          float32 [batch, 1, vocab]   (last input position only)
           present.{i}.key / .value          float32 [batch, kv_heads, past_sequence + sequence, head_dim]

lm_head always has its own initializer (never tied to the embedding), so that the weight-only
quantizer can turn it into MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.{layer}.key"
PAST_VALUE = "past_key_values.{layer}.value"
PRESENT_KEY = "present.{layer}.key"
PRESENT_VALUE = "present.{layer}.value"

ONNX_OPSET = 21
MS_DOMAIN = "com.microsoft"
MASK_VALUE = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class LlamaDims:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    rope_theta: float
    rms_norm_eps: float

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class LlamaWeights:
    """Weights in Hugging Face naming, as float32 numpy arrays ([out, in] for linear layers)."""

    embed_tokens: np.ndarray
    final_norm: np.ndarray
    lm_head: np.ndarray
    layers: list[dict[str, np.ndarray]] = field(default_factory=list)


class _GraphWriter:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._constants: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self._constants:
            self._constants.add(name)
            self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1,
           domain: str = "", prefix: str = "", **attrs: object) -> list[str]:
        self._count += 1
        base = f"{prefix}/{op_type}_{self._count}" if prefix else f"{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{base}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=base, domain=domain, **attrs))
        return names

    def op1(self, op_type: str, inputs: list[str], domain: str = "", prefix: str = "",
            **attrs: object) -> str:
        return self.op(op_type, inputs, 1, domain=domain, prefix=prefix, **attrs)[0]


def rotary_caches(dims: LlamaDims) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (dims.rope_theta ** (np.arange(0, dims.head_dim, 2, dtype=np.float64) / dims.head_dim))
    freqs = np.outer(np.arange(dims.max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _attention_bias(g: _GraphWriter, dims: LlamaDims) -> str:
    """Additive mask [batch, 1, group*sequence, total]: causal (offset by the past) and padding."""
    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    zero, one = g.const("c/i0", i64(0)), g.const("c/i1", i64(1))
    seq = g.op1("Gather", [g.op1("Shape", [INPUT_IDS]), one], axis=0)
    total = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK]), one], axis=0)
    past = g.op1("Sub", [total, seq])
    key_pos = g.op1("Unsqueeze", [g.op1("Range", [zero, total, one]), g.const("c/ax0", i64([0]))])
    query_pos = g.op1("Unsqueeze", [g.op1("Range", [past, total, one]), g.const("c/ax1", i64([1]))])
    causal = g.op1("LessOrEqual", [key_pos, query_pos])  # [seq, total]
    padding = g.op1("Unsqueeze", [g.op1("Cast", [ATTENTION_MASK], to=TensorProto.BOOL),
                                  g.const("c/ax12", i64([1, 2]))])  # [batch, 1, 1, total]
    allowed = g.op1("And", [causal, padding])  # [batch, 1, seq, total]
    bias = g.op1("Where", [allowed, g.const("c/f0", np.array(0.0, np.float32)),
                           g.const("c/fmin", np.array(MASK_VALUE, np.float32))], prefix="attn_bias")
    return g.op1("Tile", [bias, g.const("c/tile_groups", i64([1, 1, dims.group_size, 1]))],
                 prefix="attn_bias")


def _attention(g: _GraphWriter, dims: LlamaDims, layer: int, q: str, k: str, v: str,
               bias: str) -> str:
    """Grouped-query attention with plain ops; query heads are grouped under their kv head."""
    p = f"layers.{layer}.attn"
    kvh, grp, hd = dims.num_kv_heads, dims.group_size, dims.head_dim
    shape = lambda name, v: g.const(f"c/{name}", np.array(v, dtype=np.int64))  # noqa: E731
    q5 = g.op1("Reshape", [q, shape("q5", [0, 0, kvh, grp, hd])], prefix=p)
    q5 = g.op1("Transpose", [q5], prefix=p, perm=[0, 2, 3, 1, 4])  # [b, kvh, grp, seq, hd]
    q4 = g.op1("Reshape", [q5, shape("q4", [0, 0, -1, hd])], prefix=p)  # [b, kvh, grp*seq, hd]
    kv_shape = shape("kv4", [0, 0, kvh, hd])
    k4 = g.op1("Transpose", [g.op1("Reshape", [k, kv_shape], prefix=p)], prefix=p, perm=[0, 2, 1, 3])
    v4 = g.op1("Transpose", [g.op1("Reshape", [v, kv_shape], prefix=p)], prefix=p, perm=[0, 2, 1, 3])
    present_k, present_v = PRESENT_KEY.format(layer=layer), PRESENT_VALUE.format(layer=layer)
    g.op("Concat", [PAST_KEY.format(layer=layer), k4], [present_k], prefix=p, axis=2)
    g.op("Concat", [PAST_VALUE.format(layer=layer), v4], [present_v], prefix=p, axis=2)
    k_t = g.op1("Transpose", [present_k], prefix=p, perm=[0, 1, 3, 2])
    scores = g.op1("Add", [g.op1("MatMul", [q4, k_t], prefix=p), bias], prefix=p)
    probs = g.op1("Softmax", [scores], prefix=p, axis=-1)
    ctx = g.op1("MatMul", [probs, present_v], prefix=p)  # [b, kvh, grp*seq, hd]
    ctx = g.op1("Reshape", [ctx, shape("ctx5", [0, 0, grp, -1, hd])], prefix=p)
    ctx = g.op1("Transpose", [ctx], prefix=p, perm=[0, 3, 1, 2, 4])  # [b, seq, kvh, grp, hd]
    return g.op1("Reshape", [ctx, shape("ctx3", [0, 0, dims.num_heads * hd])], prefix=p)


def build_llama_graph(dims: LlamaDims, weights: LlamaWeights) -> onnx.ModelProto:
    g = _GraphWriter()
    cos, sin = rotary_caches(dims)
    cos_name, sin_name = g.const("rotary.cos_cache", cos), g.const("rotary.sin_cache", sin)
    embed = g.const("model.embed_tokens.weight", weights.embed_tokens)
    hidden = g.op1("Gather", [embed, INPUT_IDS], prefix="embed", axis=0)
    bias = _attention_bias(g, dims)
    q_size, kv_size = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    split_qkv = g.const("c/split_qkv", np.array([q_size, kv_size, kv_size], dtype=np.int64))
    split_mlp = g.const("c/split_mlp", np.array([dims.intermediate_size] * 2, dtype=np.int64))
    # 1/sqrt(head_dim) folded into q_proj (exact for power-of-two head dims, linear through RoPE).
    q_scale = np.float32(1.0 / np.sqrt(dims.head_dim))

    residual: str | None = None
    attn_out: str | None = None
    for i, lw in enumerate(weights.layers):
        p = f"layers.{i}"
        ln1 = g.const(f"{p}.input_layernorm.weight", lw["input_layernorm"])
        if residual is None:
            normed = g.op1("SimplifiedLayerNormalization", [hidden, ln1], prefix=p, axis=-1,
                           epsilon=dims.rms_norm_eps, stash_type=1)
            residual = hidden
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, ln1],
                                          4, domain=MS_DOMAIN, prefix=p, epsilon=dims.rms_norm_eps)
        qkv_w = np.concatenate([lw["q_proj"] * q_scale, lw["k_proj"], lw["v_proj"]], axis=0)
        qkv = g.op1("MatMul", [normed, g.const(f"{p}.qkv_proj.weight", np.ascontiguousarray(qkv_w.T))],
                    prefix=p)
        q, k, v = g.op("Split", [qkv, split_qkv], 3, prefix=p, axis=-1)
        q = g.op1("RotaryEmbedding", [q, POSITION_IDS, cos_name, sin_name], domain=MS_DOMAIN, prefix=p,
                  interleaved=0, num_heads=dims.num_heads)
        k = g.op1("RotaryEmbedding", [k, POSITION_IDS, cos_name, sin_name], domain=MS_DOMAIN, prefix=p,
                  interleaved=0, num_heads=dims.num_kv_heads)
        ctx = _attention(g, dims, i, q, k, v, bias)
        o = g.op1("MatMul", [ctx, g.const(f"{p}.o_proj.weight", np.ascontiguousarray(lw["o_proj"].T))],
                  prefix=p)
        ln2 = g.const(f"{p}.post_attention_layernorm.weight", lw["post_attention_layernorm"])
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, ln2], 4,
                                      domain=MS_DOMAIN, prefix=p, epsilon=dims.rms_norm_eps)
        gate_up_w = np.concatenate([lw["gate_proj"], lw["up_proj"]], axis=0)
        gate_up = g.op1("MatMul", [normed, g.const(f"{p}.gate_up_proj.weight",
                                                   np.ascontiguousarray(gate_up_w.T))], prefix=p)
        gate, up = g.op("Split", [gate_up, split_mlp], 2, prefix=p, axis=-1)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate], prefix=p)], prefix=p), up],
                    prefix=p)
        attn_out = g.op1("MatMul", [act, g.const(f"{p}.down_proj.weight",
                                                 np.ascontiguousarray(lw["down_proj"].T))], prefix=p)

    assert residual is not None and attn_out is not None
    # Only the last position goes through the final norm and lm_head.
    last = g.const("c/last", np.array([-1], dtype=np.int64))
    end = g.const("c/end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    axis1 = g.const("c/axis1", np.array([1], dtype=np.int64))
    mlp_last = g.op1("Slice", [attn_out, last, end, axis1], prefix="final")
    res_last = g.op1("Slice", [residual, last, end, axis1], prefix="final")
    norm_w = g.const("model.norm.weight", weights.final_norm)
    final = g.op("SkipSimplifiedLayerNormalization", [mlp_last, res_last, norm_w], 1,
                 domain=MS_DOMAIN, prefix="final", epsilon=dims.rms_norm_eps)[0]
    lm_head = g.const("lm_head.weight", np.ascontiguousarray(weights.lm_head.T))
    g.op("MatMul", [final, lm_head], [LOGITS], prefix="lm_head")

    kv_dims = ["batch", dims.num_kv_heads, "past_sequence", dims.head_dim]
    present_dims = ["batch", dims.num_kv_heads, "total_sequence", dims.head_dim]
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", 1, dims.vocab_size])]
    for i in range(dims.num_layers):
        for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
            inputs.append(helper.make_tensor_value_info(past.format(layer=i), TensorProto.FLOAT, kv_dims))
            outputs.append(helper.make_tensor_value_info(present.format(layer=i), TensorProto.FLOAT,
                                                         present_dims))
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, producer_name="autoglm-modelbuild", opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    return model


def kv_input_names(num_layers: int) -> list[str]:
    return [n.format(layer=i) for i in range(num_layers) for n in (PAST_KEY, PAST_VALUE)]


def kv_output_names(num_layers: int) -> list[str]:
    return [n.format(layer=i) for i in range(num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]
