"""Turn a single-device :class:`~stages.model.transformer.Transformer` into a trainable, distributed
one. Each concern is a separate function, applied in torchtitan's order: activation
checkpointing, then ``torch.compile`` (per block, so every block reuses one compiled graph),
then FSDP2 ``fully_shard`` per block and at the root.

Parameter names never change: checkpoint wrappers and compiled modules are stripped by
``torch.distributed.checkpoint.state_dict`` (which every save, load and export goes through).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from stages.train.config import ParallelConfig
from stages.model.transformer import Transformer


def param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    """Parameter and compute dtype. "auto" keeps CPU in fp32 so that CPU/gloo runs are exact;
    gradients are reduced in fp32 whatever this returns (see ``apply_fsdp``)."""
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.mixed_precision]


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass (memory for ~30% more compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """Compile each block in place (keeps module names). Blocks share a shape, so the graph is
    compiled once and reused."""
    for block in model.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: Transformer, mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2: shard each block, then the root (embeddings, final norm, head). The last block is
    not resharded after forward: backward needs it immediately."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: Transformer, cfg: ParallelConfig, device: torch.device, world_size: int, mesh=None,
                shard: Optional[bool] = None) -> Transformer:
    """Apply, in order: activation checkpointing, compile, FSDP2 (``shard``; default: when
    ``world_size > 1``). A run under a process group shards even with one rank, so that one GPU
    runs the same mixed-precision policy (bf16 compute, fp32 master weights and reduction) as
    many. Without a process group, a run gets the same dtype by autocast (see Trainer).

    Call it on a model built on the ``meta`` device, then ``to_empty`` and ``init_weights``
    (:func:`materialize`): FSDP2 then allocates only each rank's shards, so no rank ever holds
    the full model."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if world_size > 1 if shard is None else shard:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = mesh or init_device_mesh(device.type, (world_size,))
        apply_fsdp(model, mesh, param_dtype(cfg, device), torch.float32)
    return model


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (and possibly sharded) model on ``device`` and initialise it: each
    rank allocates and fills only its own shards, with values that do not depend on the world
    size (``Transformer.init_weights``)."""
    model.to_empty(device=device)
    model.init_weights(seed)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Return every FSDP module to sharded parameters. Needed after a forward without backward
    (evaluation): the last block keeps its gathered parameters after forward, and checkpointing
    or the optimizer must see the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def autocast_dtype(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> Optional[torch.dtype]:
    """The dtype to autocast to when FSDP's policy does not already cast (single process)."""
    if is_sharded(model):
        return None
    dtype = param_dtype(cfg, device)
    return dtype if dtype != torch.float32 else None
