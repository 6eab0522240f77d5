"""The memory-bounded operators against the naive materializing reference: exactly in float64,
and within rounding in fp32 and under bf16 autocast.

``TRANSLUTION_TEST_DEVICE=cuda`` runs them on the GPU (``benchmarks/gpu_check.sh`` does); the
module is skipped when that device is not there.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers.reference import naive_alpha_translution, naive_translution
from translution_dist.models.attention import (
    RELATIVE_SUBSETS,
    AlphaTranslutionAttention,
    TranslutionAttention,
    set_pair_chunk_bytes,
)
from translution_dist.ops import CausalLayout, ImageGridLayout

DEVICE = torch.device(os.environ.get("TRANSLUTION_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRANSLUTION_TEST_DEVICE=cuda, but CUDA is not available", allow_module_level=True)

LAYOUTS = [
    pytest.param(ImageGridLayout(3, 5), 16, id="grid3x5"),
    pytest.param(ImageGridLayout(2, 2), 5, id="grid2x2"),
    pytest.param(CausalLayout(7), 7, id="causal-full"),
    pytest.param(CausalLayout(9), 5, id="causal-short"),
]


def _outputs_and_grads(layer: torch.nn.Module, forward, x: torch.Tensor, grad: torch.Tensor):
    out = forward(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    return [out, *grads]


def _assert_matches(layer: torch.nn.Module, naive, n: int) -> None:
    torch.manual_seed(1)
    layer.to(DEVICE)
    x = torch.randn(2, n, layer.norm.normalized_shape[0], dtype=torch.float64).to(DEVICE).requires_grad_()
    grad = torch.randn(2, n, layer.out_proj.out_features, dtype=torch.float64).to(DEVICE)
    set_pair_chunk_bytes(layer, 4096)  # many small pair chunks, padding included
    ours = _outputs_and_grads(layer, layer, x, grad)
    reference = _outputs_and_grads(layer, lambda t: naive(layer, t), x, grad)
    names = ["output", "x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout,n", LAYOUTS)
@pytest.mark.parametrize("relative", RELATIVE_SUBSETS)
@pytest.mark.parametrize("bank_chunks", [1, 3])
def test_translution_matches_reference(layout, n, relative, bank_chunks):
    torch.manual_seed(0)
    layer = TranslutionAttention(layout, dim=12, heads=3, dim_head=4, relative=relative, bank_chunks=bank_chunks)
    _assert_matches(layer.double(), naive_translution, n)


@pytest.mark.parametrize("layout,n", LAYOUTS)
@pytest.mark.parametrize("bank_chunks", [1, 4])
def test_alpha_translution_matches_reference(layout, n, bank_chunks):
    torch.manual_seed(0)
    layer = AlphaTranslutionAttention(layout, dim=12, heads=3, dim_head=4, rank=2, bank_chunks=bank_chunks)
    _assert_matches(layer.double(), naive_alpha_translution, n)


@pytest.mark.parametrize("layout,n", [LAYOUTS[0], LAYOUTS[3]])
@pytest.mark.parametrize("relative", [r for r in RELATIVE_SUBSETS if r != "qkv"])
def test_alpha_translution_subsets_match_reference(layout, n, relative):
    """LoR_Q … LoR_KV: outputs and every gradient, a bank-less score side included."""
    torch.manual_seed(0)
    layer = AlphaTranslutionAttention(layout, dim=12, heads=3, dim_head=4, rank=2, bank_chunks=2, relative=relative)
    _assert_matches(layer.double(), naive_alpha_translution, n)


def test_pair_chunk_budget_does_not_change_results():
    torch.manual_seed(0)
    layer = TranslutionAttention(ImageGridLayout(4, 3), dim=8, heads=2, dim_head=4).double().to(DEVICE)
    x = torch.randn(3, 13, 8, dtype=torch.float64).to(DEVICE)
    results = []
    for budget in (256, 4096, 1 << 30):
        set_pair_chunk_bytes(layer, budget)
        results.append(layer(x))
    for other in results[1:]:
        torch.testing.assert_close(results[0], other, rtol=1e-12, atol=1e-12)


def test_bank_round_trips_through_displacement_order():
    layer = TranslutionAttention(CausalLayout(10), dim=4, heads=1, dim_head=4, bank_chunks=3)
    official = torch.randn(10, 4, 4)
    layer.load_bank("k", official)
    assert torch.equal(layer.bank("k").detach(), official)
    assert [chunk.rows for chunk in layer.score_banks] == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize("layout,n", [LAYOUTS[0], LAYOUTS[3]])
def test_per_sample_bank_reference_is_the_same_function(layout, n):
    """The benchmark's official-style baseline (a broadcast matmul per sample) computes what the others do."""
    torch.manual_seed(0)
    layer = TranslutionAttention(layout, dim=12, heads=3, dim_head=4).double()
    _assert_matches(layer, lambda module, t: naive_translution(module, t, per_sample_bank=True), n)


@pytest.mark.parametrize("relative", RELATIVE_SUBSETS)
def test_bf16_autocast_runs_every_subset(relative):
    """Under autocast a plain side arrives in bf16 and a relative one in fp32; both kernels take the mix."""
    torch.manual_seed(0)
    layer = TranslutionAttention(ImageGridLayout(3, 3), dim=12, heads=3, dim_head=4, relative=relative).to(DEVICE)
    x = torch.randn(2, 10, 12).to(DEVICE).requires_grad_()
    reference = layer(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.02)


LOW_PRECISION = {"fp32": 2e-5, "bf16": 3e-2}
"""Largest error allowed, relative to the largest magnitude of the float64 result."""


@pytest.mark.parametrize("precision", LOW_PRECISION)
@pytest.mark.parametrize("attention", ["translution", "alpha"])
@pytest.mark.parametrize("layout,n", [LAYOUTS[0], LAYOUTS[2]])
def test_low_precision_matches_float64(layout, n, attention, precision):
    """The training dtypes: fp32, and bf16 autocast (bf16 kernels, fp32 weights and gradients), against
    the kernels in float64; output, input gradient and every parameter gradient."""
    torch.manual_seed(0)
    if attention == "translution":
        layer = TranslutionAttention(layout, dim=48, heads=3, dim_head=16, bank_chunks=2)
    else:
        layer = AlphaTranslutionAttention(layout, dim=48, heads=3, dim_head=16, rank=4, bank_chunks=2)
    layer.to(DEVICE)
    x = torch.randn(4, n, 48, device=DEVICE)
    grad = torch.randn(4, n, 48, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        ours = _outputs_and_grads(layer, layer, x.requires_grad_(), grad)
    exact = _outputs_and_grads(layer.double(), layer, x.detach().double().requires_grad_(), grad.double())
    names = ["output", "x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, ours, exact, strict=True):
        error = float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())
        assert error <= LOW_PRECISION[precision], f"{name}: error {error:.2e} relative to max |{name}|"
