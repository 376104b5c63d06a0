"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable without ever
unpickling arbitrary objects.

One checkpoint is one folder::

    .metadata, __<rank>_0.distcp    DCP: model weights and optimizer state (tensors only), sharded
    extra_rank<r>.pt                 per rank: step, RNG states, data-loader state, scheduler,
                                     optimizer hyper-parameters, the loss-spike window, history
    model_config.json                the model's shape (so export and evaluation need nothing else)

Why it is safe to load: only tensors go through DCP (its non-tensor path uses
``torch.load(weights_only=False)``); DCP's ``.metadata`` is a pickle, so it is read with an
unpickler that accepts only DCP's own metadata classes and a few torch value types; the per-rank
extras are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from stages.train.model import ModelConfig, Transformer

MODEL_CONFIG = "model_config.json"
DCP_METADATA = ".metadata"


def extra_name(rank: int) -> str:
    return f"extra_rank{rank:05d}.pt"


class UnsafeCheckpoint(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Accepts DCP's metadata dataclasses and torch value types; refuses everything else."""

    _TORCH_TYPES = {"Size", "device"}

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") and module.split(".")[-1] in {"metadata", "planner", "filesystem", "_extension"}:
            obj = getattr(__import__(module, fromlist=[name]), name)
            if isinstance(obj, type):
                return obj
        if module == "torch" and (name in self._TORCH_TYPES or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if module == "pathlib" and name in {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}:  # checkpoint_id
            import pathlib

            return getattr(pathlib, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch.serialization" and name == "_get_layout":  # maps a layout's name to torch.layout
            return torch.serialization._get_layout
        raise UnsafeCheckpoint(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never needs: refusing to load it")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
         restore_rng: bool = True) -> dict[str, Any]:
    """Restore model and optimizer in place (collective); returns this rank's extras."""
    extra = load_extra(path, rank)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)["state"]
    dcp.load(state, storage_reader=SafeFileSystemReader(path))
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


def load_extra(path: str, rank: int = 0) -> dict[str, Any]:
    file = os.path.join(path, extra_name(rank))
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no state for rank {rank} ({extra_name(rank)}); was it saved with a different number of workers?")
    return torch.load(file, map_location="cpu", weights_only=True)


def load_model_config(path: str) -> ModelConfig:
    with open(os.path.join(path, MODEL_CONFIG)) as f:
        return ModelConfig.from_dict(json.load(f))


def load_full_model(path: str, dtype: torch.dtype = torch.float32) -> Transformer:
    """The whole model on CPU from a sharded checkpoint, in one process (export, evaluation)."""
    cfg = load_model_config(path)
    model = Transformer(cfg)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    return model.to(dtype)


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, DCP_METADATA)) and os.path.exists(os.path.join(path, MODEL_CONFIG))
