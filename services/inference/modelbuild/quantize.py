"""Weight-only quantization of the projection weights as MatMulNBits (INT8: bits=8, symmetric, per block).

Only MatMuls with a constant weight are touched: the fused q/k/v, o, fused gate/up, down
projections and the untied lm_head. Embeddings, norms, attention and the KV-cache stay float32.
With accuracy_level 4, ONNX Runtime's CPU kernel also rounds each input row to int8 per block at
run time (a scale per row and block, never per tensor), so every row of a batch is still computed
on its own and the model stays batch-invariant; accuracy_level None keeps float activations but
has no fast 8-bit CPU kernel (about 5 tok/s).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import structlog

from services.inference.modelbuild.errors import ModelBuildError
from services.inference.modelbuild.onnx_io import save_onnx

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    block_size: int = 32
    symmetric: bool = True
    # None: float activations (slow for 8 bits on CPU); 4: int8 activations per row and block.
    accuracy_level: int | None = None

    def describe(self) -> dict[str, object]:
        return {"method": "MatMulNBits", **asdict(self)}


def quantize_weights(fp32_path: Path, out_path: Path, config: QuantConfig) -> Path:
    model = onnx.load(str(fp32_path), load_external_data=True)
    path = save_onnx(quantize_model(model, config), out_path)
    log.info("quantize.done", path=str(path), **config.describe())
    return path


def quantize_model(model: onnx.ModelProto, config: QuantConfig, nodes: list[str] | None = None) -> onnx.ModelProto:
    """Every MatMul with a constant weight (or only the named nodes) as MatMulNBits; returns the new model."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as err:  # the quantizer needs onnx-ir, part of the model-build extra
        raise ModelBuildError(f"onnxruntime's MatMulNBits quantizer cannot load ({err}); "
                              "install the model-build extra (onnx-ir)") from err

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=config.bits,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        op_types_to_quantize=("MatMul",),
        # nodes_to_include widens op_types_to_quantize rather than narrowing it: exclude the rest
        nodes_to_exclude=None if nodes is None else [n.name for n in model.graph.node if n.name not in nodes],
    )
    quantizer.process()
    quantized = quantizer.model.model
    constants = {i.name for i in quantized.graph.initializer}
    remaining = [n.name for n in quantized.graph.node if n.op_type == "MatMul" and n.input[1] in constants
                 and (nodes is None or n.name in nodes)]
    if remaining:
        log.warning("quantize.skipped", nodes=remaining)
    return quantized


def weight_nodes(model: onnx.ModelProto, weight_names: set[str]) -> list[str]:
    """Names of the MatMul nodes whose constant weight is one of `weight_names`."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
            and n.input[1] in weight_names]
