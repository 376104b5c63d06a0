"""A LLaMA-style decoder-only transformer, written for one device (parallelism lives in
:mod:`stages.train.parallelize`).

RoPE (the "rotate half" convention of Hugging Face's Llama, so exports need no permutation),
SwiGLU MLP, RMSNorm or LayerNorm (OpenLM used LayerNorm without bias), optional QK-norm,
optional tied embeddings, grouped-query attention, ``scaled_dot_product_attention`` (flash
kernels on GPU) and no biases. Module names follow ``LlamaForCausalLM`` minus its ``model.``
prefix, so the Hugging Face conversion (:mod:`stages.model.hf`) is a rename-free copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32_000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: Optional[int] = None  # None: = n_heads (no grouped-query attention)
    ffn_dim: Optional[int] = None  # None: ~8/3 * dim rounded up to ffn_multiple_of (LLaMA's rule)
    ffn_multiple_of: int = 256
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    max_seq_len: int = 2048
    init_std: float = 0.02

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # -- size and cost -----------------------------------------------------------------------
    def num_params(self, include_embedding: bool = True) -> int:
        d, L, h = self.dim, self.n_layers, self.hidden_dim
        attn = d * self.head_dim * (self.n_heads + 2 * self.kv_heads) + self.n_heads * self.head_dim * d
        norms_per_layer = 2 * d  # weights only: RMSNorm, and LayerNorm without bias
        qk = 2 * self.head_dim if self.qk_norm else 0
        per_layer = attn + 3 * d * h + norms_per_layer + qk
        embedding = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = L * per_layer + d + head + (embedding if include_embedding else 0)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (parameters doing matmuls) + the attention term
        12 * layers * dim * seq_len (PaLM appendix B, as torchtitan counts it). The input embedding
        is a lookup and is excluded; the output projection counts even when tied."""
        matmul_params = self.num_params(include_embedding=False) + (self.vocab_size * self.dim if self.tie_embeddings else 0)
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.dim * seq_len


# Named shapes, each exported as the transformers architecture in brackets (stages/model/hf.py).
# ``1b`` is OpenLM-1B's (dim 2048, 24 layers, 16 heads, LayerNorm without bias, QK-norm)
# [StableLmForCausalLM]; ``llama-1b`` is the same shape the LLaMA way (RMSNorm, no QK-norm), so the
# two differ only in their norms [LlamaForCausalLM]; ``tinyllama-1b`` is TinyLlama-1.1B's, with
# grouped-query attention (dim 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632) [LlamaForCausalLM];
# ``7b`` is LLaMA-7B's (dim 4096, 32 layers, 32 heads, FFN 11008, RMSNorm) [LlamaForCausalLM].
MODEL_SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_multiple_of=32, max_seq_len=512),
    "125m": ModelConfig(dim=768, n_layers=12, n_heads=12),
    "350m": ModelConfig(dim=1024, n_layers=24, n_heads=16),
    "1b": ModelConfig(dim=2048, n_layers=24, n_heads=16, norm="layernorm", qk_norm=True),
    "llama-1b": ModelConfig(dim=2048, n_layers=24, n_heads=16),
    "tinyllama-1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632),
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
}


def model_config(size: str, **overrides) -> ModelConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r} (known: {', '.join(MODEL_SIZES)})")
    return MODEL_SIZES[size].replace(**overrides)


