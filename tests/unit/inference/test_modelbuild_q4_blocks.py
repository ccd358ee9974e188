"""Q4_1 blocks -> 4-bit MatMulNBits with uint8 zero points plus the per-block correction: the weights
are carried exactly, and ONNX Runtime's kernel computes x @ W^T with them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from services.inference.modelbuild.int4_graph import map_q4_weights
from services.inference.modelbuild.q4_blocks import Q4Blocks, decode_q4_1, nbits_dequantize, to_nbits


def q4_1_bytes(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Encode like ggml: fp16 d, fp16 m, code j in the low nibble of byte j, code j + 16 in the high one."""
    rows, blocks, _ = codes.shape
    out = np.zeros((rows, blocks, 20), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    out[..., 4:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(rows, -1)


def random_blocks(rows: int, cols: int, seed: int = 0) -> Q4Blocks:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (rows, cols // 32, 32), dtype=np.uint8)
    d = (rng.random((rows, cols // 32)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-d * rng.random((rows, cols // 32)) * 15).astype(np.float16).astype(np.float32)
    d[0, 0], m[0, 0] = 2.0**-7, -3 * 2.0**-7  # an integer zero point: no correction needed for this block
    return Q4Blocks(codes, d, m)


def test_decode_reads_ggml_layout() -> None:
    blocks = random_blocks(4, 64)
    decoded = decode_q4_1(q4_1_bytes(blocks.codes, blocks.d, blocks.m), 4, 64)
    np.testing.assert_array_equal(decoded.codes, blocks.codes)
    np.testing.assert_array_equal(decoded.d, blocks.d)
    np.testing.assert_array_equal(decoded.m, blocks.m)


def test_zero_points_and_correction_reproduce_every_block_exactly() -> None:
    blocks = random_blocks(24, 96)
    nbits = to_nbits(blocks)
    np.testing.assert_array_equal(nbits_dequantize(nbits), blocks.dequantize())
    assert nbits.blocks == 24 * 3 and 1 <= nbits.integer_zero_point_blocks < nbits.blocks
    assert nbits.correction is not None and nbits.correction[0, 0] == 0.0


def test_mapped_graph_computes_the_q4_1_weights_with_onnxruntime() -> None:
    k, n = 96, 40
    blocks = random_blocks(n, k, seed=1)
    weight = blocks.dequantize()  # [n, k]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "proj.weight"], ["y"], name="proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "proj.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    stats = map_q4_weights(model, {"proj.weight": blocks}, accuracy_level=0)
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Add"]
    assert stats.describe()["exact"] is True and stats.tensors == 1
    assert "proj.weight" not in {init.name for init in model.graph.initializer}
    x = np.random.default_rng(2).standard_normal((2, 3, k)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight.T, rtol=1e-4, atol=1e-4)
