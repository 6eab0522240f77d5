"""Activation recomputation (``train.activation_checkpoint``) changes memory, never results.

Every mode gives bit-identical losses and gradients to no recomputation: in float64 in one
process (ViT and GPT, full Translution and α-Translution, over two AdamW steps), and in fp32
in real gloo processes under FSDP2 with ZeRO-3 sharding, head parallelism and displacement
parallelism, and under DeepSpeed ZeRO-3. The recomputation is checked to happen (the
recomputed modules run twice) and to save memory (autograd keeps less); the planner's
account of it is checked in ``tests/test_plan_memory.py``.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from helpers.processes import cross_entropy, prepare_deepspeed_on_cpu, run_in_processes, tiny_batch
from parallelism import ParallelDims, build_mesh, parallelize
from parallelism.activation_checkpoint import MODES, apply_activation_checkpoint
from parallelism.config import ParallelConfig
from parallelism.deepspeed_zero import build_deepspeed_engine
from training.config import ConfigError, OptimSection, load_config
from translution_dist.models import ModelConfig, build_model

VIT = dict(arch="vit", image_size=6, patch_size=2, channels=1, num_classes=5)  # 10 tokens
GPT = dict(arch="gpt", context_length=8, vocab_size=11)
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2, bank_chunks=2)
MODELS = {f"{arch}-{attention}": {**shape, **TINY, "attention": attention}
          for arch, shape in (("vit", VIT), ("gpt", GPT)) for attention in ("translution", "alpha")}
RECOMPUTING = [mode for mode in MODES if mode != "none"]


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(model: nn.Module, cfg: ModelConfig, steps: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """Losses and (gathered) gradients of ``steps`` AdamW steps on fixed batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    losses, grads = [], []
    for step in range(steps):
        inputs, targets = tiny_batch(cfg, batch_size=2, seed=step)
        loss = cross_entropy(model, (inputs.to(dtype) if inputs.is_floating_point() else inputs, targets))
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: _full(p.grad).clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads}


def _differences(a: dict, b: dict) -> list[str]:
    """Names of the losses and gradients that are not bit-identical."""
    wrong = [f"loss of step {i}" for i, (x, y) in enumerate(zip(a["losses"], b["losses"])) if not torch.equal(x, y)]
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        assert ga.keys() == gb.keys(), "parameter names changed"
        wrong += [f"step {step} grad of {name}" for name in ga if not torch.equal(ga[name], gb[name])]
    return wrong


@pytest.mark.parametrize("mode", RECOMPUTING)
@pytest.mark.parametrize("name", MODELS)
def test_recomputation_is_exact_in_one_process(name, mode):
    cfg = ModelConfig(**MODELS[name])
    torch.manual_seed(0)
    reference = build_model(cfg).double()
    model = apply_activation_checkpoint(copy.deepcopy(reference), mode)
    assert _differences(_train(reference, cfg, dtype=torch.float64), _train(model, cfg, dtype=torch.float64)) == []


@pytest.mark.parametrize(("mode", "expected"), [("block", {"attn": 2, "ff.up_proj": 2, "head": 1}),
                                               ("selective", {"attn": 1, "ff.up_proj": 2, "head": 1})])
def test_the_chosen_modules_run_again_in_backward(mode, expected):
    cfg = ModelConfig(**MODELS["gpt-translution"])
    model = apply_activation_checkpoint(build_model(cfg), mode)
    calls = dict.fromkeys(expected, 0)
    block = model.encoder.blocks[0]
    for name, module in (("attn", block.attn), ("ff.up_proj", block.ff.up_proj), ("head", model.head)):
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    cross_entropy(model, tiny_batch(cfg, 2, seed=0)).backward()
    assert calls == expected


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_recomputation_keeps_less(arch):
    """What autograd keeps outside checkpointed regions: less with selective, least with block."""
    cfg = ModelConfig(**MODELS[f"{arch}-translution"])
    kept = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = apply_activation_checkpoint(build_model(cfg), mode)
        sizes: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = cross_entropy(model, tiny_batch(cfg, 2, seed=0))
        kept[mode] = sum(sizes.values())
        loss.backward()
    assert kept["block"] < kept["selective"] < kept["none"], kept


