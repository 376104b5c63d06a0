"""The Hugging Face export loads in ``transformers`` and gives our logits (fp32, CPU); converting
to the Hugging Face layout and back gives our model again, exactly."""

from __future__ import annotations

import json

import pytest
import torch

from stages.model.hf import ExportError, from_hf, from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from stages.model.transformer import ModelConfig, Transformer, model_config
from stages.train.export import export_model


def trained_like(cfg, seed=0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


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


@pytest.mark.parametrize("overrides,arch", [
    (dict(), "LlamaForCausalLM"),
    (dict(n_kv_heads=2, tie_embeddings=True), "LlamaForCausalLM"),
    (dict(qk_norm=True), "Qwen3ForCausalLM"),
])
def test_export_loads_in_transformers_with_matching_logits(tmp_path, tokenizer_file, overrides, arch):
    transformers = pytest.importorskip("transformers")
    cfg = model_config("debug", vocab_size=320, dim=64, n_layers=2, n_heads=4, max_seq_len=64, **overrides)
    model = trained_like(cfg)
    export_model(model, str(tmp_path), tokenizer_file, {"bos_id": 1, "eos_id": 2, "pad_id": 0})
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_token == "<eos>" and tok.decode(tok("the lazy dog")["input_ids"]) == "the lazy dog"


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2, tie_embeddings=True), dict(qk_norm=True, rope_theta=500_000.0)])
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
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens), model(tokens))


def test_a_derived_shape_comes_back_as_numbers():
    cfg = model_config("debug", vocab_size=320)
    back = from_hf_config(to_hf_config(cfg))
    assert (back.ffn_dim, back.n_kv_heads) == (cfg.hidden_dim, cfg.kv_heads) and back.ffn_dim != cfg.ffn_dim


def test_layernorm_model_is_refused_with_a_reason(tmp_path):
    model = Transformer(model_config("debug", norm="layernorm"))
    with pytest.raises(ExportError, match="layernorm.*RMSNorm"):
        export_model(model, str(tmp_path))
    assert not any(tmp_path.iterdir())
