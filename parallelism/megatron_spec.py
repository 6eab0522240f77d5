"""Translution and α-Translution self-attention for Megatron-core, as ``ModuleSpec``\\ s.

A Megatron-LM user builds ``GPTModel(config, transformer_layer_spec=translution_layer_spec(layout), …,
position_embedding_type="none")``: each ``TransformerLayer`` keeps Megatron's own input norm, MLP,
bias-dropout-add and final norm, and its ``self_attention`` is one of the modules here.

Heads are split over Megatron's tensor-parallel group as :mod:`parallelism.tensor_parallel` splits
them over a ``tp`` mesh, with Megatron's layers instead of DTensors (its DDP, optimizer and gradient
clipping expect plain tensors carrying ``tensor_model_parallel`` attributes):

* Translution: each rank holds its heads' columns of every bank ``[K, C, heads/tp·d]`` (and of the
  plain q/k/v projections a ``relative`` subset leaves), computes those heads for every pair with
  the project's kernels and no communication, and projects out through ``RowParallelLinear``
  (``linear_proj``, whose all-reduce sums the heads). The input is replicated, so its gradient is
  completed once where it enters (Megatron's ``copy_to_tensor_model_parallel_region``).
* α-Translution: ``linear_qkv`` is a ``ColumnParallelLinear`` by heads (Megatron's per-head
  ``[q, k, v]`` layout); the down projections ``C → h·r`` stay replicated and their outputs'
  gradients are completed; banks ``[K, h·r, h·r]`` are split on the output axis; ``linear_v_up``
  is a ``ColumnParallelLinear`` over the gathered ``h·r`` low-rank values.

Weights start as the project's layer does (:mod:`translution_dist.models.attention`): each rank
builds the whole layer from the default generator, which Megatron seeds alike on the ranks of a
``tp`` group, and keeps its heads (:func:`load_attention_shard` loads a given layer the same way).
Not supported: sequence and context parallelism, KV-cache inference, rotary embeddings (the banks
carry the positions), Transformer Engine layers. Megatron-core is imported here only, so the rest
of the package works without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "parallelism.megatron_spec needs megatron-core; install it with: pip install 'translution-dist[megatron]'"
    ) from error

from translution_dist.models.attention import (
    AlphaTranslutionAttention,
    RelativeAttentionBase,
    TranslutionAttention,
    bank_chunk_modules,
)
from translution_dist.ops import RelativeLayout


def _copy_to_tp_region(x: Tensor, group) -> Tensor:
    """Identity forward, gradient summed over ``group`` backward (Megatron's ``copy_to_tensor_model_parallel_region``).

    Megatron all-reduces ``grad.contiguous()`` in place, so a non-contiguous gradient (the
    transposes around the kernels make some) would be summed in a copy and lost: make it contiguous first.
    """
    y = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)
    if y.requires_grad:
        y.register_hook(Tensor.contiguous)
    return y


@dataclass
class TranslutionSubmodules:
    """Megatron layers of :class:`TranslutionSelfAttention`."""

    linear_proj: ModuleSpec | type = RowParallelLinear


@dataclass
class AlphaTranslutionSubmodules:
    """Megatron layers of :class:`AlphaTranslutionSelfAttention`."""

    linear_qkv: ModuleSpec | type = ColumnParallelLinear
    linear_v_up: ModuleSpec | type = ColumnParallelLinear
    linear_proj: ModuleSpec | type = RowParallelLinear


class _HeadParallelAttention(MegatronModule):
    """What both layers share: the ``tp`` group, this rank's heads, checks, ``linear_proj``.

    Inputs and outputs are Megatron's ``[s, b, h]``; the forward returns ``(output, bias)`` as
    Megatron's ``SelfAttention`` does (the bias is added by the layer's bias-dropout-add).
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int, layout: RelativeLayout,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        if config.sequence_parallel or config.context_parallel_size > 1:
            raise ValueError("Translution attention supports neither sequence_parallel nor context parallelism; "
                             "set sequence_parallel=False and context_parallel_size=1")
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise ValueError(f"Translution attention has no grouped-query variant; set num_query_groups=None "
                             f"(got {config.num_query_groups} for {config.num_attention_heads} heads)")
        self.layer_number = layer_number
        self.layout = layout
        self.tp_group = pg_collection.tp if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_group()
        self.tp_size = torch.distributed.get_world_size(self.tp_group)
        self.tp_rank = torch.distributed.get_rank(self.tp_group)
        heads = config.num_attention_heads
        if heads % self.tp_size:
            raise ValueError(f"num_attention_heads ({heads}) must be divisible by the tensor-parallel size "
                             f"({self.tp_size}): each rank holds whole heads")
        self.dim_head = config.kv_channels
        self.local_heads = heads // self.tp_size
        self.linear_proj = build_module(
            submodules.linear_proj, heads * self.dim_head, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=self.tp_group)

    def _local_module(self, module: nn.Module) -> nn.Module:
        """``module`` on the device and dtype Megatron's own layers of this config use."""
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        return module.to(device=device, dtype=self.config.params_dtype)

    def _mark_head_sharded(self, relative: RelativeAttentionBase) -> None:
        """Tell Megatron (gradient clipping, checkpoints) that the banks are split on their output axis."""
        for chunk in bank_chunk_modules(relative):
            for bank in chunk.children():
                tensor_parallel.set_tensor_model_parallel_attributes(bank.weight, True, 2, 1)

    def heads(self, hidden: Tensor) -> Tensor:
        """``[b, s, C]`` → this rank's heads' attention outputs ``[b, s, heads/tp·d]``."""
        raise NotImplementedError

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Megatron's, except that the project's modules' head-sharded tensors are declared split on their axis.

        Megatron takes the tensors of a module without ``sharded_state_dict`` for replicas; the banks and
        plain maps here are shards, marked by their ``tensor_model_parallel`` attributes.
        """
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        for name, child in self.named_children():
            if hasattr(child, "sharded_state_dict"):
                continue
            tensors = child.state_dict(prefix="", keep_vars=True)
            axes = {key: t.partition_dim for key, t in tensors.items() if getattr(t, "tensor_model_parallel", False)}
            state.update(make_sharded_tensors_for_checkpoint(
                tensors, f"{prefix}{name}.", axes, sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"]))
        return state

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None, sequence_len_offset=None,
                *, inference_params=None) -> tuple[Tensor, Tensor | None]:
        """The mask is the layout's (causal for a ``CausalLayout``); ``attention_mask`` is not read."""
        unsupported = {"key_value_states": key_value_states, "inference_context": inference_context,
                       "inference_params": inference_params, "rotary_pos_emb": rotary_pos_emb,
                       "rotary_pos_cos": rotary_pos_cos, "attention_bias": attention_bias,
                       "packed_seq_params": packed_seq_params}
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise ValueError(f"Translution attention does not take {', '.join(given)}: build the model with "
                             "position_embedding_type='none', without packed sequences or KV-cache inference")
        out = self.heads(hidden_states.transpose(0, 1))
        return self.linear_proj(out.transpose(0, 1).contiguous())


