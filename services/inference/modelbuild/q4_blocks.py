"""The GGUF's Q4_1 blocks, read as they are stored and carried into 4-bit MatMulNBits.

Q4_1 keeps, per block of 32 weights along the input dimension, a scale d and a minimum m (fp16)
and 32 4-bit codes q: w = d*q + m. MatMulNBits computes w = scale*(q - zero_point) with a uint8
zero point per block, so the codes and scales carry over as they are and zero_point = -m/d; that
is exact only where -m/d is an integer in 0..15. A float zero point would be exact everywhere, and
the contrib op accepts one, but ONNX Runtime's CPU kernel then dequantizes the whole weight on
every call (a 576x1536 MatMul at batch 1 took 3.1 ms instead of 36 us). So each block takes the
nearest integer zero point z = clip(round(-m/d), 0, 15), and what that leaves over per block,
c = m + d*z (|c| <= d/2 where z is not clipped), is added back exactly: the input's sum over each
block times c, a float MatMul 32 times smaller than the weight:

    x @ W^T = MatMulNBits(x; q, d, z) + blocksum(x) @ C^T      (C: [out, blocks])

A tensor whose blocks all have integer zero points gets no correction. The manifest records how
many blocks needed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.inference.modelbuild.errors import ModelBuildError
from services.inference.modelbuild.llama_graph import LlamaDims

BLOCK = 32
Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of codes
# GGUF tensor name (per layer) -> Hugging Face projection name
GGUF_PROJECTIONS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


@dataclass(frozen=True)
class Q4Blocks:
    """One [out, in] weight as Q4_1 blocks along `in`: codes [out, blocks, 32], d and m [out, blocks]."""

    codes: np.ndarray  # uint8, 0..15
    d: np.ndarray  # float32
    m: np.ndarray  # float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * BLOCK

    def dequantize(self) -> np.ndarray:
        w = self.d[..., None] * self.codes.astype(np.float32) + self.m[..., None]
        return w.reshape(self.shape)

    def take_rows(self, order: np.ndarray) -> Q4Blocks:
        return Q4Blocks(self.codes[order], self.d[order], self.m[order])

    @staticmethod
    def concat(parts: list[Q4Blocks]) -> Q4Blocks:
        return Q4Blocks(np.concatenate([p.codes for p in parts]), np.concatenate([p.d for p in parts]),
                        np.concatenate([p.m for p in parts]))


@dataclass(frozen=True)
class NBitsWeight:
    """MatMulNBits inputs for one weight, plus the exact per-block correction (None when not needed)."""

    n: int
    k: int
    packed: np.ndarray  # uint8 [n, blocks, 16]: code 2i in the low nibble of byte i
    scales: np.ndarray  # float32 [n * blocks]
    zero_points: np.ndarray  # uint8 [n * ceil(blocks / 2)]: block 2j in the low nibble
    correction: np.ndarray | None  # float32 [blocks, n] = C^T
    blocks: int
    integer_zero_point_blocks: int


def decode_q4_1(raw: np.ndarray, rows: int, cols: int) -> Q4Blocks:
    """Raw GGUF bytes of a Q4_1 tensor ([rows, cols / 32 * 20] uint8) as codes, d and m."""
    if cols % BLOCK:
        raise ModelBuildError(f"Q4_1 tensor with {cols} columns is not a whole number of blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    # ggml order: code j in the low nibble of byte j, code j + 16 in its high nibble
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return Q4Blocks(codes, d, m)


def _reverse_rope_permutation(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (as transformers does when loading a GGUF)."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(2, 1).reshape(rows)


def read_projections(path: Path, dims: LlamaDims) -> tuple[list[dict[str, Q4Blocks]], list[str]]:
    """Per layer, the Q4_1 projections in Hugging Face naming and row order; and the GGUF tensors
    (projections) that are not Q4_1 and so must be quantized from float."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    layers: list[dict[str, Q4Blocks]] = []
    other: list[str] = []
    for i in range(dims.num_layers):
        layer: dict[str, Q4Blocks] = {}
        for gguf_name, hf_name in GGUF_PROJECTIONS.items():
            name = f"blk.{i}.{gguf_name}.weight"
            tensor = by_name.get(name)
            if tensor is None or tensor.tensor_type != GGMLQuantizationType.Q4_1:
                other.append(name)
                continue
            cols, rows = (int(x) for x in tensor.shape[:2])  # GGUF lists the contiguous dimension first
            blocks = decode_q4_1(np.asarray(tensor.data), rows, cols)
            if gguf_name == "attn_q":
                blocks = blocks.take_rows(_reverse_rope_permutation(rows, dims.num_heads))
            elif gguf_name == "attn_k":
                blocks = blocks.take_rows(_reverse_rope_permutation(rows, dims.num_kv_heads))
            layer[hf_name] = blocks
        layers.append(layer)
    return layers, other


def to_nbits(blocks: Q4Blocks) -> NBitsWeight:
    n, k = blocks.shape
    nb = k // BLOCK
    d, m = blocks.d, blocks.m
    with np.errstate(divide="ignore", invalid="ignore"):
        ideal = np.where(d != 0, -m / d, 0.0)
    z = np.clip(np.round(ideal), 0, 15).astype(np.uint8)
    residual = (m + d * z.astype(np.float32)).astype(np.float32)  # exact: d*z fits float32
    exact = residual == 0
    codes = blocks.codes
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    zp = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
    zp[:, : (nb + 1) // 2] |= z[:, 0::2]
    zp[:, : nb // 2] |= (z[:, 1::2] << 4).astype(np.uint8)
    return NBitsWeight(n=n, k=k, packed=np.ascontiguousarray(packed), scales=d.reshape(-1).astype(np.float32),
                       zero_points=zp.reshape(-1),
                       correction=None if exact.all() else np.ascontiguousarray(residual.T),
                       blocks=int(exact.size), integer_zero_point_blocks=int(exact.sum()))


def nbits_dequantize(weight: NBitsWeight) -> np.ndarray:
    """The [n, k] float weight MatMulNBits plus the correction compute with (for checks)."""
    nb = weight.k // BLOCK
    low, high = weight.packed & 0x0F, weight.packed >> 4
    codes = np.stack([low, high], axis=-1).reshape(weight.n, nb, BLOCK).astype(np.float32)
    zp = weight.zero_points.reshape(weight.n, -1)
    z = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(weight.n, -1)[:, :nb].astype(np.float32)
    w = weight.scales.reshape(weight.n, nb)[..., None] * (codes - z[..., None])
    if weight.correction is not None:
        w = w + weight.correction.T[..., None]
    return w.reshape(weight.n, weight.k)
