"""Writing sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), and restoring a
training run from one: model, optimizer state, RNG states and this rank's extras. The format --
and reading a model from it, which export and evaluation need without any training code -- is
:mod:`stages.model.checkpoint`.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from stages.model.checkpoint import MODEL_CONFIG, checkpoint_reader, extra_name, load_extra
from stages.model.transformer import ModelConfig


# -- RNG states ------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(_jsonable(random.getstate())),
        "numpy": json.dumps(_jsonable(np.random.get_state())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = json.loads(state["numpy"])
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# -- save / load ---------------------------------------------------------------------------------

def _split_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tensors (per-parameter state) for DCP; the small param_groups (floats, names) for the extras."""
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return osd["state"], groups


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any],
         model_cfg: ModelConfig, rank: int = 0) -> None:
    """Every rank calls this (collective). ``extra`` holds this rank's small state: plain Python
    values, strings and tensors only."""
    os.makedirs(path, exist_ok=True)
    optim_state, groups = _split_optimizer_state(get_optimizer_state_dict(model, optimizer))
    dcp.save({"model": get_model_state_dict(model), "optim": optim_state}, storage_writer=FileSystemWriter(path))
    torch.save({**extra, "optim_param_groups": groups, "rng": rng_state()}, os.path.join(path, extra_name(rank)))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's extras are written before the completion marker
    if rank == 0:  # model_config.json is written last: its presence marks a complete checkpoint
        with open(os.path.join(path, MODEL_CONFIG), "w") as f:
            json.dump(model_cfg.to_dict(), f, indent=2)


def load(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], rank: int = 0,
         restore_rng: bool = True, storage: Any = None) -> dict[str, Any]:
    """Restore model and optimizer in place (collective) from a local folder or, through
    ``storage``, an ``s3://`` prefix (each rank reads only the byte ranges of its shards; nothing
    is downloaded whole); returns this rank's extras."""
    extra = load_extra(path, rank, storage)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)["state"]
    dcp.load(state, storage_reader=checkpoint_reader(path, storage))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        groups = [dict(g) for g in extra["optim_param_groups"]]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": groups})
    if restore_rng:
        set_rng_state(extra["rng"])
    return extra