class TranslutionSelfAttention(_HeadParallelAttention):
    """Full Translution (:class:`~translution_dist.models.attention.TranslutionAttention`), heads split over ``tp``.

    ``relative`` names the projections that are banks; the others are plain maps of this rank's heads.
    """

    def __init__(self, config: TransformerConfig, submodules: TranslutionSubmodules, layer_number: int,
                 layout: RelativeLayout, relative: str = "qkv", bank_chunks: int = 1,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, pg_collection=None, cp_comm_type=None) -> None:
        super().__init__(config, submodules, layer_number, layout, pg_collection)
        self.relative = relative
        # The project's layer for this rank's heads; Megatron's TransformerLayer norms the input
        # (input_layernorm) and linear_proj projects out, so the layer's own two are dropped.
        local = TranslutionAttention(layout, config.hidden_size, self.local_heads, self.dim_head, relative,
                                     bank_chunks)
        local.norm, local.out_proj = nn.Identity(), nn.Identity()
        self.translution = self._local_module(local)
        self._mark_head_sharded(self.translution)
        for side in "qkv":
            if side not in relative:
                tensor_parallel.set_tensor_model_parallel_attributes(
                    getattr(self.translution, f"{side}_proj").weight, True, 0, 1)
        if config.perform_initialization:
            load_attention_shard(self, TranslutionAttention(layout, config.hidden_size, config.num_attention_heads,
                                                            self.dim_head, relative, bank_chunks))

    def heads(self, hidden: Tensor) -> Tensor:
        # Every consumer of the replicated input computes only this rank's heads: complete its gradient once.
        return self.translution(_copy_to_tp_region(hidden, self.tp_group))


