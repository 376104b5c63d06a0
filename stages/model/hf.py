"""Conversion between our model and the Hugging Face layout, both directions.

The export is loadable by ``transformers`` as ``LlamaForCausalLM`` -- or ``Qwen3ForCausalLM`` when
the model uses QK-norm, the one architecture in ``transformers`` with exactly this per-head RMSNorm
on queries and keys. Our module names are Llama's, so the weights are copied with a ``model.``
prefix and nothing is permuted (RoPE uses the same rotate-half convention). LayerNorm models
(OpenLM's choice) have no drop-in ``transformers`` architecture and are refused.

Reading goes the other way for those two architectures only, so an export -- or a model trained
elsewhere with one of them -- is scored by the same :class:`~stages.model.transformer.Transformer`
as a train-stage checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from stages.model.transformer import ModelConfig, Transformer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")


class ExportError(ValueError):
    pass


def hf_architecture(cfg: ModelConfig) -> str:
    if cfg.norm != "rmsnorm":
        raise ExportError(
            f"cannot export a {cfg.norm} model to Hugging Face: LlamaForCausalLM (and Qwen3ForCausalLM) use RMSNorm and no "
            "transformers architecture matches a bias-free LayerNorm LLaMA; train with model.norm: rmsnorm to export"
        )
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def to_hf_config(cfg: ModelConfig, special_ids: Optional[dict[str, Optional[int]]] = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
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


def from_hf_config(config: dict[str, Any]) -> ModelConfig:
    """The shape :func:`to_hf_config` describes. The FFN width and KV heads come back explicit
    (``ffn_dim``, ``n_kv_heads``): the config holds the numbers, not the rule they came from."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not one lmpipe trains ({', '.join(ARCHITECTURES)})")
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if int(config.get("head_dim") or dim // heads) != dim // heads:
        raise ValueError(f"head_dim {config.get('head_dim')} != hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=int(config["vocab_size"]), dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads), ffn_dim=int(config["intermediate_size"]),
        norm="rmsnorm", norm_eps=float(config.get("rms_norm_eps", 1e-5)), qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=float(theta),
        max_seq_len=int(config.get("max_position_embeddings", 2048)), init_std=float(config.get("initializer_range", 0.02)),
    )


def to_hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from embed_tokens
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        out[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names for a Hugging Face state dict of the shape ``cfg``."""
    ours = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed_tokens.weight"])
    return ours


def from_hf(config: dict[str, Any], state: dict[str, torch.Tensor]) -> Transformer:
    """Our model from a Hugging Face ``config.json`` and its weights (in fp32, on CPU)."""
    cfg = from_hf_config(config)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(state, cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
