"""Replace the fp32 graph's projection MatMuls by 4-bit MatMulNBits carrying the GGUF's Q4_1 blocks.

Each MatMul whose constant weight is one of the mapped projections becomes
    y = MatMulNBits(x; codes, d, z)  [+ MatMul(ReduceSum(Reshape(x, [.., blocks, 32])), C^T)]
(see q4_blocks.py for why the correction is there and exact). Projections sharing an input (the
fused q/k/v and gate/up weights are one MatMul each) share one block sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from services.inference.modelbuild.errors import ModelBuildError
from services.inference.modelbuild.llama_graph import MS_DOMAIN
from services.inference.modelbuild.q4_blocks import BLOCK, NBitsWeight, Q4Blocks, nbits_dequantize, to_nbits


@dataclass
class MappingStats:
    tensors: int = 0
    blocks: int = 0
    integer_zero_point_blocks: int = 0
    corrected_tensors: int = 0
    max_abs_error: float = 0.0  # mapped weight vs the float weight of the fp32 graph
    mapped: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "source": "GGUF Q4_1 blocks (w = d*q + m per 32 weights), codes and scales carried over",
            "exact": self.max_abs_error == 0.0,
            "max_abs_weight_error": self.max_abs_error,
            "tensors": self.tensors,
            "blocks": self.blocks,
            "integer_zero_point_blocks": self.integer_zero_point_blocks,
            "corrected_blocks": self.blocks - self.integer_zero_point_blocks,
            "zero_point": "uint8 z = clip(round(-m/d), 0, 15); the remainder m + d*z per block is added "
                          "as blocksum(x) @ C^T (float32), so every block computes d*q + m",
        }


def map_q4_weights(model: onnx.ModelProto, weights: dict[str, Q4Blocks], accuracy_level: int) -> MappingStats:
    """Rewrite `model` in place; `weights` maps an initializer name (the [in, out] fp32 weight) to its blocks."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    stats = MappingStats()
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    block_sums: dict[tuple[str, int], str] = {}
    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight_name not in weights:
            new_nodes.append(node)
            continue
        assert weight_name is not None
        nbits = to_nbits(weights[weight_name])
        _check_against_float(nbits, initializers[weight_name], weight_name, stats)
        base = weight_name.removesuffix(".weight")
        new_inits += [numpy_helper.from_array(nbits.packed, f"{base}.q4"),
                      numpy_helper.from_array(nbits.scales, f"{base}.q4_scales"),
                      numpy_helper.from_array(nbits.zero_points, f"{base}.q4_zero_points")]
        x, y = node.input[0], node.output[0]
        main_out = y if nbits.correction is None else f"{node.name}/q4_main"
        new_nodes.append(helper.make_node(
            "MatMulNBits", [x, f"{base}.q4", f"{base}.q4_scales", f"{base}.q4_zero_points"], [main_out],
            name=f"{node.name}/q4", domain=MS_DOMAIN, K=nbits.k, N=nbits.n, bits=4, block_size=BLOCK,
            accuracy_level=accuracy_level))
        if nbits.correction is not None:
            key = (x, nbits.k)
            if key not in block_sums:
                shape = f"{base}.q4_block_shape"
                new_inits.append(numpy_helper.from_array(np.array([0, 0, nbits.k // BLOCK, BLOCK], np.int64), shape))
                axes = f"{base}.q4_block_axis"
                new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                blocked = f"{node.name}/q4_blocked"
                block_sums[key] = f"{node.name}/q4_block_sum"
                new_nodes += [helper.make_node("Reshape", [x, shape], [blocked], name=blocked),
                              helper.make_node("ReduceSum", [blocked, axes], [block_sums[key]],
                                               name=block_sums[key], keepdims=0)]
            new_inits.append(numpy_helper.from_array(nbits.correction, f"{base}.q4_correction"))
            correction = f"{node.name}/q4_correction"
            new_nodes += [helper.make_node("MatMul", [block_sums[key], f"{base}.q4_correction"], [correction],
                                           name=correction),
                          helper.make_node("Add", [main_out, correction], [y], name=f"{node.name}/q4_add")]
            stats.corrected_tensors += 1
        stats.tensors += 1
        stats.blocks += nbits.blocks
        stats.integer_zero_point_blocks += nbits.integer_zero_point_blocks
        stats.mapped.append(weight_name)
    missing = sorted(set(weights) - set(stats.mapped))
    if missing:
        raise ModelBuildError(f"INT4 mapping: no MatMul uses {', '.join(missing[:3])}")
    kept = [init for init in graph.initializer if init.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return stats


def _check_against_float(nbits: NBitsWeight, init: onnx.TensorProto, name: str, stats: MappingStats) -> None:
    """The blocks must be the weights the fp32 graph holds (transformers dequantizes the same GGUF)."""
    expected = numpy_helper.to_array(init).T  # the graph stores [in, out]
    if expected.shape != (nbits.n, nbits.k):
        raise ModelBuildError(f"INT4 mapping: {name} is {expected.shape} in the graph, "
                              f"{(nbits.n, nbits.k)} in the GGUF")
    error = float(np.abs(nbits_dequantize(nbits) - expected).max())
    if error > 1e-3 * float(np.abs(expected).max()):
        raise ModelBuildError(f"INT4 mapping: {name} differs from the checkpoint's weights by {error:g}")
    stats.max_abs_error = max(stats.max_abs_error, error)
