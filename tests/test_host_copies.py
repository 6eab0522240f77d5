"""Nothing from the host per step, and a deterministic backward scatter.

Host copies: on a CPU-only machine there is no second device, so the model and its batch
are put on ``meta`` and a dispatch mode records every op that turns host (CPU) data into
device data (``_to_copy``/``copy_`` from a CPU tensor, ``lift_fresh`` of a Python literal).
Before the layers kept their masks, RoPE positions and key index as device buffers, a
causal GPT copied its mask (and RoPE its positions) in every forward; now a steady step
copies nothing (the batch is already on the device).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers.processes import cross_entropy, tiny_batch
from translution_dist.models import ModelConfig, build_model

VIT = dict(arch="vit", image_size=6, patch_size=2, channels=1, num_classes=5)
GPT = dict(arch="gpt", context_length=8, vocab_size=11)
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2)


class HostToDevice(TorchDispatchMode):
    """Records the ops that create device tensors from host data."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        from_host = any(t.device.type == "cpu" and t.dim() > 0 for t in inputs)  # 0-dim CPU scalars are free
        if (from_host and any(t.device.type != "cpu" for t in outputs)) or func is torch.ops.aten.lift_fresh.default:
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("fields", [
    {**GPT, "attention": "translution"},
    {**GPT, "attention": "alpha", "position": "rope"},
    {**GPT, "attention": "self_attention", "position": "relative_bias"},
    {**VIT, "attention": "translution", "relative": "v", "position": "rope"},
    {**VIT, "attention": "alpha", "bank_chunks": 2},
], ids=lambda f: f"{f['arch']}-{f['attention']}-{f.get('position', '')}")
def test_a_steady_step_copies_nothing_from_the_host(fields):
    cfg = ModelConfig(**TINY, **fields)
    with torch.device("meta"):
        model = build_model(cfg)
        batch = tuple(t.to("meta") for t in tiny_batch(cfg, 2, 0))
    cross_entropy(model, batch).backward()  # first step: plans and caches are built
    copies = HostToDevice()
    with copies:
        cross_entropy(model, batch).backward()
    assert copies.ops == []


def _grads(model: torch.nn.Module, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    cross_entropy(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


@contextlib.contextmanager
def _deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("fields", [{**VIT, "attention": "translution"}, {**GPT, "attention": "alpha"}],
                         ids=["vit-translution", "gpt-alpha"])
def test_deterministic_mode_scatters_by_segments_and_matches(fields):
    cfg = ModelConfig(**TINY, **fields)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    inputs, targets = tiny_batch(cfg, 3, 1)
    batch = (inputs.double() if inputs.is_floating_point() else inputs, targets)
    default = _grads(model, batch)
    with _deterministic(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        first, second = _grads(model, batch), _grads(model, batch)
    assert "aten::segment_reduce" in {event.key for event in profile.key_averages()}  # the deterministic path ran
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, b in zip(first, default):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # only the order of additions differs
