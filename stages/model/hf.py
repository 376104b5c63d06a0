"""Conversion between our model and the Hugging Face layout, both directions.

Every shape lmpipe trains has an exact ``transformers`` architecture:

* RMSNorm -> ``LlamaForCausalLM``; RMSNorm + QK-norm -> ``Qwen3ForCausalLM`` (the one with exactly
  this per-head RMSNorm on queries and keys). Our module names are Llama's, so the weights are
  copied with a ``model.`` prefix and nothing is permuted (RoPE uses the same rotate-half
  convention).
* LayerNorm (OpenLM's choice, no bias), with or without QK-norm -> ``StableLmForCausalLM`` with
  ``partial_rotary_factor: 1.0`` (full rotary, rotate-half), ``use_qkv_bias: false``,
  ``use_parallel_residual: false`` (pre-norm x + attn(ln1(x)), then + mlp(ln2(x))), SwiGLU, and
  ``qk_layernorm: true`` for QK-norm. Its LayerNorms have a bias: it is exported as zeros. Its
  QK-norm is one bias-free LayerNorm per head (``q_layernorm.norms.<h>``); ours is one LayerNorm
  shared by all heads, so its weight is written once per head.

Reading goes the other way for these three architectures, so an export -- or a model trained
elsewhere with one of them -- is scored by the same :class:`~stages.model.transformer.Transformer`
as a train-stage checkpoint. What our model cannot hold (a non-zero LayerNorm bias, per-head
norms that differ, partial rotary, QKV biases, a parallel residual) is refused with its key.

The mapping is one list of tensors (:func:`hf_layout`), computed from the shapes alone, so the
streaming export (:mod:`stages.train.export`) knows every file's header before reading a weight.
This module imports torch only inside functions: the train stage's config validation calls
:func:`architecture` without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    import torch

    from stages.model.transformer import ModelConfig, Transformer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "StableLmForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "StableLmForCausalLM": "stablelm"}


class ExportError(ValueError):
    pass


# Weights that are not safetensors are pickles (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``):
# unpickling runs whatever code the file names, so lmpipe never loads one.
SAFE_WEIGHTS_SUFFIX = ".safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def pickle_weights_refusal(folder: str, names: list[str]) -> Optional[str]:
    """The message for a Hugging Face folder whose weights (``names``: the files its index or
    layout names) include pickles, or None when they are all safetensors."""
    pickles = sorted(n for n in names if not n.endswith(SAFE_WEIGHTS_SUFFIX))
    if not pickles:
        return None
    return (f"{folder}: its weights include pickle files ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}); "
            "lmpipe refuses pickle weights (loading one runs the code it names). Convert the folder to safetensors "
            "where you trust its source -- python -c \"from transformers import AutoModelForCausalLM as M; "
            "M.from_pretrained('IN', use_safetensors=False).save_pretrained('OUT', safe_serialization=True)\" -- "
            "and evaluate OUT")


def architecture(norm: str, qk_norm: bool) -> str:
    """The ``transformers`` architecture that computes exactly what our model does."""
    if norm == "layernorm":
        return "StableLmForCausalLM"
    if norm == "rmsnorm":
        return "Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"
    raise ExportError(f"norm {norm!r} has no Hugging Face architecture (rmsnorm or layernorm)")


def hf_architecture(cfg: ModelConfig) -> str:
    return architecture(cfg.norm, cfg.qk_norm)


def to_hf_config(cfg: ModelConfig, special_ids: Optional[dict[str, Optional[int]]] = None,
                 dtype: Any = "float32") -> dict[str, Any]:
    arch = hf_architecture(cfg)
    ids = special_ids or {}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_parameters": rope,  # transformers >= 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": ids.get("bos_id"),
        "eos_token_id": ids.get("eos_id"),
        "pad_token_id": ids.get("pad_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "StableLmForCausalLM":
        # StableLM's default is partial rotary (0.25): full rotary must be said, in both places
        rope["partial_rotary_factor"] = 1.0
        config.update(partial_rotary_factor=1.0, layer_norm_eps=cfg.norm_eps, qk_layernorm=cfg.qk_norm,
                      use_qkv_bias=False, use_parallel_residual=False, hidden_dropout=0.0)
        return config
    config.update(rms_norm_eps=cfg.norm_eps, attention_bias=False)
    if arch == "LlamaForCausalLM":
        config["mlp_bias"] = False
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                      layer_types=["full_attention"] * cfg.n_layers)
    return config


def _refuse(config: dict[str, Any], key: str, ok: Any, why: str) -> None:
    if config.get(key) not in (None, ok):
        raise ValueError(f"config.json: {key}={config[key]!r} is not supported ({why})")


def from_hf_config(config: dict[str, Any]) -> ModelConfig:
    """The shape :func:`to_hf_config` describes. The FFN width and KV heads come back explicit
    (``ffn_dim``, ``n_kv_heads``): the config holds the numbers, not the rule they came from."""
    from stages.model.transformer import ModelConfig

    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not one lmpipe trains ({', '.join(ARCHITECTURES)})")
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or rope.get("rope_theta", 10_000.0)
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if int(config.get("head_dim") or dim // heads) != dim // heads:
        raise ValueError(f"config.json: head_dim {config.get('head_dim')} != hidden_size / num_attention_heads")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_parameters.rope_type={rope['rope_type']!r} is not supported (plain RoPE only)")
    _refuse(config, "hidden_act", "silu", "our MLP is SwiGLU")
    _refuse(config, "attention_bias", False, "our projections have no bias")
    _refuse(config, "mlp_bias", False, "our projections have no bias")
    if arch == "StableLmForCausalLM":
        # transformers' default for a StableLM config without the key is partial rotary (0.25)
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25))
        if float(partial) != 1.0:
            raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported (our RoPE rotates the whole head)")
        _refuse(config, "use_qkv_bias", False, "our projections have no bias")
        _refuse(config, "use_parallel_residual", False, "our blocks are sequential pre-norm")
        norm, eps, qk_norm = "layernorm", float(config.get("layer_norm_eps", 1e-5)), bool(config.get("qk_layernorm", False))
    else:
        norm, eps, qk_norm = "rmsnorm", float(config.get("rms_norm_eps", 1e-5)), arch == "Qwen3ForCausalLM"
    return ModelConfig(
        vocab_size=int(config["vocab_size"]), dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads), ffn_dim=int(config["intermediate_size"]),
        norm=norm, norm_eps=eps, qk_norm=qk_norm,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=float(theta),
        max_seq_len=int(config.get("max_position_embeddings", 2048)), init_std=float(config.get("initializer_range", 0.02)),
    )


# -- weights ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFTensor:
    """One tensor of the export: its Hugging Face name and shape, and the parameter of ours it
    holds (``source``), or None for a LayerNorm bias (zeros: our LayerNorm has none)."""

    name: str
    shape: tuple[int, ...]
    source: Optional[str]


_LAYER_NORMS = re.compile(r"^(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)\.weight$")
_QK_NORM = re.compile(r"^(layers\.\d+\.self_attn)\.(q|k)_norm\.weight$")


def hf_layout(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> list[HFTensor]:
    """The export's tensors, in the order of ``shapes`` (our names -> shapes: the model's state
    dict or a checkpoint's metadata)."""
    stablelm = hf_architecture(cfg) == "StableLmForCausalLM"
    out = []
    for name, shape in shapes.items():
        shape = tuple(int(n) for n in shape)
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from embed_tokens
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        qk = _QK_NORM.match(name) if stablelm else None
        if qk:
            heads = cfg.n_heads if qk.group(2) == "q" else cfg.kv_heads
            out.extend(HFTensor(f"model.{qk.group(1)}.{qk.group(2)}_layernorm.norms.{h}.weight", shape, name) for h in range(heads))
            continue
        out.append(HFTensor(hf_name, shape, name))
        if stablelm and _LAYER_NORMS.match(name):
            out.append(HFTensor(hf_name.removesuffix(".weight") + ".bias", shape, None))
    return out


