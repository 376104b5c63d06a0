"""Shard from birth and gradient accumulation, on real gloo process groups (CPU)."""

from __future__ import annotations

import torch

from stages.model.transformer import Transformer
from stages.train.parallelize import materialize
from tests.stages import sharding_support as ss


def test_initial_weights_do_not_depend_on_the_world_size_and_each_rank_holds_only_its_shard(tmp_path):
    prefix = ss.results_path(tmp_path, "run")
    # world size 1 without any process group: the plain, unsharded model
    with torch.device("meta"):
        plain = Transformer(ss.MODEL)
    materialize(plain, torch.device("cpu"), seed=7)
    reference = plain.state_dict()
    total = sum(p.numel() for p in plain.parameters())
    for world_size in (2, 4):
        ss.spawn(ss.initial_weights, world_size, prefix)
        got = torch.load(f"{prefix}.init-{world_size}.pt", weights_only=True)
        assert set(got["state"]) == set(reference)
        for name, tensor in reference.items():
            assert torch.equal(got["state"][name], tensor), f"{name} differs at world size {world_size}"
        # rank 0 allocated its own rows only: ceil(rows / w) of each parameter
        assert got["local_numel"] <= total / world_size + sum(p[0].numel() for p in plain.parameters() if p.dim() > 1)
        assert got["local_numel"] < total / world_size * 1.1
    # the draws are not all the same numbers
    assert not torch.equal(reference["layers.0.self_attn.q_proj.weight"], reference["layers.1.self_attn.q_proj.weight"])
    std = reference["embed_tokens.weight"].std().item()
    assert abs(std - 0.02) < 0.002


def test_gradient_accumulation_reduces_once_per_step_with_the_same_result(tmp_path):
    prefix = ss.results_path(tmp_path, "run")
    ss.spawn(ss.accumulate, 2, prefix, False)
    ss.spawn(ss.accumulate, 2, prefix, True)
    once = torch.load(f"{prefix}.accum-0.pt", weights_only=True)
    every = torch.load(f"{prefix}.accum-1.pt", weights_only=True)
    modules = ss.MODEL.n_layers + 1  # one FSDP group per block, one at the root
    assert every["reduce_scatters"] == 2 * 2 * modules  # steps x micro-batches x groups: the old behaviour
    assert once["reduce_scatters"] == 2 * modules
    # the same sums, added in another order: equal to float precision
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(once["history"], every["history"], strict=True))
    for name, tensor in every["state"].items():
        torch.testing.assert_close(once["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
