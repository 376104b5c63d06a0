"""Unit tests of the evaluate stage, no Ray: the scoring math on hand-built logits, token bytes,
windows, prompts, malformed task lines, and corrupt or incompatible checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from stages.evaluate import report
from stages.scoring.lm import CheckpointError, Scorer, load_checkpoint, plan_rows, rolling_windows, tree_mask
from stages.scoring.perplexity import token_byte_lengths
from stages.scoring.metrics import TextTotals, aggregate, bits_per_byte, domain_metrics, mean_stderr, predictions, score_example
from stages.scoring.tasks import build_request, load_mc_task, parse_mc_lines
from stages.evalsets import Example, Task
from stages.model.transformer import Transformer, model_config


# -- scoring math -----------------------------------------------------------------------------------

def test_acc_and_acc_norm_follow_lm_eval():
    # summed log-likelihoods favour the short choice; per character the long one wins
    lls = [-4.0, -9.0, -12.0]
    choices = ["no", "absolutely yes", "x"]
    assert predictions(lls, choices) == (0, 1)  # -4/2 = -2 < -9/14 = -0.64
    r = score_example("e", 1, choices, lls, [False] * 3, " absolutely yes")
    assert (r.acc, r.acc_norm) == (0.0, 1.0)
    assert predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties: the first, like numpy.argmax


def test_aggregate_and_stderr():
    results = [score_example(str(i), g, ["a", "bb"], lls, [False, False], [" a", " bb"][g])
               for i, (g, lls) in enumerate([(0, [-1, -3]), (1, [-1, -3]), (1, [-3, -1]), (0, [-3, -1.5])])]
    agg = aggregate(results)
    assert agg["acc"] == 0.5 and agg["n"] == 4
    assert agg["acc_stderr"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    # bits per byte of the gold continuation as scored (" a": 2 bytes, " bb": 3), averaged over examples
    per_example = [1 / (math.log(2) * 2), 3 / (math.log(2) * 3), 1 / (math.log(2) * 3), 3 / (math.log(2) * 2)]
    assert [r.gold_bits_per_byte for r in results] == pytest.approx(per_example)
    assert agg["gold_bits_per_byte"] == pytest.approx(np.mean(per_example))
    assert agg["gold_bits_per_byte_stderr"] == pytest.approx(np.std(per_example, ddof=1) / 2)
    assert mean_stderr([1.0]) != mean_stderr([1.0])  # NaN for one value


def test_bits_per_byte_and_domain_macro_average():
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    a, b = TextTotals(), TextTotals()
    a.add(math.log(2) * 8, 4, 8)  # 1 bit/byte
    b.add(math.log(2) * 30, 10, 10)  # 3 bits/byte
    m = domain_metrics({"a": a, "b": b})
    assert m["a"]["bits_per_byte"] == pytest.approx(1.0) and m["b"]["bits_per_byte"] == pytest.approx(3.0)
    assert m["_macro"]["bits_per_byte"] == pytest.approx(2.0)  # domains weigh the same
    assert m["_all"]["bits_per_byte"] == pytest.approx(38 / 18)  # tokens pooled
    assert m["a"]["perplexity"] == pytest.approx(math.exp(math.log(2) * 8 / 4))


class BigramModel(torch.nn.Module):
    """Hand-built logits: the next-token distribution depends only on the current token."""

    def __init__(self, vocab: int, max_len: int = 32, seed: int = 0):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        self.cfg = model_config("debug", vocab_size=vocab, max_seq_len=max_len)

    def forward(self, tokens):
        return self.table[tokens]


@pytest.fixture(scope="module")
def char_tokenizer():
    """Byte-level BPE with no merges: one token per byte, special tokens 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["ab"], trainers.BpeTrainer(vocab_size=259, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def test_continuation_loglikelihood_on_hand_built_logits(char_tokenizer):
    model = BigramModel(char_tokenizer.get_vocab_size())
    logp = torch.log_softmax(model.table, -1)
    ids = lambda s: char_tokenizer.encode(s).ids  # noqa: E731
    scorer = Scorer(model, char_tokenizer, fast=False, batch_tokens=20, prefix_token=0)
    (out,) = scorer.loglikelihoods(["cat "], [[" sat", "x"]])  # trailing space moves into the continuation
    for cont, (lp, greedy) in zip(["  sat", " x"], out):
        toks = ids("cat" + cont)
        expected = sum(logp[toks[i - 1], toks[i]].item() for i in range(3, len(toks)))
        assert lp == pytest.approx(expected, abs=1e-5)
    (empty,) = scorer.loglikelihoods([""], [["ab"]])  # an empty context is the prefix token
    a, b = ids("ab")
    assert empty[0][0] == pytest.approx(logp[0, a].item() + logp[a, b].item(), abs=1e-5)
    # greedy: true only if every continuation token is the argmax
    top = int(logp[ids("c")[0]].argmax())
    piece = char_tokenizer.decode([top])
    (g,) = scorer.loglikelihoods(["c"], [[piece]])
    assert g[0][1] is True


def test_truncation_keeps_the_last_max_len_plus_one_tokens():
    rows = plan_rows(list(range(10, 20)), [[1, 2, 3], [4]], max_len=8, share=True, first_request=0)
    assert [r.tokens for r in rows] == [[14, 15, 16, 17, 18, 19, 1, 2], list(range(12, 20))]  # lm-eval: (ctx + cont)[-9:][:-1]
    assert rows[0].targets == [(0, [(5, 1), (6, 2), (7, 3)])] and rows[1].targets == [(1, [(7, 4)])]
    shared = plan_rows([5, 6, 7], [[1], [2]], max_len=8, share=False, first_request=3)
    assert len(shared) == 1 and shared[0].targets == [(3, [(2, 1)]), (4, [(2, 2)])]  # single tokens: one pass


def test_tree_rows_match_one_row_per_choice():
    cfg = model_config("debug", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, max_seq_len=32)
    model = Transformer(cfg)
    model.init_weights(1)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.logits(model(tokens, return_hidden=True)), model(tokens))
    (tree,) = plan_rows([5, 6, 7, 8], [[1, 2, 3], [4, 9]], 32, True, 0)
    assert tree.tokens == [5, 6, 7, 8, 1, 2, 4] and tree.positions == [0, 1, 2, 3, 4, 5, 4]
    mask = tree_mask(tree.segments, 7)
    assert not mask[6, 4] and not mask[6, 5] and mask[6, 3] and mask[5, 4]  # choice 2 never sees choice 1
    h = model(torch.tensor([tree.tokens]), torch.tensor([tree.positions]), mask[None], return_hidden=True)
    for cont, start in (([1, 2, 3], 4), ([4, 9], 6)):
        alone = model(torch.tensor([[5, 6, 7, 8] + cont[:-1]]), return_hidden=True)
        assert torch.allclose(h[0, start : start + len(cont) - 1], alone[0, 4:], atol=1e-5)


