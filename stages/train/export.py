"""The train stage's Hugging Face export: a checkpoint becomes a folder with ``model.safetensors``,
``config.json``, ``generation_config.json`` and the tokenizer files, loadable by ``transformers``.
What the config and weights hold -- and which models have no Hugging Face architecture -- is
:mod:`stages.model.hf`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch

from stages.model.hf import hf_architecture, to_hf_config, to_hf_state_dict
from stages.model.transformer import Transformer


def export_model(model: Transformer, out_dir: str, tokenizer_file: Optional[str] = None,
                 special_ids: Optional[dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Write the export into ``out_dir`` (a local folder); returns the file names written."""
    from safetensors.torch import save_file

    config = to_hf_config(model.cfg, special_ids, dtype)  # refuses unsupported shapes before writing anything
    os.makedirs(out_dir, exist_ok=True)
    save_file(to_hf_state_dict(model, dtype), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
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
    from stages.model.checkpoint import load_full_model, load_model_config

    hf_architecture(load_model_config(checkpoint_dir))  # refuse before reading the weights
    return export_model(load_full_model(checkpoint_dir), out_dir, tokenizer_file, special_ids, dtype)
