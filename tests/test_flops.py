"""The FLOP census against PyTorch's own FLOP counter on small models, and by hand on the paper's count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from translution_dist.models import ModelConfig, build_model
from translution_dist.models.flops import (
    allowed_pairs,
    executed_flops_per_sample,
    flop_terms,
    model_flops_per_sample,
)
from translution_dist.ops import pair_plan

BATCH = 3


def _gpt(attention: str, relative: str = "qkv") -> ModelConfig:
    return ModelConfig(arch="gpt", attention=attention, relative=relative, dim=16, heads=2, dim_head=8, depth=2,
                       mlp_dim=32, context_length=12, vocab_size=50)


def _planned_pairs(cfg: ModelConfig) -> int:
    """Pairs the kernels run for one bank, padding included (one chunk holds every pair at these sizes)."""
    layout = cfg.layout()
    plan = pair_plan(layout, layout.max_tokens, 10**9)
    return sum(d * p for d, p in (chunk.shape for chunk in plan.chunks))


def _counted(model: torch.nn.Module, tokens: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(tokens)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(("attention", "relative"), [("translution", "qkv"), ("translution", "v"),
                                                     ("translution", "qk"), ("alpha", "qkv"), ("alpha", "v"),
                                                     ("alpha", "k"), ("alpha", "qv")])
def test_matmul_terms_equal_torch_flop_counter(attention: str, relative: str) -> None:
    """Forward and executed forward + backward: every mm/bmm the model issues, padding pairs included."""
    cfg = _gpt(attention, relative)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, cfg.context_length))
    terms = [t for t in flop_terms(cfg, pairs=_planned_pairs(cfg)) if t.matmul]
    assert _counted(model, tokens, backward=False) == BATCH * sum(t.forward for t in terms)
    assert _counted(model, tokens, backward=True) == BATCH * sum(t.executed for t in terms)


def test_hybrid_counts_its_relative_and_its_plain_blocks() -> None:
    """One Translution block and one self-attention block: the mean of the two uniform models."""
    hybrid = _gpt("translution").model_copy(update={"relative_blocks": 1})
    assert model_flops_per_sample(hybrid) == (model_flops_per_sample(_gpt("translution"))
                                              + model_flops_per_sample(_gpt("self_attention"))) / 2


def test_self_attention_linears_equal_torch_flop_counter() -> None:
    """CPU SDPA is not counted by FlopCounterMode (no formula for its CPU kernel); every Linear is."""
    cfg = _gpt("self_attention")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, cfg.context_length))
    linears = [t for t in flop_terms(cfg) if t.name != "dense attention products"]
    assert _counted(model, tokens, backward=True) == BATCH * 3 * sum(t.forward for t in linears)


def test_full_translution_counts_nine_units_and_executes_twelve() -> None:
    """By hand: the issue's count for the terabyte GPT's blocks, 9 (model) and 12 (executed) × 2·P·C·C'."""
    cfg = ModelConfig(arch="gpt", attention="translution", dim=2048, depth=12, heads=16, dim_head=128,
                      mlp_dim=8192, context_length=2048, vocab_size=50257, bank_chunks=32)
    pairs = 2048 * 2049 // 2
    assert allowed_pairs(cfg.layout()) == pairs
    unit = 12 * 2 * pairs * 2048 * 2048
    banks = next(t for t in flop_terms(cfg) if t.name == "bank projections (per pair)")
    assert banks.model == 9 * unit and banks.executed == 12 * unit
    others = sum(t.model for t in flop_terms(cfg) if t.name != banks.name)
    assert model_flops_per_sample(cfg) == 9 * unit + others
    assert executed_flops_per_sample(cfg) - model_flops_per_sample(cfg) == 3 * unit
    assert 64 * model_flops_per_sample(cfg) == pytest.approx(1.22e17, rel=0.01)  # the 1.2·10¹⁷ per step


def test_vit_forward_equals_torch_flop_counter() -> None:
    cfg = ModelConfig(arch="vit", attention="translution", dim=16, heads=2, dim_head=8, depth=1, mlp_dim=32,
                      image_size=12, patch_size=4, channels=1, num_classes=10)
    model = build_model(cfg)
    images = torch.randn(BATCH, 1, 12, 12)
    with FlopCounterMode(display=False) as counter:
        model(images)
    terms = [t for t in flop_terms(cfg, pairs=_planned_pairs(cfg)) if t.matmul]
    assert counter.get_total_flops() == BATCH * sum(t.forward for t in terms)
