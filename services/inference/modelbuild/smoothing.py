"""Activation smoothing (SmoothQuant-style), folded into the weights before quantization.

MatMulNBits with accuracy_level 4 quantizes each row of its input to int8 per block. Channels with
large activations dominate their block's scale and drown the rest. Dividing input channel j by
s_j and multiplying the weight's row j by s_j leaves the float model unchanged but moves the
outliers into the (finely quantized) weights:
  q/k/v and gate/up inputs: folded into the RMSNorm gammas before them,
  o_proj input: folded into v_proj's output channels (attention is linear in V),
  down_proj input: folded into up_proj's output channels (silu(gate) * up is linear in up).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog

from services.inference.modelbuild.llama_graph import LlamaDims, LlamaWeights

log = structlog.get_logger(__name__)

# Original calibration text: a little prose and a few chat turns, nothing from the test data.
CALIBRATION_TEXTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHow do I keep basil alive on a windowsill?<|im_end|>\n<|im_start|>assistant\n"
    "Basil likes warmth and plenty of light. Put the pot in the sunniest window you have, water it "
    "when the top of the soil feels dry, and pinch off the flower buds so the plant keeps making "
    "leaves.<|im_end|>\n",
    "<|im_start|>user\nWhat is the difference between a list and a tuple in Python?<|im_end|>\n"
    "<|im_start|>assistant\nA list can be changed after it is created: you can append, remove or "
    "replace items. A tuple cannot be changed, which makes it useful as a dictionary key or for "
    "values that should stay fixed, such as coordinates (3, 4).<|im_end|>\n",
    "The committee met on a grey Thursday afternoon to decide where the new footbridge would cross "
    "the river. Some members wanted it close to the market, where most people already walked; "
    "others argued for a quieter spot upstream, near the school, so that children would not have "
    "to cross the busy road. After two hours, a vote, and several cups of tea, they chose the "
    "school.",
    "<|im_start|>user\nSummarise the water cycle in three steps.<|im_end|>\n<|im_start|>assistant\n"
    "1. Evaporation: the sun warms water in seas and lakes, and it rises as vapour.\n2. "
    "Condensation: the vapour cools high in the air and forms clouds.\n3. Precipitation: the water "
    "falls back as rain or snow and flows into rivers and the sea.<|im_end|>\n",
    "In 1887 the town council agreed to pay 42 pounds for a clock, 17 shillings for its bell, and "
    "a further 3 pounds each year for someone to wind it. The clock still runs, although the "
    "winding is now done by a small electric motor installed in 1961.",
]


def collect_input_maxima(model: Any, tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """max |x_j| per input channel of every projection, over the calibration texts."""
    import torch

    maxima: dict[str, np.ndarray] = {}

    def hook(name: str) -> Any:
        def record(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float().numpy()
            maxima[name] = np.maximum(maxima[name], x) if name in maxima else x
        return record

    handles = []
    for i, layer in enumerate(model.model.layers):
        for part, module in (("q_proj", layer.self_attn.q_proj), ("o_proj", layer.self_attn.o_proj),
                             ("gate_proj", layer.mlp.gate_proj), ("down_proj", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(hook(f"{i}.{part}")))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
                model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def smooth(weights: LlamaWeights, dims: LlamaDims, maxima: dict[str, np.ndarray],
           alpha: float = 0.5) -> LlamaWeights:
    """Returns weights computing the same function with smoothed projection inputs."""
    hd, kvh, grp = dims.head_dim, dims.num_kv_heads, dims.group_size
    layers = []
    for i, lw in enumerate(weights.layers):
        lw = {k: v.astype(np.float32, copy=True) for k, v in lw.items()}
        # q/k/v share one input: the first RMSNorm's output.
        qkv = np.concatenate([lw["q_proj"], lw["k_proj"], lw["v_proj"]], axis=0)
        s = _factors(maxima[f"{i}.q_proj"], np.abs(qkv).max(axis=0), alpha)
        lw["input_layernorm"] /= s
        for name in ("q_proj", "k_proj", "v_proj"):
            lw[name] *= s[None, :]
        # gate/up share the second RMSNorm's output.
        gu = np.concatenate([lw["gate_proj"], lw["up_proj"]], axis=0)
        s = _factors(maxima[f"{i}.gate_proj"], np.abs(gu).max(axis=0), alpha)
        lw["post_attention_layernorm"] /= s
        lw["gate_proj"] *= s[None, :]
        lw["up_proj"] *= s[None, :]
        # o_proj input channel (head h, dim d) comes from v channel (kv head h // grp, dim d).
        x = maxima[f"{i}.o_proj"].reshape(kvh, grp, hd).max(axis=1)
        w = np.abs(lw["o_proj"]).max(axis=0).reshape(kvh, grp, hd).max(axis=1)
        s_kv = _factors(x, w, alpha)  # [kvh, hd]
        lw["v_proj"] /= s_kv.reshape(-1)[:, None]
        lw["o_proj"] *= np.repeat(s_kv[:, None, :], grp, axis=1).reshape(-1)[None, :]
        # down_proj input = silu(gate) * up: linear in up's output channels.
        s = _factors(maxima[f"{i}.down_proj"], np.abs(lw["down_proj"]).max(axis=0), alpha)
        lw["up_proj"] /= s[:, None]
        lw["down_proj"] *= s[None, :]
        layers.append(lw)
    log.info("smoothing.done", alpha=alpha, layers=len(layers))
    return LlamaWeights(embed_tokens=weights.embed_tokens, final_norm=weights.final_norm,
                        lm_head=weights.lm_head, layers=layers)
