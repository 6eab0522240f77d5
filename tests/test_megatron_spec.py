"""The Megatron-core spec (``parallelism.megatron_spec``) at tensor parallelism 2 on two gloo processes.

A Megatron ``TransformerBlock`` built from the Translution layer spec, holding the project's
``Encoder``'s weights split by heads, gives the same output and gradients in float64; a
``GPTModel(transformer_layer_spec=…)`` trains. All cases run in one spawn of two processes.
Without megatron-core the project still imports, and the spec's module says how to install it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.processes import run_in_processes

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, context_length=8, vocab_size=12, alpha_rank=2)
COMPARE = {
    "translution": {**TINY, "attention": "translution", "bank_chunks": 2},
    # a plain (column-parallel) q projection beside the k and v banks
    "translution-relative-kv": {**TINY, "attention": "translution", "relative": "kv"},
    "alpha": {**TINY, "attention": "alpha", "bank_chunks": 2},
}
TRAIN = {"train-translution": {**TINY, "attention": "translution"}, "train-alpha": {**TINY, "attention": "alpha"}}
STEPS = 5


@pytest.fixture(scope="module")
def results() -> list[dict]:
    pytest.importorskip("megatron.core")
    from helpers.megatron_cpu import megatron_checks

    return run_in_processes(megatron_checks, 2, COMPARE, TRAIN, STEPS)


def test_without_megatron_core_the_project_imports_and_the_spec_names_the_extra():
    blocked = ("import sys; sys.modules['megatron'] = None\n"
               "import launcher.cli, parallelism, training\n"
               "try:\n    import parallelism.megatron_spec\n"
               "except ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'translution-dist[megatron]'" in result.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", COMPARE)
def test_block_matches_project_encoder(results, case):
    for rank_results in results:
        errors = rank_results[case]
        assert isinstance(errors, dict), errors
        assert max(errors.values()) < 1e-10, errors


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", TRAIN)
def test_gpt_model_trains(results, case):
    losses = [rank_results[case] for rank_results in results]
    assert losses[0] == losses[1], "the tensor-parallel ranks disagree on the loss"
    assert losses[0][-1] < 0.9 * losses[0][0], losses[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", COMPARE)
def test_checkpoint_declares_head_shards(results, case):
    """dist_checkpointing sees each rank's bank as its heads' columns of the whole bank, not as a replica."""
    shards = [rank_results["shards"][case] for rank_results in results]
    banks = [key for key in shards[0] if "banks" in key]
    assert banks
    for key in banks:
        (shape0, offset0), (shape1, offset1) = shards[0][key], shards[1][key]
        assert shape0 == shape1, key
        # the last axis is the bank's output axis (Megatron prepends the layer axis to the block's tensors)
        assert offset0[-1] == 0 and offset1[-1] == shape0[-1] // 2, (key, offset0, offset1)
    shape, offset = shards[1]["linear_proj.weight"]
    assert shape[-2:] == (TINY["dim"], TINY["heads"] * TINY["dim_head"]) and offset[-1] == shape[-1] // 2