class _AlphaRelativeTerm(RelativeAttentionBase):
    """α's low-rank Translution term for some heads: banks ``[K, h·r, heads/tp·r]`` read all heads' inputs."""

    def __init__(self, layout: RelativeLayout, rank: int, all_heads: int, local_heads: int,
                 bank_chunks: int) -> None:
        super().__init__(layout, rank)
        self._make_banks("qkv", all_heads * rank, local_heads * rank, bank_chunks, rank)

    def scores(self, q_low: Tensor, k_low: Tensor, scale: float) -> Tensor:
        return self._relative_scores(q_low, k_low, scale)

    def values(self, attn: Tensor, v_low: Tensor) -> Tensor:
        return self._relative_values(attn, v_low)


class AlphaTranslutionSelfAttention(_HeadParallelAttention):
    """α-Translution (:class:`~translution_dist.models.attention.AlphaTranslutionAttention`), heads split over ``tp``."""

    def __init__(self, config: TransformerConfig, submodules: AlphaTranslutionSubmodules, layer_number: int,
                 layout: RelativeLayout, rank: int = 8, bank_chunks: int = 1,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, pg_collection=None, cp_comm_type=None) -> None:
        super().__init__(config, submodules, layer_number, layout, pg_collection)
        heads, dim = config.num_attention_heads, config.hidden_size
        inner, low = heads * self.dim_head, heads * rank
        self.rank = rank
        self.scale = self.dim_head ** -0.5
        column = {"config": config, "init_method": config.init_method, "bias": False, "gather_output": False,
                  "skip_bias_add": False, "is_expert": False, "tp_group": self.tp_group}
        self.linear_qkv = build_module(submodules.linear_qkv, dim, 3 * inner, tp_comm_buffer_name="qkv", **column)
        self.down = self._local_module(nn.ModuleDict({side: nn.Linear(dim, low, bias=False) for side in "qkv"}))
        self.relative = self._local_module(_AlphaRelativeTerm(layout, rank, heads, self.local_heads, bank_chunks))
        self._mark_head_sharded(self.relative)
        self.linear_v_up = build_module(submodules.linear_v_up, low, inner, tp_comm_buffer_name="v_up", **column)
        if config.perform_initialization:
            load_attention_shard(self, AlphaTranslutionAttention(layout, dim, heads, self.dim_head, rank, bank_chunks))

    def _low(self, side: str, x: Tensor) -> Tensor:
        # The banks give this rank's heads only: complete the gradient of the replicated low-rank input.
        return _copy_to_tp_region(self.down[side](x), self.tp_group)

    def heads(self, hidden: Tensor) -> Tensor:
        b, n, _ = hidden.shape
        qkv, _ = self.linear_qkv(hidden)
        q1, k1, v1 = qkv.reshape(b, n, self.local_heads, 3, self.dim_head).permute(3, 0, 2, 1, 4)
        half_scale = self.scale / 2
        scores = q1 @ k1.transpose(-1, -2) * half_scale
        scores = scores + self.relative.scores(self._low("q", hidden), self._low("k", hidden), half_scale)
        attn = self.relative.row_softmax(scores, self.layout.attention_mask(n))
        out1 = (attn @ v1).transpose(1, 2).reshape(b, n, -1)
        values = tensor_parallel.gather_from_tensor_model_parallel_region(
            self.relative.values(attn, self._low("v", hidden)), group=self.tp_group)
        out2, _ = self.linear_v_up(values)
        return (out1 + out2) / 2


