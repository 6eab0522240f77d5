"""Head parallelism (tp=2, two gloo processes) trains exactly like one process.

Every case takes 3 AdamW steps next to the unsharded model of the same seed: losses, every
gradient (gathered with ``full_tensor``) and the final weights agree to 1e-5 in fp32. All
cases run in one spawn of two processes.
"""

from __future__ import annotations

import pytest

from helpers.processes import compare_cases, run_in_processes

pytestmark = pytest.mark.multiprocess  # every test here starts processes

VIT = dict(arch="vit", image_size=6, patch_size=2, channels=1, num_classes=5)  # 3×3 grid: 10 tokens, K=28
GPT = dict(arch="gpt", context_length=8, vocab_size=11)  # an odd vocabulary: uneven vocab-parallel shards
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2)
TP2 = dict(engine="none", tp=2)

CASES = {
    "vit-translution": ({**VIT, "attention": "translution"}, TP2),
    "vit-alpha": ({**VIT, "attention": "alpha", "bank_chunks": 2}, TP2),
    "gpt-translution": ({**GPT, "attention": "translution", "bank_chunks": 2}, TP2),
    "gpt-alpha-vocab-parallel": ({**GPT, "attention": "alpha"}, {**TP2, "vocab_parallel": True}),
    # plain q projection (column-parallel) beside k/v banks: each bank chunk completes its own input gradient
    "vit-translution-relative-kv": ({**VIT, "attention": "translution", "relative": "kv", "bank_chunks": 3}, TP2),
    "gpt-self-attention-rope": ({**GPT, "attention": "self_attention", "position": "rope"},
                                {**TP2, "vocab_parallel": True}),
    # α subsets: a score side without a bank (k_down, q_down) is column-parallel; no v_up without v;
    # a hybrid's self-attention block; rotary α; a rectangular grid with mean pooling
    "vit-alpha-q-hybrid": ({**VIT, "attention": "alpha", "relative": "q", "relative_blocks": 1, "bank_chunks": 2},
                           TP2),
    "gpt-alpha-kv-rope": ({**GPT, "attention": "alpha", "relative": "kv", "position": "rope"}, TP2),
    "vit-translution-v-rope-rectangular": ({**VIT, "image_size": [4, 6], "attention": "translution", "relative": "v",
                                            "position": "rope", "pool": "mean"}, TP2),
}


@pytest.fixture(scope="module")
def results() -> dict:
    cases = {name: dict(model_fields={**TINY, **model}, parallel_fields=parallel)
             for name, (model, parallel) in CASES.items()}
    return run_in_processes(compare_cases, 2, cases)[0]


@pytest.mark.parametrize("case", CASES)
def test_tp2_matches_single_process(results, case):
    result = results[case]
    assert isinstance(result, dict), result
    assert max(result.values()) < 1e-5
