"""The train stage's Hugging Face export: a checkpoint becomes a folder with sharded safetensors
(``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``, or one
``model.safetensors`` when the weights fit one shard, as ``transformers`` writes them),
``config.json``, ``generation_config.json`` and the tokenizer files, loadable by ``transformers``.
What the config and weights hold is :mod:`stages.model.hf`.

The export streams: every tensor's name, shape and dtype is known from the checkpoint's DCP
metadata, so each safetensors file's header is written first and the tensors follow one at a
time, each read from the checkpoint on its own (only model weights, never the optimizer state
saved beside them), converted, cast and written. Memory holds a few tensors, not the model.
The train stage runs :func:`export_task` on a worker, not on the driver.

Atomic: a local export is written into a temporary folder beside ``out`` and renamed; on an
object store each object is written whole (one PUT or a completed multipart upload), weights
first and ``config.json`` last, so a folder with a ``config.json`` is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import uuid
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional

import torch

from stages.model.hf import HFTensor, hf_architecture, hf_layout, hf_tensor, to_hf_config
from stages.model.transformer import ModelConfig, Transformer

DEFAULT_SHARD_BYTES = 2 * 1024**3
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX_FILE = "model.safetensors.index.json"


# -- safetensors, streamed ------------------------------------------------------------------------

def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


class SafetensorsStreamWriter:
    """One ``.safetensors`` file written front to back: an 8-byte little-endian header length,
    the JSON header (dtype, shape, data offsets of every tensor; padded with spaces to 8 bytes),
    then each tensor's raw bytes in header order. The tensors are declared up front and must
    then be written in that order, each exactly as declared."""

    def __init__(self, f: BinaryIO, tensors: list[HFTensor], dtype: torch.dtype):
        if sys.byteorder != "little":  # safetensors stores little-endian bytes; we write memory as is
            raise RuntimeError("the safetensors writer needs a little-endian machine")
        self.f, self.dtype, self.pending = f, dtype, list(tensors)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            end = offset + _nbytes(t.shape, dtype)
            header[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self.pending or self.pending[0].name != name:
            raise ValueError(f"safetensors writer: got {name}, expected {self.pending[0].name if self.pending else 'nothing'}")
        expected = self.pending.pop(0)
        if tuple(tensor.shape) != expected.shape or tensor.dtype != self.dtype:
            raise ValueError(f"safetensors writer: {name} is {tuple(tensor.shape)} {tensor.dtype}, declared {expected.shape} {self.dtype}")
        # a byte view of the tensor's memory: no copy
        self.f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self.pending:
            raise ValueError(f"safetensors writer: {len(self.pending)} declared tensors were never written ({self.pending[0].name}, ...)")


def plan_shards(layout: list[HFTensor], dtype: torch.dtype, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Tensors in order, a new shard whenever the next would pass ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own), as ``transformers``' ``save_pretrained`` does."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in layout:
        n = _nbytes(t.shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# -- the export folder ------------------------------------------------------------------------------

class _Output:
    """Where the export's files go: a temporary folder renamed to ``out`` at the end (local), or
    the objects themselves (remote; each object appears whole when closed)."""

    def __init__(self, out: str, storage: Any = None):
        from pipeline import storage as st

        self.out, self.remote = out, st.is_remote(out)
        self.storage = storage or st.Storage()
        if self.remote:
            self.dir = out
        else:
            out = out[len("file://"):] if out.startswith("file://") else out
            self.out = os.path.abspath(out)
            self.dir = f"{self.out}.tmp-{uuid.uuid4().hex}"
            os.makedirs(self.dir)
        self.names: list[str] = []

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        self.names.append(name)
        if not self.remote:
            with open(os.path.join(self.dir, name), "wb") as f:
                yield f
            return
        from pipeline import storage as st

        f = self.storage.open(st.join(self.dir, name), "wb")
        try:
            yield f
        except BaseException:
            # closing would complete the upload and publish a truncated object: abort it instead
            if hasattr(f, "discard"):
                f.discard()
                f.closed = True
            else:
                f.close()
            raise
        f.close()

    def write(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)

    def commit(self) -> list[str]:
        if not self.remote:
            if os.path.exists(self.out):  # a rerun of the same attempt: the new export replaces it
                shutil.rmtree(self.out)
            os.rename(self.dir, self.out)
        return sorted(self.names)

    def abort(self) -> None:
        if not self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


def tokenizer_files(tokenizer_json: str, special_ids: dict[str, Optional[int]], max_len: int) -> dict[str, bytes]:
    """``tokenizer.json`` (the tokenizers library's file) + a ``tokenizer_config.json`` naming
    the special tokens, which is what ``AutoTokenizer`` needs for a fast tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    for key, field in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
        token_id = special_ids.get(field)
        if token_id is not None and tok.id_to_token(token_id) is not None:
            config[key] = tok.id_to_token(token_id)
    return {"tokenizer.json": tokenizer_json.encode("utf-8"), "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def write_tokenizer(tokenizer_file: str, out_dir: str, special_ids: dict[str, Optional[int]], max_len: int) -> None:
    """The tokenizer files into a local folder (an export made by other means, a baseline)."""
    for name, data in tokenizer_files(_read_text(tokenizer_file, None), special_ids, max_len).items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)


def _read_text(uri: str, storage: Any) -> str:
    from pipeline import storage as st

    if os.path.isdir(uri):
        uri = os.path.join(uri, "tokenizer.json")
    return (storage or st.Storage()).read_bytes(uri).decode("utf-8")


def write_export(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], torch.Tensor], out: str,
                 tokenizer_file: Optional[str] = None, special_ids: Optional[dict[str, Optional[int]]] = None,
                 dtype: torch.dtype = torch.float32, storage: Any = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """The export folder of a model of shape ``cfg`` whose parameters (our names -> shapes) are
    read one at a time with ``read(name)``; returns the file names written."""
    config = to_hf_config(cfg, special_ids, dtype)  # refuses unsupported shapes before writing anything
    tokenizer_json = _read_text(tokenizer_file, storage) if tokenizer_file else None
    layout = hf_layout(cfg, shapes)
    shards = plan_shards(layout, dtype, max_shard_bytes)
    names = shard_names(len(shards))
    output = _Output(out, storage)
    try:
        cached: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)  # one source feeds every head's QK norm
        for name, tensors in zip(names, shards):
            with output.open(name) as f:
                writer = SafetensorsStreamWriter(f, tensors, dtype)
                for entry in tensors:
                    if entry.source is not None and cached[0] != entry.source:
                        cached = (None, None)  # drop the previous tensor before reading the next
                        cached = (entry.source, read(entry.source))
                    writer.write(entry.name, hf_tensor(entry, cached[1] if entry.source else None, dtype))
                writer.close()
        cached = (None, None)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t.shape, dtype) for t in layout)},
                     "weight_map": {t.name: name for name, tensors in zip(names, shards) for t in tensors}}
            output.write(INDEX_FILE, json.dumps(index, indent=2, sort_keys=True).encode())
        if tokenizer_json is not None:
            for name, data in tokenizer_files(tokenizer_json, special_ids or {}, cfg.max_seq_len).items():
                output.write(name, data)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        output.write("generation_config.json", json.dumps(generation, indent=2).encode())
        output.write("config.json", json.dumps(config, indent=2).encode())  # last: it marks a complete export
    except BaseException:
        output.abort()
        raise
    return output.commit()