def hf_tensor(entry: HFTensor, source: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The export's tensor for ``entry`` from our parameter ``entry.source`` (None for a zero bias)."""
    import torch

    if entry.source is None:
        return torch.zeros(entry.shape, dtype=dtype)
    if tuple(source.shape) != entry.shape:
        raise ValueError(f"{entry.source}: shape {tuple(source.shape)}, expected {entry.shape}")
    return source.detach().to("cpu", dtype).contiguous()


def to_hf_state_dict(model: Transformer, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    import torch

    ours = model.state_dict()
    return {e.name: hf_tensor(e, ours.get(e.source), dtype or torch.float32)
            for e in hf_layout(model.cfg, {k: tuple(v.shape) for k, v in ours.items()})}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names for a Hugging Face state dict of the shape ``cfg``; refuses what our
    model cannot hold (a non-zero LayerNorm bias, per-head QK norms that differ)."""
    import torch

    ours: dict[str, torch.Tensor] = {}
    per_head: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        name = key.removeprefix("model.")
        if cfg.norm == "layernorm" and name.endswith(".bias") and _LAYER_NORMS.match(name.removesuffix(".bias") + ".weight"):
            if torch.count_nonzero(tensor):
                raise ValueError(f"{key}: a LayerNorm bias that is not zero; lmpipe's LayerNorm has no bias")
            continue
        head = re.match(r"^(layers\.\d+\.self_attn)\.(q|k)_layernorm\.norms\.(\d+)\.weight$", name)
        if head:
            per_head.setdefault(f"{head.group(1)}.{head.group(2)}_norm.weight", []).append((int(head.group(3)), tensor))
            continue
        ours[name] = tensor
    for name, heads in per_head.items():
        heads.sort(key=lambda ht: ht[0])
        first = heads[0][1]
        if any(not torch.equal(t, first) for _, t in heads[1:]):
            raise ValueError(f"{name.replace('_norm', '_layernorm.norms.*')}: per-head norms differ; lmpipe shares one norm across heads")
        ours[name] = first
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed_tokens.weight"])
    return ours


def from_hf(config: dict[str, Any], state: dict[str, torch.Tensor]) -> Transformer:
    """Our model from a Hugging Face ``config.json`` and its weights (in fp32, on CPU)."""
    from stages.model.transformer import Transformer

    cfg = from_hf_config(config)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(state, cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