def test_applying_twice_or_an_unknown_mode_is_refused():
    model = apply_activation_checkpoint(build_model(ModelConfig(**MODELS["vit-alpha"])), "block")
    with pytest.raises(ValueError, match="applied twice"):
        apply_activation_checkpoint(model, "block")
    with pytest.raises(ValueError, match="activation_checkpoint must be one of none, block, selective"):
        apply_activation_checkpoint(model, "attention")


def test_config_field_is_validated(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {arch: gpt, attention: translution, preset: tiny, context_length: 8, vocab_size: 11}\n"
                      "data: {kind: synthetic, synthetic: {task: text, context_length: 8, vocab_size: 11}}\n")
    assert load_config(config, ["train.activation_checkpoint=selective"]).train.activation_checkpoint == "selective"
    with pytest.raises(ConfigError, match="train.activation_checkpoint"):
        load_config(config, ["train.activation_checkpoint=attention"])


# -- several processes --------------------------------------------------------------------------

PARALLEL_CASES = {  # name: (model, parallel layout, mode); all on 2 ranks
    "FSDP2 dp_shard=2, vit-translution, block": (MODELS["vit-translution"], dict(engine="fsdp"), "block"),
    "FSDP2 dp_shard=2, gpt-alpha, selective": (MODELS["gpt-alpha"], dict(engine="fsdp"), "selective"),
    "FSDP2 + tp=2, gpt-translution, block": (MODELS["gpt-translution"], dict(engine="fsdp", tp=2), "block"),
    "FSDP2 + dispp=2, vit-alpha, block": (MODELS["vit-alpha"], dict(engine="fsdp", dispp=2), "block"),
    "FSDP2 + dispp=2, gpt-translution, selective": (MODELS["gpt-translution"], dict(engine="fsdp", dispp=2),
                                                    "selective"),
}


def _compare_parallel(rank: int, world_size: int, cases: dict) -> dict[str, list[str]]:
    """Each case's layout trained with and without recomputation; what differs, per case."""
    results = {}
    for name, (model_fields, parallel_fields, mode) in cases.items():
        cfg = ModelConfig(**model_fields)
        dims = ParallelDims.resolve(ParallelConfig(**parallel_fields), world_size)
        runs = []
        for recompute in ("none", mode):
            torch.manual_seed(0)
            model = apply_activation_checkpoint(build_model(cfg), recompute)
            parallelize(model, dims, build_mesh(dims, "cpu"))
            runs.append(_train(model, cfg))
        results[name] = _differences(*runs)
    return results


@pytest.mark.multiprocess
def test_recomputation_is_exact_under_fsdp2_tp_and_dispp():
    results = run_in_processes(_compare_parallel, 2, PARALLEL_CASES)
    for rank_results in results:
        assert rank_results == {name: [] for name in PARALLEL_CASES}


def _compare_deepspeed(rank: int, world_size: int, modes: list[str]) -> dict[str, list[str]]:
    from deepspeed.utils import safe_get_full_grad

    cfg = ModelConfig(**MODELS["gpt-translution"])
    layout = ParallelConfig(engine="deepspeed", offload_param="cpu", offload_optimizer="cpu", backend="gloo")
    runs = {}
    for mode in ("none", *modes):
        torch.manual_seed(0)
        engine = build_deepspeed_engine(partial(_checkpointed_model, cfg, mode), layout, OptimSection(),
                                        micro_batch_size=1, cpu_adam=False)
        losses, grads = [], []
        for step in range(2):
            inputs, targets = tiny_batch(cfg, batch_size=2, seed=step)
            loss = cross_entropy(engine, (inputs[rank:rank + 1], targets[rank:rank + 1]))
            engine.backward(loss)
            losses.append(loss.detach())
            grads.append({name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()})
            engine.step()
        runs[mode] = {"losses": losses, "grads": grads}
    return {mode: _differences(runs["none"], runs[mode]) for mode in modes}


def _checkpointed_model(cfg: ModelConfig, mode: str) -> nn.Module:
    return apply_activation_checkpoint(build_model(cfg), mode)


@pytest.mark.multiprocess
@pytest.mark.slow  # 40 s; the FSDP2/tp/dispp test above runs by default
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_recomputation_is_exact_under_deepspeed_zero3():
    pytest.importorskip("deepspeed")
    prepare_deepspeed_on_cpu()
    results = run_in_processes(_compare_deepspeed, 2, RECOMPUTING)
    for rank_results in results:
        assert rank_results == {mode: [] for mode in RECOMPUTING}