def export_model(model: Transformer, out_dir: str, tokenizer_file: Optional[str] = None,
                 special_ids: Optional[dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32,
                 storage: Any = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Export a model held in memory (tests, small models)."""
    state = model.state_dict()
    return write_export(model.cfg, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, out_dir,
                        tokenizer_file, special_ids, dtype, storage, max_shard_bytes)


def export_checkpoint(checkpoint: str, out: str, tokenizer_file: Optional[str] = None,
                      special_ids: Optional[dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32,
                      storage: Any = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Export a sharded train-stage checkpoint (local folder or ``s3://``), tensor by tensor."""
    from stages.model import checkpoint as ckpt

    cfg = ckpt.load_model_config(checkpoint, storage)
    hf_architecture(cfg)  # refuse before reading anything else
    reader = ckpt.checkpoint_reader(checkpoint, storage)
    stored = ckpt.model_tensors(reader.read_metadata())
    with torch.device("meta"):  # the names and shapes the config implies, without allocating them
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    needed = [e.source for e in hf_layout(cfg, expected) if e.source is not None]
    missing = [n for n in needed if n not in stored]
    unexpected = [n for n in stored if n not in expected]
    wrong = [f"{n} {tuple(stored[n].size)} != {expected[n]}" for n in needed if n in stored and tuple(stored[n].size) != expected[n]]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {checkpoint}: its weights do not match its {ckpt.MODEL_CONFIG}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    return write_export(cfg, expected, lambda name: ckpt.read_model_tensor(reader, name, stored[name]), out,
                        tokenizer_file, special_ids, dtype, storage, max_shard_bytes)


def export_task(checkpoint: str, out: str, tokenizer_file: Optional[str], special_ids: dict[str, Optional[int]],
                dtype: str, storage: Any, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """The train stage's export, as a task on a worker (``ctx.fan_out.map``)."""
    return export_checkpoint(checkpoint, out, tokenizer_file, special_ids, getattr(torch, dtype), storage, max_shard_bytes)