def test_rolling_windows_score_every_token_once():
    tokens = list(range(100, 123))
    windows = rolling_windows(tokens, 0, 8)
    scored = [t for _, targets in windows for t in targets]
    assert scored == tokens
    assert windows[0][0] == [0] + tokens[:7]
    for inp, targets in windows:
        assert len(inp) <= 8 and inp[len(inp) - len(targets) + 1 :] == targets[:-1]
    assert len(windows[-1][0]) == 8  # the last window keeps a full context


def test_token_bytes_are_the_utf8_bytes_of_the_text():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "Café crème — naïve 東京 😀\n\tcode()  "
    tok.train_from_iterator([text] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    sizes = token_byte_lengths(tok)
    ids = tok.encode(text).ids + [1]  # EOS stands for no text
    assert sizes[1] == 0 and sizes[0] == 0
    assert int(sizes[ids].sum()) == len(text.encode("utf-8"))


# -- prompts ---------------------------------------------------------------------------------------------

def test_mmlu_prompt_is_lm_evals_template():
    ex = [Example(f"q{i}", f" Question {i}? ", ("w", "x", "y", "z"), i % 4, {"subject": "college physics"}) for i in range(3)]
    task = Task("mmlu", tuple(ex))
    r = build_request(task, ex[2], "mmlu", num_fewshot=2)
    shot = lambda e, a: f"Question {e}?\nA. w\nB. x\nC. y\nD. z\nAnswer: {a}\n\n"  # noqa: E731
    assert r.context == ("The following are multiple choice questions (with answers) about college physics.\n\n"
                         + shot(0, "A") + shot(1, "B") + "Question 2?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert r.continuations == (" A", " B", " C", " D") and r.choices == ("A", "B", "C", "D")
    plain = build_request(task, ex[0], "plain", num_fewshot=1)  # few-shot never includes the example itself
    assert plain.context == " Question 1?  x\n\n Question 0? "  # contexts as given: lm-eval strips nothing and plain.continuations == (" w", " x", " y", " z")


# -- bad input -------------------------------------------------------------------------------------------

def test_malformed_task_lines_are_reported_with_file_and_line_and_skipped(tmp_path):
    lines = [
        {"id": "ok1", "context": "Q1", "choices": ["a", "b"], "gold": 1},
        {"id": "nogold", "context": "Q2", "choices": ["a", "b"]},
        {"id": "range", "context": "Q3", "choices": ["a", "b"], "gold": 2},
        {"id": "empty", "context": "Q4", "choices": [], "gold": 0},
        "{not json",
        {"id": "ok1", "context": "dup", "choices": ["a"], "gold": 0},
        {"id": "boolgold", "context": "Q5", "choices": ["a", "b"], "gold": True},
        {"id": "ok2", "question": "Q6", "choices": ["a", "b", "c"], "gold": 0},
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    lt = load_mc_task("t", str(path))
    assert [e.id for e in lt.task.examples] == ["ok1", "ok2"]
    assert lt.skipped == {"missing_gold": 1, "gold_out_of_range": 1, "empty_choices": 1, "invalid_json": 1, "duplicate_id": 1,
                          "invalid_record": 1}
    assert [b.where for b in lt.bad_lines] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7)]
    assert all(b.message.startswith(f"{path}:") for b in lt.bad_lines)
    assert lt.digest.startswith("sha256:")


def test_parse_keeps_fewshot_pool_apart():
    task, bad = parse_mc_lines("t", [json.dumps({"id": "s", "context": "c", "choices": ["a"], "gold": 0, "split": "fewshot"}),
                                     json.dumps({"id": "e", "context": "c", "choices": ["a"], "gold": 0})], "f")
    assert not bad and [e.id for e in task.fewshot] == ["s"] and [e.id for e in task.examples] == ["e"]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    from stages.train import checkpoint as ckpt

    cfg = model_config("debug", vocab_size=320, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32)
    model = Transformer(cfg)
    model.init_weights(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "step_00000007")
    ckpt.save(path, model, torch.optim.AdamW(model.parameters()), {"step": 7, "tokens_seen": 700}, cfg)
    return path, model


def test_a_good_checkpoint_loads_with_its_step_and_tokens(saved_checkpoint):
    path, model = saved_checkpoint
    loaded = load_checkpoint(path)
    assert (loaded.kind, loaded.step, loaded.tokens_seen) == ("dcp", 7, 700)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


@pytest.mark.parametrize("damage,match", [
    ("truncate_shard", "is corrupt or incompatible"),
    ("garbage_metadata", "is corrupt or incompatible"),
    ("no_files", "not a checkpoint lmpipe can read"),
    ("bad_config", "is corrupt or incompatible"),
])
def test_a_corrupt_checkpoint_fails_naming_it(saved_checkpoint, tmp_path, damage, match):
    src, _ = saved_checkpoint
    path = str(tmp_path / "broken_ckpt")
    shutil.copytree(src, path)
    if damage == "truncate_shard":
        shard = next(f for f in os.listdir(path) if f.endswith(".distcp"))
        with open(os.path.join(path, shard), "r+b") as f:
            f.truncate(100)
    elif damage == "garbage_metadata":
        with open(os.path.join(path, ".metadata"), "wb") as f:
            f.write(b"\x80\x04not a pickle")
    elif damage == "no_files":
        for f in os.listdir(path):
            os.remove(os.path.join(path, f))
    elif damage == "bad_config":
        with open(os.path.join(path, "model_config.json"), "w") as f:
            json.dump({"dim": 48, "n_layers": 2, "n_heads": 2, "vocab_size": 320, "max_seq_len": 32}, f)  # shapes no longer match
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert path in str(err.value)


def test_a_checkpoint_for_another_tokenizer_is_refused(saved_checkpoint):
    path, _ = saved_checkpoint
    with pytest.raises(CheckpointError, match=rf"{path}: its vocabulary has 320 entries but the tokenizer has 16384"):
        load_checkpoint(path, vocab_size=16384)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_checkpoint(path + "-missing")


# -- table -------------------------------------------------------------------------------------------------

def test_markdown_table_has_one_column_per_checkpoint_by_tokens_seen():
    rows = [
        {"checkpoint": "c2", "step": 200, "tokens_seen": 2_000_000, "task": "mmlu_0shot", "metric": "acc", "value": 0.3, "stderr": 0.01, "n": 10},
        {"checkpoint": "c1", "step": 100, "tokens_seen": 1_000_000, "task": "mmlu_0shot", "metric": "acc", "value": 0.25, "stderr": 0.01, "n": 10},
        {"checkpoint": "c1", "step": 100, "tokens_seen": 1_000_000, "task": "validation/_macro", "metric": "bits_per_byte", "value": 1.5, "stderr": None, "n": 5},
    ]
    lines = report.markdown_table(rows).splitlines()
    assert lines[0] == "| task | metric | 1M tok (step 100) | 2M tok (step 200) |"
    assert lines[2] == "| mmlu_0shot | acc (%) | 25.00 ± 1.00 | 30.00 ± 1.00 |"
    assert lines[3] == "| validation/_macro | bits_per_byte | 1.5000 |  |"
    assert report.csv_table(rows).splitlines()[0] == ",".join(report.ROW_FIELDS)
    assert report.metrics_png(rows, "t")[:4] == b"\x89PNG"


@pytest.mark.parametrize("layout", ["index_names_a_pickle", "pickle_only"])
def test_pickle_weights_are_refused_with_how_to_convert_them(tmp_path, layout):
    """A Hugging Face folder whose weights are pickles: lmpipe says it refuses them and how to
    convert them to safetensors (transformers' own message advises weights_only=False)."""
    folder = tmp_path / "hf_pickle"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 1,
                                                    "n_head": 1, "n_embd": 8, "vocab_size": 16, "n_positions": 8}))
    weights = "pytorch_model-00001-of-00001.bin" if layout == "index_names_a_pickle" else "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(16, 8)}, folder / weights)
    if layout == "index_names_a_pickle":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"transformer.wte.weight": weights}}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(folder))
    message = str(err.value)
    assert str(folder) in message and weights in message
    assert "refuses pickle weights" in message and "save_pretrained('OUT', safe_serialization=True)" in message
    assert "weights_only" not in message and "\n" not in message
