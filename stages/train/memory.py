"""What one training rank holds at its peak, by term, from the model's shape alone (no torch):
the fp32 state FSDP shards (weights, gradients, AdamW's two moments), the mixed-precision copies it
gathers, the unsharded gradients it accumulates, the activations saved for backward, and the loss's
logits. :mod:`stages.train.dry_run` reports it beside what it measures; ``bench/memory_formula.py``
checks it against the peak GPU memory of the recorded H200 runs.

The activation term counts what eager PyTorch saves for backward in :mod:`stages.model.transformer`,
per token and layer (``c``: bytes of the compute dtype; norms compute in fp32)::

    input norm      RMSNorm: 4d (fp32 input) + c*d   LayerNorm: c*d
    attention       c*(d + 2*kv + d + d)     q, k, v after RoPE (SDPA saves them), its output, o_proj's input copy
                    + c*d                    the norm's output, shared by q/k/v_proj
    QK-norm         RMSNorm: (4 + c)*(d + kv)        LayerNorm: c*(d + kv)
    post-attn norm  as the input norm
    MLP (SwiGLU)    c*d + 4*c*f              its input; gate, silu(gate), up, and their product

With activation checkpointing a layer keeps only its input (``c*d``). The loss adds ``12 * vocab``
bytes per token at the start of backward (fp32 logits' log-softmax, its gradient and the gradient
of the logits). The peak is the larger of two moments: the start of backward (weights, AdamW's
moments, all saved activations and the logits; gradients do not exist yet, ``zero_grad`` set them
to None) and the end of backward (all fp32 state). ``torch.compile`` fuses the norms' and SwiGLU's
element-wise work, so without activation checkpointing a compiled model saves less than this
counts: the formula is then an upper bound (see BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.model.transformer import ModelConfig

LOGITS_BYTES_PER_VOCAB_ENTRY = 12  # fp32: log-softmax output, its gradient, the logits' gradient


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds, by term; ``peak`` is what it needs."""

    weights: int  # fp32 master weights (this rank's shards)
    grads: int  # fp32 gradients (this rank's shards)
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, fp32
    mixed_precision: int  # compute-dtype copies: FSDP's all-gathered units (the current and the prefetched block, the root's embedding and head)
    accumulation: int  # unsharded fp32 gradients kept between the micro-batches of one step (FSDP, grad_accum > 1)
    activations: int  # saved for backward, all layers of one micro-batch
    logits: int  # the loss at the start of backward
    peak: int

    @property
    def fp32_state(self) -> int:
        return self.weights + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "fp32_state": self.fp32_state}


def activation_bytes_per_token_and_layer(cfg: ModelConfig, compute_bytes: int) -> int:
    c, d, f = compute_bytes, cfg.dim, cfg.hidden_dim
    kv = cfg.kv_heads * cfg.head_dim
    norm = (4 + c) * d if cfg.norm == "rmsnorm" else c * d
    qk_norm = 0
    if cfg.qk_norm:
        qk_norm = (4 + c) * (d + kv) if cfg.norm == "rmsnorm" else c * (d + kv)
    attention = c * (d + 2 * kv + d + d) + c * d
    mlp = c * d + 4 * c * f
    return 2 * norm + attention + qk_norm + mlp


def rank_memory(cfg: ModelConfig, world_size: int, micro_batch: int, seq_len: int, *, sharded: bool,
                compute_bytes: int = 2, activation_checkpointing: bool = False, grad_accum: int = 1,
                local_params: int | None = None) -> RankMemory:
    """The terms for one rank of ``world_size`` (``local_params``: what it holds, default an even
    share). ``compute_bytes``: 2 for bf16 (GPU), 4 for fp32 (CPU)."""
    full = cfg.num_params()
    local = local_params if local_params is not None else -(-full // world_size)
    weights, grads, optimizer = 4 * local, 4 * local, 8 * local
    head = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    layer = (full - head) // cfg.n_layers
    if sharded:  # one block gathered and the next prefetched; the root (embedding, head) stays gathered
        mixed_precision = compute_bytes * (2 * layer + head)
    else:  # autocast caches a compute-dtype copy of every weight during the forward (none in fp32)
        mixed_precision = compute_bytes * full if compute_bytes < 4 else 0
    # FSDP2 without gradient sync keeps every unsharded gradient, upcast to the reduce dtype (fp32)
    accumulation = 4 * full if sharded and grad_accum > 1 else 0
    tokens = micro_batch * seq_len
    per_layer = cfg.dim * compute_bytes if activation_checkpointing else activation_bytes_per_token_and_layer(cfg, compute_bytes)
    activations = tokens * cfg.n_layers * per_layer
    logits = tokens * cfg.vocab_size * LOGITS_BYTES_PER_VOCAB_ENTRY
    start_of_backward = weights + optimizer + mixed_precision + accumulation + activations + logits
    end_of_backward = weights + grads + optimizer + mixed_precision + accumulation
    return RankMemory(weights, grads, optimizer, mixed_precision, accumulation, activations, logits,
                      max(start_of_backward, end_of_backward))
