"""Compiled blocks under head parallelism, displacement parallelism and FSDP2 (gloo, 2 ranks).

``apply_compile`` after ``parallelize``, as the trainer orders it, against the unsharded eager
model: losses, gradients and weights over three AdamW steps. With tp or dispp each block
is one graph (``fullgraph``: the hooks' collectives trace), so both blocks share one traced
frame; under FSDP2 the bank chunks are units of their own, whose hooks split a block's graph.
"""

from __future__ import annotations

import pytest

from helpers.processes import compare_cases, run_in_processes

pytestmark = pytest.mark.multiprocess

VIT = dict(arch="vit", image_size=6, patch_size=2, channels=1, num_classes=5)
GPT = dict(arch="gpt", context_length=8, vocab_size=11)
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2)

CASES = {
    "tp-vit-translution": ({**VIT, "attention": "translution"}, dict(engine="none", tp=2)),
    "dispp-gpt-alpha": ({**GPT, "attention": "alpha", "bank_chunks": 2}, dict(engine="none", dispp=2)),
    "fsdp-vit-alpha-kv": ({**VIT, "attention": "alpha", "relative": "kv"}, dict(engine="fsdp")),
}


@pytest.fixture(scope="module")
def results() -> dict:
    cases = {name: dict(model_fields={**TINY, **model}, parallel_fields=parallel, compile_backend="aot_eager")
             for name, (model, parallel) in CASES.items()}
    return run_in_processes(compare_cases, 2, cases)[0]


@pytest.mark.parametrize("case", CASES)
def test_compiled_blocks_match_the_eager_single_process_model(results, case):
    result = results[case]
    assert isinstance(result, dict), result
    assert max(result[k] for k in ("loss", "grad", "param")) < 1e-5
    if not case.startswith("fsdp"):
        assert result["graphs"] == 1  # one fullgraph frame serves both blocks, all steps: no recompiles
