"""The Hugging Face export: each architecture loads in ``transformers`` and gives our logits (fp32,
CPU); converting to the Hugging Face layout and back gives our model again, exactly; a sharded
checkpoint streams into sharded safetensors reading only the model's weights (local and S3),
byte-identical to the in-memory export, atomically; every preset has an architecture."""

from __future__ import annotations

import json
import os
import typing

import pytest
import torch

from stages.model import checkpoint as ckpt
from stages.model.hf import architecture, from_hf, from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from stages.model.transformer import MODEL_SIZES, ModelConfig, Transformer, model_config
from stages.train.export import export_checkpoint, export_model, write_export

SPECIAL = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


def trained_like(cfg, seed=0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny(**overrides) -> ModelConfig:
    return model_config("debug", **{"vocab_size": 320, "dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, **overrides})


def tokens(cfg) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


# One case per architecture, each with the structure of a preset at tiny dims: Llama (125m, 350m,
# llama-1b, 7b), Llama with grouped-query attention (tinyllama-1b), Qwen3 (RMSNorm + QK-norm),
# StableLM (1b: LayerNorm + QK-norm; with GQA here, and sharded, to cover the per-KV-head norms
# and the index).
@pytest.mark.parametrize("overrides,arch,shard_bytes", [
    (dict(), "LlamaForCausalLM", None),
    (dict(n_kv_heads=2, tie_embeddings=True), "LlamaForCausalLM", None),
    (dict(qk_norm=True), "Qwen3ForCausalLM", None),
    (dict(norm="layernorm", qk_norm=True, n_kv_heads=2), "StableLmForCausalLM", 60_000),
])
def test_export_loads_in_transformers_with_matching_logits(tmp_path, tokenizer_file, overrides, arch, shard_bytes):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from stages.scoring.lm import load_checkpoint

    cfg = tiny(**overrides)
    model = trained_like(cfg)
    out = tmp_path / "hf"
    files = export_model(model, str(out), tokenizer_file, SPECIAL, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    shards = [f for f in files if f.endswith(".safetensors")]
    if shard_bytes:  # transformers' naming, with an index that maps every tensor to its shard
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == shards
    else:
        assert shards == ["model.safetensors"] and "model.safetensors.index.json" not in files
    # our streaming writer's files are what safetensors itself reads back
    written = {k: v for s in shards for k, v in load_file(str(out / s)).items()}
    expected = to_hf_state_dict(model)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    with torch.no_grad():
        ours, theirs = model(tokens(cfg)), hf(tokens(cfg)).logits
        assert (ours - theirs).abs().max().item() < 1e-4
        # the evaluate stage reads the export back into lmpipe's own model
        loaded = load_checkpoint(str(out))
        assert loaded.kind == "huggingface" and isinstance(loaded.model, Transformer)
        assert torch.equal(loaded.model(tokens(cfg)), ours)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<eos>" and tok.decode(tok("the lazy dog")["input_ids"]) == "the lazy dog"


@pytest.mark.parametrize("overrides", [
    dict(), dict(n_kv_heads=2, tie_embeddings=True), dict(qk_norm=True, rope_theta=500_000.0),
    dict(norm="layernorm", norm_eps=1e-6), dict(norm="layernorm", qk_norm=True, n_kv_heads=2),
])
def test_conversion_round_trips_config_and_weights(overrides):
    # the Hugging Face config holds the FFN width and KV heads as numbers, so ours states them too
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192, init_std=0.01,
                      max_seq_len=64).replace(**overrides)
    model = trained_like(cfg)
    config, state = to_hf_config(cfg), to_hf_state_dict(model)
    assert from_hf_config(config) == cfg
    ours = model.state_dict()
    back = from_hf_state_dict(state, cfg)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    rebuilt = from_hf(config, state)
    assert rebuilt.cfg == cfg and all(torch.equal(v, ours[k]) for k, v in rebuilt.state_dict().items())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens(cfg)), model(tokens(cfg)))


def test_a_derived_shape_comes_back_as_numbers():
    cfg = model_config("debug", vocab_size=320)
    back = from_hf_config(to_hf_config(cfg))
    assert (back.ffn_dim, back.n_kv_heads) == (cfg.hidden_dim, cfg.kv_heads) and back.ffn_dim != cfg.ffn_dim


def test_what_our_model_cannot_hold_is_refused_with_its_key():
    cfg = tiny(norm="layernorm", qk_norm=True)
    config, state = to_hf_config(cfg), to_hf_state_dict(trained_like(cfg))
    bias = dict(state, **{"model.norm.bias": torch.full_like(state["model.norm.bias"], 0.1)})
    with pytest.raises(ValueError, match=r"model\.norm\.bias: a LayerNorm bias that is not zero"):
        from_hf_state_dict(bias, cfg)
    key = "model.layers.1.self_attn.k_layernorm.norms.3.weight"
    heads = dict(state, **{key: state[key] + 1})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_layernorm\.norms\.\*\.weight: per-head norms differ"):
        from_hf_state_dict(heads, cfg)
    partial = {k: v for k, v in config.items() if k != "partial_rotary_factor"}
    partial["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0}  # transformers' default: 0.25
    with pytest.raises(ValueError, match="partial_rotary_factor=0.25"):
        from_hf_config(partial)
    with pytest.raises(ValueError, match="use_parallel_residual=True"):
        from_hf_config(dict(config, use_parallel_residual=True))


def test_every_preset_has_an_architecture_and_the_config_lists_every_preset():
    from stages.train.config import ModelSpec

    assert set(typing.get_args(ModelSpec.model_fields["size"].annotation)) == set(MODEL_SIZES)
    assert {name: architecture(c.norm, c.qk_norm) for name, c in MODEL_SIZES.items()} == {
        "debug": "LlamaForCausalLM", "125m": "LlamaForCausalLM", "350m": "LlamaForCausalLM", "1b": "StableLmForCausalLM",
        "llama-1b": "LlamaForCausalLM", "tinyllama-1b": "LlamaForCausalLM", "7b": "LlamaForCausalLM"}
    tiny_llama = to_hf_config(MODEL_SIZES["tinyllama-1b"].replace(vocab_size=32_000))
    assert (tiny_llama["hidden_size"], tiny_llama["num_hidden_layers"], tiny_llama["num_attention_heads"],
            tiny_llama["num_key_value_heads"], tiny_llama["intermediate_size"]) == (2048, 22, 32, 4, 5632)
    # every norm/QK-norm combination the config can ask for maps to an architecture
    for norm in typing.get_args(typing.get_args(ModelSpec.model_fields["norm"].annotation)[0]):
        for qk in (False, True):
            assert architecture(norm, qk) in ("LlamaForCausalLM", "Qwen3ForCausalLM", "StableLmForCausalLM")


# -- from a sharded checkpoint, streaming --------------------------------------------------------------

def save_checkpoint(path: str, cfg: ModelConfig) -> Transformer:
    """A train-stage checkpoint with optimizer state (AdamW after one step)."""
    from stages.train.checkpoint import save

    model = trained_like(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(tokens(cfg)).float().logsumexp(-1).mean().backward()
    opt.step()
    save(path, model, opt, {"step": 1, "tokens_seen": 96}, cfg)
    return model.eval()


@pytest.fixture
def reads(monkeypatch):
    """Every key DCP reads from storage, in order."""
    seen: list[str] = []
    original = ckpt.SafeFileSystemReader.read_data

    def read_data(self, plan, planner):
        seen.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(ckpt.SafeFileSystemReader, "read_data", read_data)
    return seen


def test_checkpoint_export_streams_model_weights_only_and_is_byte_identical(tmp_path, tokenizer_file, reads):
    cfg = tiny(norm="layernorm", qk_norm=True, n_kv_heads=2)
    model = save_checkpoint(str(tmp_path / "ckpt"), cfg)
    metadata = ckpt.checkpoint_reader(str(tmp_path / "ckpt")).read_metadata()
    assert any(k.startswith("optim.") for k in metadata.state_dict_metadata)  # there is optimizer state to avoid
    files = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out" / "hf"), tokenizer_file, SPECIAL, max_shard_bytes=60_000)
    # each model tensor read once (one QK-norm weight feeds every head), nothing of the optimizer's
    assert sorted(reads) == sorted(f"model.{k}" for k in model.state_dict()) and len(reads) == len(set(reads))
    assert os.listdir(tmp_path / "out") == ["hf"]  # the temporary folder was renamed, nothing left beside it
    same = export_model(model, str(tmp_path / "memory"), tokenizer_file, SPECIAL, max_shard_bytes=60_000)
    assert files == same and len([f for f in files if f.endswith(".safetensors")]) > 1
    for name in files:
        assert (tmp_path / "out" / "hf" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt"), tiny())
    (tmp_path / "ckpt" / ckpt.MODEL_CONFIG).write_text(json.dumps(tiny(n_layers=3).to_dict()))
    with pytest.raises(ValueError, match=r"do not match its model_config.json: missing \['layers\.2\."):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_failed_export_leaves_no_folder(tmp_path):
    model = trained_like(tiny())
    state = model.state_dict()

    def read(name):
        if name.startswith("layers.1."):
            raise OSError(f"lost {name}")
        return state[name]

    with pytest.raises(OSError, match="lost layers.1"):
        write_export(model.cfg, {k: tuple(v.shape) for k, v in state.items()}, read, str(tmp_path / "hf"), max_shard_bytes=30_000)
    assert os.listdir(tmp_path) == []


def test_export_from_s3_reads_only_weights_and_evaluate_loads_it(tmp_path, tokenizer_file, s3_server, reads):
    from pipeline.storage import Storage
    from stages.scoring.lm import load_checkpoint
    from tests.conftest import make_bucket

    make_bucket(s3_server, "export")
    storage = Storage({"s3": {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}})
    cfg = tiny(norm="layernorm", qk_norm=True)
    model = save_checkpoint(str(tmp_path / "ckpt"), cfg)
    for name in os.listdir(tmp_path / "ckpt"):
        storage.write_bytes_atomic(f"s3://export/run/ckpt/{name}", (tmp_path / "ckpt" / name).read_bytes())
    files = export_checkpoint("s3://export/run/ckpt", "s3://export/run/hf", tokenizer_file, SPECIAL, storage=storage, max_shard_bytes=60_000)
    assert sorted(reads) == sorted(f"model.{k}" for k in model.state_dict())
    assert sorted(p.rsplit("/", 1)[1] for p in storage.find_files("s3://export/run/hf")) == files
    with torch.no_grad():
        loaded = load_checkpoint("s3://export/run/hf", storage)
        assert isinstance(loaded.model, Transformer) and torch.equal(loaded.model(tokens(cfg)), model(tokens(cfg)))
