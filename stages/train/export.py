"""Export to the Hugging Face layout: ``model.safetensors`` + ``config.json`` (+ tokenizer files),
loadable by ``transformers`` as ``LlamaForCausalLM`` -- or ``Qwen3ForCausalLM`` when the model uses
QK-norm, the one architecture in ``transformers`` with exactly this per-head RMSNorm on queries and
keys. Our module names are Llama's, so the weights are copied with a ``model.`` prefix and nothing
is permuted (RoPE uses the same rotate-half convention).

LayerNorm models (OpenLM's choice) have no drop-in ``transformers`` architecture and are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch

from stages.train.model import ModelConfig, Transformer


class ExportError(ValueError):
    pass


def hf_architecture(cfg: ModelConfig) -> str:
    if cfg.norm != "rmsnorm":
        raise ExportError(
            f"cannot export a {cfg.norm} model to Hugging Face: LlamaForCausalLM (and Qwen3ForCausalLM) use RMSNorm and no "
            "transformers architecture matches a bias-free LayerNorm LLaMA; train with model.norm: rmsnorm to export"
        )
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def hf_config(cfg: ModelConfig, special_ids: Optional[dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    arch = hf_architecture(cfg)
    ids = special_ids or {}
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "qwen3" if arch.startswith("Qwen3") else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": ids.get("bos_id"),
        "eos_token_id": ids.get("eos_id"),
        "pad_token_id": ids.get("pad_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "LlamaForCausalLM":
        config["mlp_bias"] = False
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                      layer_types=["full_attention"] * cfg.n_layers)
    return config


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from embed_tokens
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        out[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def export_model(model: Transformer, out_dir: str, tokenizer_file: Optional[str] = None,
                 special_ids: Optional[dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Write the export into ``out_dir`` (a local folder); returns the file names written."""
    from safetensors.torch import save_file

    config = hf_config(model.cfg, special_ids, dtype)  # refuses unsupported shapes before writing anything
    os.makedirs(out_dir, exist_ok=True)
    save_file(hf_state_dict(model, dtype), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, f, indent=2)
    if tokenizer_file:
        write_tokenizer(tokenizer_file, out_dir, special_ids or {}, model.cfg.max_seq_len)
    return sorted(os.listdir(out_dir))


def write_tokenizer(tokenizer_file: str, out_dir: str, special_ids: dict[str, Optional[int]], max_len: int) -> None:
    """``tokenizer.json`` (the tokenizers library's file) + a ``tokenizer_config.json`` naming
    the special tokens, which is what ``AutoTokenizer`` needs for a fast tokenizer."""
    from tokenizers import Tokenizer

    src = os.path.join(tokenizer_file, "tokenizer.json") if os.path.isdir(tokenizer_file) else tokenizer_file
    shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
    tok = Tokenizer.from_file(src)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    for key, field in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
        token_id = special_ids.get(field)
        if token_id is not None and tok.id_to_token(token_id) is not None:
            config[key] = tok.id_to_token(token_id)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_checkpoint(checkpoint_dir: str, out_dir: str, tokenizer_file: Optional[str] = None,
                      special_ids: Optional[dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Consolidate a sharded checkpoint in this process and export it."""
    from stages.train.checkpoint import load_full_model, load_model_config

    hf_architecture(load_model_config(checkpoint_dir))  # refuse before reading the weights
    return export_model(load_full_model(checkpoint_dir), out_dir, tokenizer_file, special_ids, dtype)
