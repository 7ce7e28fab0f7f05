"""MoE layers: the router against HF's, expert weights loaded from either checkpoint layout, each
tensor-parallel rank's expert slice, and Mixtral's sparse block against HF's on the same weights."""

from contextlib import nullcontext

import pytest
import torch
from rank_helpers import as_tp_rank
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from scaleinfer.config import ArchConfig
from scaleinfer.kernels.dispatch import HAS_TRITON, force_triton
from scaleinfer.kernels.moe import fused_moe
from scaleinfer.layers.moe import FusedMoE, select_experts
from scaleinfer.models.mixtral import SparseMoeBlock

NUM_EXPERTS, HIDDEN, INTER = 4, 32, 24


def hf_block(top_k: int) -> MixtralSparseMoeBlock:
    config = MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=NUM_EXPERTS, num_experts_per_tok=top_k
    )
    torch.manual_seed(top_k)
    block = MixtralSparseMoeBlock(config).eval()
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return block


def arch(top_k: int) -> ArchConfig:
    return ArchConfig(
        "MixtralForCausalLM",
        vocab_size=16,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=64,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=top_k,
    )


def per_expert_tensors(block: MixtralSparseMoeBlock) -> dict[str, torch.Tensor]:
    """The released checkpoint's names and shapes: one [inter, hidden] w1 / w3 and [hidden, inter] w2 each."""
    gate_up, down = block.experts.gate_up_proj.data, block.experts.down_proj.data
    out = {}
    for e in range(NUM_EXPERTS):
        out[f"experts.{e}.w1.weight"], out[f"experts.{e}.w3.weight"] = gate_up[e].chunk(2)
        out[f"experts.{e}.w2.weight"] = down[e]
    return out


def test_select_experts_matches_hf_router():
    block = hf_block(top_k=2)
    x = torch.randn(7, HIDDEN)
    logits, hf_weights, hf_ids = block.gate(x)
    weights, ids = select_experts(logits, 2)
    assert weights.dtype == torch.float32 and torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))


def load_block(ours: SparseMoeBlock, block: MixtralSparseMoeBlock, layout: str) -> None:
    """Through the parameters' weight_loaders: per expert (the released checkpoints' names) or the whole stacks
    (transformers 5 in memory)."""
    ours.gate.weight.data.copy_(block.gate.weight.data)
    if layout == "per_expert":
        load_block_experts(ours.experts, block)
        return
    w13, w2 = ours.experts.w13_weight, ours.experts.w2_weight
    w13.weight_loader(w13, block.experts.gate_up_proj.data)
    w2.weight_loader(w2, block.experts.down_proj.data)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_mixtral_block_matches_hf(top_k, layout, path):
    """The same output as HF's block, through the torch reference or the Triton kernel (the interpreter on CPU)."""
    if path == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    block, ours = hf_block(top_k), SparseMoeBlock(arch(top_k))
    load_block(ours, block, layout)
    x = torch.randn(11, HIDDEN)
    with torch.no_grad(), force_triton() if path == "triton" else nullcontext():
        got = ours(x)
    with torch.no_grad():
        expected = block(x[None])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_each_rank_holds_its_slice_of_every_expert_and_the_slices_sum_to_the_whole():
    """Expert slicing: rank r loads rows r of each expert's gate and up and columns r of its down; the ranks'
    partial outputs (all-reduced in forward) add up to the unsliced layer's."""
    block = hf_block(top_k=2)
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        weights, ids = select_experts(block.gate(x)[0], 2)
    whole = FusedMoE(NUM_EXPERTS, HIDDEN, INTER)
    load_block_experts(whole, block)
    partial = []
    for rank in range(2):
        with as_tp_rank(rank):
            sliced = FusedMoE(NUM_EXPERTS, HIDDEN, INTER)
        load_block_experts(sliced, block)
        half = slice(rank * INTER // 2, (rank + 1) * INTER // 2)
        gate, up = block.experts.gate_up_proj.data.chunk(2, dim=1)
        torch.testing.assert_close(sliced.w13_weight, torch.cat([gate[:, half], up[:, half]], dim=1))
        torch.testing.assert_close(sliced.w2_weight, block.experts.down_proj.data[:, :, half])
        partial.append(fused_moe(x, sliced.w13_weight, sliced.w2_weight, weights, ids))
    torch.testing.assert_close(partial[0] + partial[1], whole(x, weights, ids))


def load_block_experts(layer: FusedMoE, block: MixtralSparseMoeBlock) -> None:
    for name, tensor in per_expert_tensors(block).items():
        _, expert, shard, _ = name.split(".")
        param = layer.w2_weight if shard == "w2" else layer.w13_weight
        param.weight_loader(param, tensor, (int(expert), shard))


def test_stacked_loader_refuses_another_expert_count():
    layer = FusedMoE(NUM_EXPERTS, HIDDEN, INTER)
    with pytest.raises(ValueError, match="does not fit"):
        layer.w13_weight.weight_loader(layer.w13_weight, torch.zeros(NUM_EXPERTS + 1, 2 * INTER, HIDDEN))
    with pytest.raises(ValueError, match="does not fit"):
        layer.w2_weight.weight_loader(layer.w2_weight, torch.zeros(NUM_EXPERTS, HIDDEN + 1, INTER))