class RMSNorm(nn.Module):
    """Normalises in fp32 and casts back before scaling, exactly as Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=False)


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class LayerCache:
    """One layer's keys and values of the tokens already seen ([batch, kv_heads, seen, head_dim]),
    so that generating a token attends to them without recomputing them (a KV cache)."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # QK-norm: a norm over each head's query/key vector (OLMo 2, Qwen3) keeps attention logits bounded.
        self.q_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        """Causal self-attention; ``mask [B, 1, T, S]`` (True = may attend) replaces the causal mask
        (the evaluator's shared-context batches; with a ``cache``, S counts the cached keys too)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so never part of a checkpoint or an export.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std); output projections scaled by 1/sqrt(2 * layers) (GPT-2); norm
        weights 1. Works on a plain model and on one sharded from birth (FSDP2 DTensor
        parameters materialised with ``to_empty``): each rank fills only its own rows, and the
        values do not depend on the world size (see :func:`init_rows`)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            name = canonical_name(name)
            if p.dim() == 1:
                local_tensor(p).fill_(1.0)  # norm weights
                continue
            s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            init_rows(p, seed, name, s)
        cos, sin = rope_cache(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                return_hidden: bool = False, cache: Optional[list[LayerCache]] = None) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab].

        The evaluator lays several continuations after one shared context: ``positions [batch, seq]``
        are then each token's RoPE position, and ``mask [batch, seq, seq]`` (True = may attend)
        replaces the causal mask. ``return_hidden`` stops before the output head and returns the
        final hidden states (after the last norm), so that :meth:`logits` -- the largest matmul of
        a small model -- runs only at the positions a caller scores. ``cache`` (one
        :class:`LayerCache` per layer, filled by earlier calls) makes ``tokens`` the continuation of
        what the cache holds: generation feeds one new token per call (``positions`` and ``mask``
        then given explicitly)."""
        t = tokens.shape[1]
        if positions is None and t > self.cfg.max_seq_len:  # a shared-context row may be longer than any position it uses
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len}")
        h = self.embed_tokens(tokens)
        if positions is None:
            cos, sin = self.rope_cos[:t].to(h.dtype), self.rope_sin[:t].to(h.dtype)
        else:
            cos, sin = self.rope_cos[positions].to(h.dtype)[:, None], self.rope_sin[positions].to(h.dtype)[:, None]
        attn_mask = mask[:, None] if mask is not None else None
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_mask, cache[i] if cache is not None else None)
        h = self.norm(h)
        return h if return_hidden else self.logits(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head, on final hidden states from ``forward(..., return_hidden=True)``."""
        return self.lm_head(hidden)


# Rows drawn from one generator. Fixed, so a parameter's values depend on its name, the seed and
# the row, never on how its rows are split over ranks.
INIT_ROWS_PER_DRAW = 256


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes (activation checkpointing, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded, DTensor) tensor; a plain tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def _row_range(p: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the full parameter that this rank holds (all of them when
    ``p`` is not a DTensor). FSDP2 shards dim 0, so a rank's shard is a run of whole rows."""
    if not hasattr(p, "device_mesh"):
        return 0, p.shape[0]
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements if not pl.is_replicate()):
        raise ValueError(f"init_weights supports row (dim 0) sharding only, got {p.placements}")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], offset[0] + shape[0]


def init_rows(p: torch.Tensor, seed: int, name: str, std: float) -> None:
    """Fill this rank's rows of ``p`` with N(0, std).

    The full parameter is drawn in blocks of :data:`INIT_ROWS_PER_DRAW` rows, each from its own
    generator seeded by (seed, name, block): a rank draws only the blocks its rows fall in (at
    most two partial blocks more than it keeps), so no rank ever materialises a full parameter
    and every world size gives bit-identical weights. Drawn on CPU in fp32, then cast."""
    start, stop = _row_range(p)
    local = local_tensor(p)
    if stop <= start:
        return
    cols = p.shape[1:]
    gen = torch.Generator(device="cpu")
    first = start // INIT_ROWS_PER_DRAW
    for block in range(first, -(-stop // INIT_ROWS_PER_DRAW)):
        b0 = block * INIT_ROWS_PER_DRAW
        b1 = min(b0 + INIT_ROWS_PER_DRAW, p.shape[0])
        digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
        gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        rows = torch.randn((b1 - b0, *cols), generator=gen).mul_(std)
        lo, hi = max(start, b0), min(stop, b1)
        local[lo - start : hi - start].copy_(rows[lo - b0 : hi - b0].to(local.device, local.dtype))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
