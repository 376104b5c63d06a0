"""The train stage's checkpoint format, and reading a model from it without ever unpickling
arbitrary objects. Writing, and restoring a whole training run, is the trainer's business
(:mod:`stages.train.checkpoint`); export and evaluation only read, so this lives with the model.

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
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from stages.model.transformer import ModelConfig, Transformer

MODEL_CONFIG = "model_config.json"
DCP_METADATA = ".metadata"
MODEL_PREFIX = "model."  # the trainer saves {"model": ..., "optim": ...}; DCP flattens the keys


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
    """``FileSystemReader`` whose metadata is read with the restricted unpickler. The metadata's
    bytes are read once per reader: loading a checkpoint tensor by tensor (the export) calls
    ``dcp.load`` once per tensor, and each call reads the metadata again."""

    _metadata_bytes: Optional[bytes] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        if self._metadata_bytes is None:
            with self.fs.create_stream(path, "rb") as f:
                self._metadata_bytes = f.read()
        # unpickled afresh each time: DCP's planners keep references into the object they get
        metadata = _MetadataUnpickler(io.BytesIO(self._metadata_bytes)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeRemoteReader(SafeFileSystemReader):
    """The same reader over an fsspec filesystem (``s3://`` through :class:`pipeline.storage.Storage`):
    DCP opens each ``.distcp`` file and reads only the byte ranges of the tensors asked for, so
    reading the model's weights never fetches the optimizer state stored beside them."""

    def __init__(self, uri: str, storage: Any):
        from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem

        super().__init__(uri)
        self.fs = FsspecFileSystem()
        self.fs.fs = storage.fs(uri)
        self.path = uri

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id:  # the base class would rebuild the filesystem without the storage's options
            raise ValueError("SafeRemoteReader reads the checkpoint it was made for; pass no checkpoint_id")
        super().reset(None)


def checkpoint_reader(uri: str, storage: Any = None) -> SafeFileSystemReader:
    """A safe DCP reader for a local folder or an ``s3://`` prefix."""
    from pipeline import storage as st

    if st.is_remote(uri):
        return SafeRemoteReader(uri, storage or st.Storage())
    return SafeFileSystemReader(uri[len("file://"):] if uri.startswith("file://") else uri)


def model_tensors(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """The model's tensors in a checkpoint's metadata, by our parameter name (``model.`` removed);
    the optimizer's (``optim.``) are not listed."""
    return {key[len(MODEL_PREFIX):]: md for key, md in metadata.state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(md, TensorStorageMetadata)}


def read_model_tensor(reader: SafeFileSystemReader, name: str, md: TensorStorageMetadata) -> torch.Tensor:
    """One model tensor, whole, from all ranks' shards: a DCP load of a state dict holding only
    this key into a tensor allocated here, so memory holds this tensor and one shard being read."""
    tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp.load({MODEL_PREFIX + name: tensor}, storage_reader=reader, no_dist=True)
    return tensor


def load_extra(path: str, rank: int = 0, storage: Any = None) -> dict[str, Any]:
    """This rank's extras; ``path`` a local folder or (with ``storage``) an ``s3://`` prefix."""
    from pipeline import storage as st

    file = st.join(path, extra_name(rank))
    if st.is_remote(path):
        storage = storage or st.Storage()
        if not storage.exists(file):
            raise FileNotFoundError(f"{path}: no state for rank {rank} ({extra_name(rank)}); was it saved with a different number of workers?")
        return torch.load(io.BytesIO(storage.read_bytes(file)), map_location="cpu", weights_only=True)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no state for rank {rank} ({extra_name(rank)}); was it saved with a different number of workers?")
    return torch.load(file, map_location="cpu", weights_only=True)


def load_model_config(path: str, storage: Any = None) -> ModelConfig:
    from pipeline import storage as st

    file = st.join(path, MODEL_CONFIG)
    if st.is_remote(path):
        return ModelConfig.from_dict(json.loads((storage or st.Storage()).read_bytes(file)))
    with open(file) as f:
        return ModelConfig.from_dict(json.load(f))


def model_mismatch(path: str, saved: ModelConfig, ours: ModelConfig) -> Optional[str]:
    """Why a checkpoint cannot continue into this model (each differing field), or None."""
    a, b = saved.to_dict(), ours.to_dict()
    if a == b:
        return None
    differ = ", ".join(f"{k}={a.get(k)!r} (this run: {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return f"{path} holds another model: {differ}"


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
