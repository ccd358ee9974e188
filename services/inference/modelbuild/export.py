"""Load a Llama-family checkpoint with transformers and write it as an fp32 ONNX decoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from services.inference.modelbuild.errors import ModelBuildError
from services.inference.modelbuild.llama_graph import LlamaDims, LlamaWeights, build_llama_graph
from services.inference.modelbuild.onnx_io import save_onnx
from services.inference.modelbuild.source import ModelSource

log = structlog.get_logger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Instruct chat models trained with ChatML end a turn with <|im_end|>; some GGUF files carry
# <|im_start|> as their EOS token, which would stop generation before it starts.
CHATML_END = "<|im_end|>"


@dataclass
class SpecialTokens:
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int


@dataclass
class LoadedCheckpoint:
    dims: LlamaDims
    weights: LlamaWeights
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    chat_template: str | None
    special: SpecialTokens
    model_type: str
    model: Any  # the transformers model, for calibration


def load_checkpoint(source: ModelSource) -> LoadedCheckpoint:
    """Read weights, tokenizer and chat template through transformers (CPU, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    folder = source.path
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.path.name
        folder = source.path.parent
    log.info("load.start", source=str(source.path), kind=source.kind)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelBuildError(f"unsupported model type {config.model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelBuildError("checkpoints with attention or MLP biases are not supported")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ModelBuildError(f"unsupported RoPE scaling {rope.get('rope_type')!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dims = LlamaDims(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.rms_norm_eps),
    )
    weights = _extract_weights(model, dims)
    special = _special_tokens(tokenizer, config)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(special.eos_ids[0])
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(special.pad_id)
    log.info("load.done", model_type=config.model_type, layers=dims.num_layers, vocab=dims.vocab_size)
    return LoadedCheckpoint(dims=dims, weights=weights, tokenizer=tokenizer,
                            chat_template=getattr(tokenizer, "chat_template", None),
                            special=special, model_type=config.model_type, model=model)


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params["rope_theta"] = config.rope_theta
    return params


def _extract_weights(model: Any, dims: LlamaDims) -> LlamaWeights:
    state = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    lm_head = state.get("lm_head.weight", embed)
    layers = []
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"
        layers.append({
            "input_layernorm": state[f"{p}.input_layernorm.weight"],
            "post_attention_layernorm": state[f"{p}.post_attention_layernorm.weight"],
            "q_proj": state[f"{p}.self_attn.q_proj.weight"],
            "k_proj": state[f"{p}.self_attn.k_proj.weight"],
            "v_proj": state[f"{p}.self_attn.v_proj.weight"],
            "o_proj": state[f"{p}.self_attn.o_proj.weight"],
            "gate_proj": state[f"{p}.mlp.gate_proj.weight"],
            "up_proj": state[f"{p}.mlp.up_proj.weight"],
            "down_proj": state[f"{p}.mlp.down_proj.weight"],
        })
    # lm_head gets its own copy: untied from the embedding so it can be quantized on its own.
    return LlamaWeights(embed_tokens=embed, final_norm=state["model.norm.weight"],
                        lm_head=np.array(lm_head, copy=True), layers=layers)


def _special_tokens(tokenizer: Any, config: Any) -> SpecialTokens:
    vocab = tokenizer.get_vocab()
    if CHATML_END in vocab:
        eos_ids = [vocab[CHATML_END]]
    else:
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
    for extra in ("<|endoftext|>", "</s>", "<|eot_id|>"):
        if extra in vocab and vocab[extra] not in eos_ids and extra != tokenizer.bos_token:
            eos_ids.append(vocab[extra])
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id != eos_ids[0] else None
    return SpecialTokens(bos_id=bos_id, eos_ids=eos_ids, pad_id=eos_ids[0])


def write_fp32_onnx(checkpoint: LoadedCheckpoint, out_dir: Path, weights: LlamaWeights | None = None) -> Path:
    """Write the fp32 decoder graph (external data) to out_dir/model.onnx."""
    model = build_llama_graph(checkpoint.dims, weights or checkpoint.weights)
    path = save_onnx(model, out_dir / "model.onnx")
    log.info("export.done", path=str(path), nodes=len(model.graph.node))
    return path


def write_tokenizer_files(checkpoint: LoadedCheckpoint, out_dir: Path) -> dict[str, str]:
    """tokenizer.json (loadable by the `tokenizers` library), chat template, generation defaults."""
    tokenizer_path = out_dir / "tokenizer.json"
    checkpoint.tokenizer.backend_tokenizer.save(str(tokenizer_path))
    files = {"tokenizer": tokenizer_path.name}
    if checkpoint.chat_template:
        (out_dir / "chat_template.jinja").write_text(checkpoint.chat_template, encoding="utf-8")
        files["chat_template"] = "chat_template.jinja"
    generation = {
        "eos_token_ids": checkpoint.special.eos_ids,
        "pad_token_id": checkpoint.special.pad_id,
        "bos_token_id": checkpoint.special.bos_id,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 256,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files["generation_config"] = "generation_config.json"
    return files
