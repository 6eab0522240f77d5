"""torch.compile of the Translution kernels: one graph, no recompiles, eager's numbers.

The kernels are custom operators (``translution::pair_scores`` / ``pair_values`` and their
backward ops) with fake implementations, so Dynamo traces a whole model with
``fullgraph=True`` (any graph break raises) and AOTAutograd differentiates through them.
``aot_eager`` runs the traced graphs with eager kernels, so outputs and gradients must agree
with eager *exactly*; Inductor (slow) generates its own code for the layers around the
kernels, so it is compared to a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers.processes import cross_entropy, tiny_batch
from parallelism.compile import apply_compile
from training.config import ConfigError, load_config
from translution_dist.models import ModelConfig, build_model
from translution_dist.ops import CausalLayout, ImageGridLayout, pair_plan
from translution_dist.ops.relative_attention import _pair_scores_op, _pair_values_op

VIT = dict(arch="vit", image_size=6, patch_size=2, channels=1, num_classes=5)  # 3×3 grid, 10 tokens
GPT = dict(arch="gpt", context_length=8, vocab_size=11)
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2)

CASES = {
    "vit-translution": {**VIT, "attention": "translution", "bank_chunks": 2},
    "vit-alpha": {**VIT, "attention": "alpha"},
    "gpt-translution": {**GPT, "attention": "translution"},
    "gpt-alpha-qv-hybrid": {**GPT, "attention": "alpha", "relative": "qv", "relative_blocks": 1, "bank_chunks": 2},
}
MORE_CASES = {  # the other relative subsets and positions (slow: a few seconds each on loaded cores)
    "gpt-alpha": {**GPT, "attention": "alpha"},
    "vit-translution-qk": {**VIT, "attention": "translution", "relative": "qk"},
    "gpt-translution-v-rope": {**GPT, "attention": "translution", "relative": "v", "position": "rope"},
    "vit-alpha-k": {**VIT, "attention": "alpha", "relative": "k"},
    "gpt-translution-q": {**GPT, "attention": "translution", "relative": "q"},
    "vit-alpha-kv-rope": {**VIT, "attention": "alpha", "relative": "kv", "position": "rope"},
    "gpt-self-attention-relative-bias": {**GPT, "attention": "self_attention", "position": "relative_bias"},
}


def _model(fields: dict) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(**TINY, **fields)
    torch.manual_seed(0)
    return build_model(cfg).double(), cfg


def _batch(cfg: ModelConfig, seed: int):
    inputs, targets = tiny_batch(cfg, 3, seed)
    return (inputs.double() if inputs.is_floating_point() else inputs), targets


def _loss_and_grads(model: torch.nn.Module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = cross_entropy(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def compiled_matches_eager(fields: dict, backend: str, **compile_kwargs) -> CompileCounterWithBackend:
    """Two steps (different data) compiled with ``fullgraph=True`` against eager; returns the counter."""
    model, cfg = _model(fields)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, **compile_kwargs)
    for seed in (1, 2):
        batch = _batch(cfg, seed)
        loss, grads = _loss_and_grads(model, batch)
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        if backend == "aot_eager":
            assert torch.equal(loss_c, loss)
            assert all(torch.equal(a, b) for a, b in zip(grads_c, grads))
        else:
            torch.testing.assert_close(loss_c, loss, rtol=1e-9, atol=1e-9)
            for a, b in zip(grads_c, grads):
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    return counter


@pytest.mark.parametrize("case", CASES)
def test_whole_model_compiles_in_one_graph_and_matches_eager_exactly(case):
    counter = compiled_matches_eager(CASES[case], "aot_eager")
    assert counter.frame_count == 1  # one graph, traced once: the second step reuses it (no recompile)


@pytest.mark.slow
@pytest.mark.parametrize("case", MORE_CASES)
def test_every_subset_compiles_in_one_graph_and_matches_eager_exactly(case):
    assert compiled_matches_eager(MORE_CASES[case], "aot_eager").frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vit-translution", "gpt-alpha-qv-hybrid"])
def test_inductor_matches_eager(case):
    assert compiled_matches_eager(CASES[case], "inductor").frame_count == 1


@pytest.mark.parametrize("layout", [ImageGridLayout(2, 2), CausalLayout(5)], ids=["grid", "causal"])
def test_custom_ops_pass_opcheck(layout):
    """Fake implementations, autograd registration and schema agree with the real kernels."""
    n = layout.max_tokens
    spec = list(pair_plan(layout, n, 8).spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, 4, dtype=torch.double, generator=g, requires_grad=True)
    y = torch.randn(2, n, 4, dtype=torch.double, generator=g, requires_grad=True)
    w = torch.randn(layout.num_displacements, 4, 4, dtype=torch.double, generator=g, requires_grad=True)
    attn = torch.rand(2, 2, n, n, dtype=torch.double, generator=g, requires_grad=True)
    torch.library.opcheck(_pair_scores_op, (x, None, w, w.detach().clone().requires_grad_(), spec, 2, 0.5))
    torch.library.opcheck(_pair_scores_op, (x, y, None, w, spec, 2, 0.5))
    torch.library.opcheck(_pair_values_op, (attn, x, w, spec))
    torch.library.opcheck(_pair_values_op, (attn, y, None, spec))


def test_trainer_compiles_every_block_and_refuses_deepspeed(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {arch: gpt, attention: translution, preset: tiny, context_length: 8, vocab_size: 11}\n"
                      "data: {kind: synthetic, synthetic: {task: text, context_length: 8, vocab_size: 11}}\n")
    cfg = load_config(config, ["train.compile=true", "train.compile_mode=reduce-overhead"])
    assert (cfg.train.compile, cfg.train.compile_mode) == (True, "reduce-overhead")
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config(config, ["train.compile_mode=fast"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(config, ["train.compile=true", "parallel.engine=deepspeed"])
    model, _ = _model(CASES["gpt-translution"])
    apply_compile(model, "default")
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in model.encoder.blocks)