@torch.no_grad()
def load_attention_shard(megatron_attn: _HeadParallelAttention, layer: RelativeAttentionBase) -> None:
    """Set ``megatron_attn`` to this rank's heads of the project's unsharded ``layer`` (same widths).

    ``layer.norm`` is not read: in Megatron it is the ``TransformerLayer``'s ``input_layernorm``.
    """
    rank = megatron_attn.tp_rank
    heads = slice(rank * megatron_attn.local_heads * megatron_attn.dim_head,
                  (rank + 1) * megatron_attn.local_heads * megatron_attn.dim_head)
    megatron_attn.linear_proj.weight.copy_(layer.out_proj.weight[:, heads])
    if megatron_attn.linear_proj.bias is not None:
        megatron_attn.linear_proj.bias.copy_(layer.out_proj.bias)
    if isinstance(megatron_attn, TranslutionSelfAttention):
        target = megatron_attn.translution
        for side in "qkv":
            if side in layer.relative:
                target.load_bank(side, layer.bank(side)[..., heads])
            else:
                getattr(target, f"{side}_proj").weight.copy_(getattr(layer, f"{side}_proj").weight[heads])
        return
    d, r, local = megatron_attn.dim_head, megatron_attn.rank, megatron_attn.local_heads
    q, k, v = (part.view(-1, d, part.shape[-1]) for part in layer.qkv_proj.weight.chunk(3, dim=0))
    mine = slice(rank * local, (rank + 1) * local)
    megatron_attn.linear_qkv.weight.copy_(torch.stack([q[mine], k[mine], v[mine]], dim=1).flatten(0, 2))
    for side in "qkv":
        megatron_attn.down[side].weight.copy_(getattr(layer, f"{side}_down").weight)
        megatron_attn.relative.load_bank(side, layer.bank(side)[..., rank * local * r:(rank + 1) * local * r])
    megatron_attn.linear_v_up.weight.copy_(layer.v_up.weight[heads])


def translution_attention_spec(layout: RelativeLayout, attention: str = "translution", relative: str = "qkv",
                               alpha_rank: int = 8, bank_chunks: int = 1) -> ModuleSpec:
    """The ``self_attention`` spec: ``attention`` is ``translution`` (banks for ``relative``) or ``alpha``."""
    if attention == "translution":
        return ModuleSpec(module=TranslutionSelfAttention, submodules=TranslutionSubmodules(),
                          params={"layout": layout, "relative": relative, "bank_chunks": bank_chunks})
    if attention == "alpha":
        return ModuleSpec(module=AlphaTranslutionSelfAttention, submodules=AlphaTranslutionSubmodules(),
                          params={"layout": layout, "rank": alpha_rank, "bank_chunks": bank_chunks})
    raise ValueError(f"attention must be 'translution' or 'alpha', got {attention!r}")


def translution_layer_spec(layout: RelativeLayout, attention: str = "translution", relative: str = "qkv",
                           alpha_rank: int = 8, bank_chunks: int = 1) -> ModuleSpec:
    """Megatron's local (no Transformer Engine) GPT layer spec with Translution self-attention.

    Pass it as ``GPTModel(transformer_layer_spec=…)`` or ``TransformerBlock(spec=…)``.
    """
    stock = get_gpt_layer_local_spec()
    attention_spec = translution_attention_spec(layout, attention, relative, alpha_rank, bank_chunks)
    # The stock map renames input_layernorm for Transformer Engine's fused norm+qkv layer, which is not here.
    submodules = dataclasses.replace(stock.submodules, self_attention=attention_spec, sharded_state_dict_keys_map={})
    return dataclasses.replace(stock, submodules=submodules)
