"""Writes a Llama-family decoder as a compact ONNX graph with a KV-cache.

The graph is built op by op from the weights (no tracing), with ONNX Runtime's fused contrib ops
(GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization), so one decode step is
~12 nodes per layer instead of the ~10k nodes of a traced export.

Interface (RIGHT padding, per-row lengths; GroupQueryAttention semantics):
  inputs   input_ids       int64   [batch, sequence]
           attention_mask  int64   [batch, total_sequence]  row b: ones for its first n_b tokens
                                    (past + new), zeros after; only the count per row matters
           past_key_values.{i}.key / .value  float32 [batch, kv_heads, past_sequence, head_dim]
  outputs  logits          float32 [batch, 1, vocab]    for each row's last real token
           present.{i}.key / .value          float32 [batch, kv_heads, total_sequence, head_dim]

total_sequence = past_sequence + sequence. First prompt (past_sequence = 0): prompts are right-padded
to `sequence`. Later steps: every row brings exactly `sequence` new tokens; row b's new keys are
written at positions [n_b - sequence, n_b) of its present buffer, everything past n_b is unused.
Positions for RoPE come from the per-row lengths, so there is no position_ids input. Each row is
computed with its own lengths, so a row's logits do not depend on the other rows in the batch.

lm_head always has its own initializer (never tied to the embedding), so that the weight-only
quantizer can turn it into MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
PAST_KEY = "past_key_values.{layer}.key"
PAST_VALUE = "past_key_values.{layer}.value"
PRESENT_KEY = "present.{layer}.key"
PRESENT_VALUE = "present.{layer}.value"

ONNX_OPSET = 21
MS_DOMAIN = "com.microsoft"


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
           domain: str = "", prefix: str = "", **attrs: Any) -> list[str]:
        self._count += 1
        base = f"{prefix}/{op_type}_{self._count}" if prefix else f"{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{base}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=base, domain=domain, **attrs))
        return names

    def op1(self, op_type: str, inputs: list[str], domain: str = "", prefix: str = "",
            **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, domain=domain, prefix=prefix, **attrs)[0]


def rotary_caches(dims: LlamaDims) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (dims.rope_theta ** (np.arange(0, dims.head_dim, 2, dtype=np.float64) / dims.head_dim))
    freqs = np.outer(np.arange(dims.max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _sequence_lengths(g: _GraphWriter) -> tuple[str, str]:
    """seqlens_k = real tokens per row - 1 (int32 [batch]); total_sequence_length (int32 scalar)."""
    mask_sum = g.op1("ReduceSum", [ATTENTION_MASK, g.const("c/ax1", np.array([1], dtype=np.int64))],
                     prefix="seqlens", keepdims=0)
    seqlens = g.op1("Sub", [mask_sum, g.const("c/one_i64", np.array(1, dtype=np.int64))], prefix="seqlens")
    seqlens_i32 = g.op1("Cast", [seqlens], prefix="seqlens", to=TensorProto.INT32)
    total = g.op1("Gather", [g.op1("Shape", [ATTENTION_MASK], prefix="seqlens"),
                             g.const("c/one_i64", np.array(1, dtype=np.int64))], prefix="seqlens", axis=0)
    total_i32 = g.op1("Cast", [total], prefix="seqlens", to=TensorProto.INT32)
    return seqlens_i32, total_i32


def _last_token_index(g: _GraphWriter, dims: LlamaDims) -> str:
    """Per row, the chunk index of its last real token: min(seqlens_k, sequence - 1) as [batch, 1, hidden].

    First prompt (no past): rows are right-padded, the last real token is at seqlens_k.
    Later steps: every row brings `sequence` new tokens, the last one is at sequence - 1.
    """
    one = g.const("c/one_i64", np.array(1, dtype=np.int64))
    mask_sum = g.op1("ReduceSum", [ATTENTION_MASK, g.const("c/ax1", np.array([1], dtype=np.int64))],
                     prefix="last_index", keepdims=0)
    seq = g.op1("Gather", [g.op1("Shape", [INPUT_IDS], prefix="last_index"), one], prefix="last_index",
                axis=0)
    index = g.op1("Min", [g.op1("Sub", [mask_sum, one], prefix="last_index"),
                          g.op1("Sub", [seq, one], prefix="last_index")], prefix="last_index")
    index = g.op1("Unsqueeze", [index, g.const("c/ax12", np.array([1, 2], dtype=np.int64))],
                  prefix="last_index")  # [batch, 1, 1]
    batch = g.op1("Gather", [g.op1("Shape", [INPUT_IDS], prefix="last_index"),
                             g.const("c/zero_i64", np.array(0, dtype=np.int64))], prefix="last_index", axis=0)
    target = g.op1("Concat", [g.op1("Unsqueeze", [batch, g.const("c/ax0", np.array([0], dtype=np.int64))],
                                    prefix="last_index"),
                              g.const("c/one_hidden", np.array([1, dims.hidden_size], dtype=np.int64))],
                   prefix="last_index", axis=0)
    return g.op1("Expand", [index, target], prefix="last_index")


def build_llama_graph(dims: LlamaDims, weights: LlamaWeights) -> onnx.ModelProto:
    g = _GraphWriter()
    cos, sin = rotary_caches(dims)
    cos_name, sin_name = g.const("rotary.cos_cache", cos), g.const("rotary.sin_cache", sin)
    embed = g.const("model.embed_tokens.weight", weights.embed_tokens)
    hidden = g.op1("Gather", [embed, INPUT_IDS], prefix="embed", axis=0)
    seqlens, total = _sequence_lengths(g)
    split_mlp = g.const("c/split_mlp", np.array([dims.intermediate_size] * 2, dtype=np.int64))

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
            assert attn_out is not None
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, ln1],
                                          4, domain=MS_DOMAIN, prefix=p, epsilon=dims.rms_norm_eps)
        qkv_w = np.concatenate([lw["q_proj"], lw["k_proj"], lw["v_proj"]], axis=0)
        qkv = g.op1("MatMul", [normed, g.const(f"{p}.qkv_proj.weight", np.ascontiguousarray(qkv_w.T))],
                    prefix=p)
        ctx = g.op("GroupQueryAttention", [
            qkv, "", "", PAST_KEY.format(layer=i), PAST_VALUE.format(layer=i), seqlens, total,
            cos_name, sin_name,
        ], [f"{p}/attn/out", PRESENT_KEY.format(layer=i), PRESENT_VALUE.format(layer=i)],
            domain=MS_DOMAIN, prefix=p, num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads,
            do_rotary=1, rotary_interleaved=0, local_window_size=-1)[0]
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
    last = _last_token_index(g, dims)
    mlp_last = g.op1("GatherElements", [attn_out, last], prefix="final", axis=1)
    res_last = g.op1("GatherElements", [residual, last], prefix="final", axis=1)
    norm_w = g.const("model.norm.weight", weights.final_norm)
    final = g.op("SkipSimplifiedLayerNormalization", [mlp_last, res_last, norm_w], 1,
                 domain=MS_DOMAIN, prefix="final", epsilon=dims.rms_norm_eps)[0]
    lm_head = g.const("lm_head.weight", np.ascontiguousarray(weights.lm_head.T))
    g.op("MatMul", [final, lm_head], [LOGITS], prefix="lm_head")

    kv_dims: list[str | int] = ["batch", dims.num_kv_heads, "past_sequence", dims.head_dim]
    present_dims: list[str | int] = ["batch", dims.num_kv_heads, "total_sequence", dims.head_dim]
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence"]),
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
