"""Megatron-core on CPU/gloo next to the project's own model, for the Megatron spec's tests.

Megatron's tensor-parallel gather allocates its output on ``torch.cuda.current_device()``; on a
CPU-only torch that call fails, so :func:`init_megatron_on_cpu` points it at the CPU. That
redirection is the only one these tests need, and it lives here, never in the shipped code.
:func:`load_encoder` loads the project's ``Encoder`` (blocks and final norm) into a Megatron
``TransformerBlock`` built from :func:`parallelism.megatron_spec.translution_layer_spec`.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from parallelism.megatron_spec import load_attention_shard, translution_layer_spec
from translution_dist.models import ModelConfig
from translution_dist.models.blocks import Encoder


def init_megatron_on_cpu(tensor_parallel: int) -> None:
    """Megatron's parallel state over the gloo world, its device allocations on the CPU."""
    torch.cuda.current_device = lambda: "cpu"
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)


def megatron_config(cfg: ModelConfig, **overrides) -> TransformerConfig:
    """The ``TransformerConfig`` of ``cfg``'s encoder: same widths, no dropout, weights built on the CPU."""
    d = cfg.dims
    fields = dict(num_layers=d.depth, hidden_size=d.dim, num_attention_heads=d.heads, kv_channels=d.dim_head,
                  ffn_hidden_size=d.mlp_dim, use_cpu_initialization=True, hidden_dropout=0.0,
                  attention_dropout=0.0)
    return TransformerConfig(**{**fields, **overrides})


def _shard(weight: torch.Tensor, dim: int) -> torch.Tensor:
    rank = parallel_state.get_tensor_model_parallel_rank()
    return weight.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=dim)[rank]


@torch.no_grad()
def _copy_norm(target: nn.LayerNorm, source: nn.LayerNorm) -> None:
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)


@torch.no_grad()
def load_encoder(block: TransformerBlock, encoder: nn.Module) -> None:
    """Set ``block`` (Megatron layers, this rank's shards) to the weights of the project's ``encoder``."""
    for layer, source in zip(block.layers, encoder.blocks, strict=True):
        _copy_norm(layer.input_layernorm, source.attn.norm)
        load_attention_shard(layer.self_attention, source.attn)
        _copy_norm(layer.pre_mlp_layernorm, source.ff.norm)
        layer.mlp.linear_fc1.weight.copy_(_shard(source.ff.up_proj.weight, 0))
        layer.mlp.linear_fc1.bias.copy_(_shard(source.ff.up_proj.bias, 0))
        layer.mlp.linear_fc2.weight.copy_(_shard(source.ff.down_proj.weight, 1))
        layer.mlp.linear_fc2.bias.copy_(source.ff.down_proj.bias)
    _copy_norm(block.final_layernorm, encoder.norm)


def _max_error(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float) -> float:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    return float((actual - expected).detach().abs().max())


def _block(cfg: ModelConfig, **config_overrides) -> TransformerBlock:
    spec = translution_layer_spec(cfg.layout(), cfg.attention, cfg.relative, cfg.alpha_rank, cfg.bank_chunks)
    return TransformerBlock(megatron_config(cfg, **config_overrides), spec=spec).double()


def compare_with_encoder(model_fields: dict, tol: float = 1e-10) -> dict[str, float]:
    """Forward and backward of a Megatron ``TransformerBlock`` against the project's ``Encoder``, float64.

    Both hold the same weights (the Megatron block this rank's shards); the output, the input's
    gradient and every parameter's gradient (this rank's shard of the reference's) must agree to
    ``tol``. Returns the largest difference of each kind.
    """
    cfg = ModelConfig(arch="gpt", **model_fields)
    torch.manual_seed(0)
    encoder = Encoder(cfg, cfg.layout(), causal=True).double()
    block = _block(cfg)
    load_encoder(block, encoder)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.context_length, cfg.dims.dim, dtype=torch.float64, generator=generator)
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    x_ref, x_meg = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()
    y_ref, y_meg = encoder(x_ref), block(x_meg, attention_mask=None)
    y_ref.backward(grad_out)
    y_meg.backward(grad_out.transpose(0, 1))
    errors = {"output": _max_error(y_meg.transpose(0, 1), y_ref, "output", tol),
              "input grad": _max_error(x_meg.grad.transpose(0, 1), x_ref.grad, "input grad", tol)}
    # The reference's gradients, sharded as its weights are: load them as the weights of a second block.
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(p.grad)
    expected = _block(cfg, perform_initialization=False)
    load_encoder(expected, encoder)
    expected_params = dict(expected.named_parameters())
    errors["grad"] = max(_max_error(p.grad, expected_params[name], f"grad of {name}", tol)
                         for name, p in block.named_parameters())
    return errors


def train_gpt_model(model_fields: dict, steps: int) -> list[float]:
    """Losses of ``steps`` Adam steps of a Megatron ``GPTModel`` built with the Translution layer spec."""
    cfg = ModelConfig(arch="gpt", **model_fields)
    torch.manual_seed(0)
    spec = translution_layer_spec(cfg.layout(), cfg.attention, cfg.relative, cfg.alpha_rank, cfg.bank_chunks)
    model = GPTModel(megatron_config(cfg), transformer_layer_spec=spec, vocab_size=cfg.vocab_size,
                     max_sequence_length=cfg.context_length, position_embedding_type="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(cfg.vocab_size, (2, cfg.context_length + 1), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], position_ids=None, attention_mask=None, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def checkpoint_shards(model_fields: dict) -> dict[str, tuple]:
    """``(global_shape, global_offset)`` of each tensor of the first layer's attention in Megatron's
    ``sharded_state_dict``, the description ``dist_checkpointing`` saves and reshards by."""
    cfg = ModelConfig(arch="gpt", **model_fields)
    state = _block(cfg, perform_initialization=False).sharded_state_dict()
    prefix = "layers.0.self_attention."
    return {key[len(prefix):]: (tuple(t.global_shape), tuple(t.global_offset))
            for key, t in state.items() if key.startswith(prefix) and hasattr(t, "global_shape")}


def megatron_checks(rank: int, world_size: int, compare: dict[str, dict], train: dict[str, dict],
                    steps: int) -> dict[str, object]:
    """One spawn's worth of checks at ``tp = world_size``: each comparison's errors (or its failure message),
    each training run's losses, and each compared model's checkpoint shards (under ``"shards"``)."""
    init_megatron_on_cpu(world_size)
    results: dict[str, object] = {"shards": {name: checkpoint_shards(fields) for name, fields in compare.items()}}
    for name, fields in compare.items():
        try:
            results[name] = compare_with_encoder(fields)
        except AssertionError as err:
            results[name] = str(err)
    for name, fields in train.items():
        results[name] = train_gpt_model(fields, steps)
    return results
