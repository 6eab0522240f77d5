"""Analytic per-rank memory of a training run under a parallel layout, before anything starts.

A rank's memory is a sum of *terms* (parameters, gradients, optimizer states, gathered ZeRO-3
units, saved activations, the kernels' working set, index tensors), each living on the
device, in host memory or on NVMe. Terms do not all peak together, so the peak is taken
over three *phases* of a step:

* ``backward start`` — every block's saved activations exist, the last block runs its
  backward: kernel transients, the gathered root/block/bank chunk with their unsharded
  gradients and reduce-scatter buffers. Sharded gradients do not exist yet (the trainer
  frees them with ``zero_grad(set_to_none=True)``).
* ``backward end`` — activations are gone, all sharded gradients exist, the root unit
  (embeddings, head) is still gathered with its gradients.
* ``optimizer step`` — gradients plus AdamW's temporaries.

Parameters, optimizer states and index tensors persist through all three.

Parameter element counts come from the model built on the meta device
(:func:`launcher.shard_model.census`), not from formulas; activations and transients are
formulas in the model's widths (listed in ``docs/scale.md``), checked against
``saved_tensors_hooks`` counts and measured CPU peaks by ``tests/test_plan_memory.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from launcher.shard_model import (
    Census,
    Coordinates,
    ParamInfo,
    census,
    model_parallel_shape,
    padded_shard_numel,
)
from parallelism.activation_checkpoint import ActivationCheckpoint
from parallelism.config import ParallelConfig
from translution_dist.models import ModelConfig
from translution_dist.models.attention import DEFAULT_PAIR_CHUNK_BYTES, chunk_bounds
from translution_dist.models.config import BANK_ATTENTIONS
from translution_dist.ops import RelativeLayout, pair_plan, pairs_per_chunk

Where = Literal["device", "host", "nvme"]
GiB = 2**30
FP32 = 4
INDEX = 8  # int64 index tensors
EXACT_PLAN_PAIRS = 1 << 20
"""Layouts with at most this many token pairs get their real pair plans; larger ones a bound."""
DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` (elements): ZeRO-3 allocates one such gradient bucket."""
DEEPSPEED_PARAM_BUFFERS = 5
"""DeepSpeed's default ``offload_param.buffer_count`` (swap buffers for NVMe parameter offload)."""
DEEPSPEED_PARAM_BUFFER = 100_000_000
"""DeepSpeed's default ``offload_param.buffer_size`` (elements; grown to the largest parameter)."""
DEEPSPEED_PERSISTENCE = 100_000
"""DeepSpeed's default ``stage3_param_persistence_threshold``, lowered below the smallest bank parameter."""


@dataclass(frozen=True)
class Term:
    """Bytes of one kind of tensor on one rank, and where they live."""

    name: str
    bytes: int
    where: Where


@dataclass(frozen=True)
class Phase:
    """Transient terms that coexist at one moment of a step (on top of the persistent ones)."""

    name: str
    terms: tuple[Term, ...]

    def at(self, where: Where) -> int:
        return sum(t.bytes for t in self.terms if t.where == where)


@dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes of one rank under ``train.activation_checkpoint``.

    With recomputation every block keeps less (``block``: its input; ``selective``: all but
    what its feed-forward saves beyond its input), and the block whose backward runs holds the
    tensors it recomputes on top (counted at the start of backward, with the kernels' working set).
    """

    per_block: int  # without recomputation
    blocks: int
    root: int
    recompute_per_block: int  # a checkpointed block keeps only its input
    feed_forward: int  # what a block's feed-forward saves beyond its input (selective recomputes it)
    mode: ActivationCheckpoint = "none"

    @property
    def kept_per_block(self) -> int:
        return {"none": self.per_block, "block": self.recompute_per_block,
                "selective": self.per_block - self.feed_forward}[self.mode]

    @property
    def recomputed(self) -> int:
        """Bytes one block recomputes in its backward."""
        return {"none": 0, "block": self.per_block, "selective": self.feed_forward}[self.mode]

    @property
    def total(self) -> int:
        return self.kept_per_block * self.blocks + self.recomputed + self.root

    @property
    def total_recompute(self) -> int:
        """The total with per-block recomputation, whatever the mode (the planner's hint)."""
        return self.recompute_per_block * self.blocks + self.per_block + self.root


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank memory of one layout: persistent terms, the three phases, and their peaks."""

    layout: ParallelConfig
    persistent: tuple[Term, ...]
    phases: tuple[Phase, ...]
    activations: Activations
    parameters: int  # all elements of the model
    param_bytes_per_rank: int  # the largest rank's (padded) shard, fp32 master

    def persistent_at(self, where: Where) -> int:
        return sum(t.bytes for t in self.persistent if t.where == where)

    def peak(self, where: Where) -> int:
        """The most ``where`` holds at any of the phases."""
        return self.persistent_at(where) + max(phase.at(where) for phase in self.phases)

    @property
    def peak_total(self) -> int:
        """Peak of device + host together: what one process holds when the device is the CPU."""
        persistent = sum(t.bytes for t in self.persistent if t.where != "nvme")
        return persistent + max(phase.at("device") + phase.at("host") for phase in self.phases)

    def peak_phase(self, where: Where) -> Phase:
        return max(self.phases, key=lambda phase: phase.at(where))

    def breakdown(self, where: Where) -> list[Term]:
        """The terms of ``where`` at its peak, largest first (for messages and tables)."""
        terms = [t for t in (*self.persistent, *self.peak_phase(where).terms) if t.where == where]
        merged: dict[str, int] = {}
        for t in terms:
            merged[t.name] = merged.get(t.name, 0) + t.bytes
        return sorted((Term(n, b, where) for n, b in merged.items() if b), key=lambda t: -t.bytes)


@dataclass(frozen=True)
class Precision:
    """Element sizes of the tensors a step saves, from ``train.precision`` (autocast) and
    ``parallel.mixed_precision`` (the dtype FSDP2/DeepSpeed compute weights are gathered in)."""

    param: int  # gathered (compute) parameters and their unsharded gradients
    resid: int  # the residual stream (block inputs)
    norm: int  # LayerNorm outputs, softmax probabilities, kernel outputs
    linear_in: int  # what a Linear saves of its input (autocast saves its own low-precision copy)
    linear_out: int  # Linear/GELU outputs
    autocast: bool
    softmax_fp32: bool  # CUDA's autocast runs softmax in fp32; the CPU's keeps its input's dtype

    @staticmethod
    def of(train_precision: str, mixed_precision: str, device: str) -> Precision:
        low_weights = mixed_precision in ("bf16", "fp16")
        autocast = train_precision == "bf16" or (train_precision == "fp16" and device == "cuda")
        param = 2 if low_weights else FP32
        if autocast:
            return Precision(param, FP32, FP32, 2, 2, True, device == "cuda")
        return Precision(param, param, param, param, param, False, False)

    def probs(self, model: ModelConfig, layout: ParallelConfig) -> int:
        """Element size of the softmax probabilities: the distributed softmax keeps fp32; else
        the scores' dtype (the kernels compute in autocast's dtype, as α's dense term does)."""
        if layout.dispp > 1 or self.softmax_fp32:
            return FP32
        return self.linear_out


@dataclass(frozen=True)
class Shapes:
    """The widths one rank computes with (heads, attention and MLP widths divided by ``tp``)."""

    batch: int
    tokens: int
    dim: int
    inner: int  # C'/tp
    heads: int  # h/tp
    mlp: int  # mlp_dim/tp
    low_rank: int  # alpha: h·r (replicated inputs of the banks)
    vocab: int  # GPT: vocabulary; ViT: classes (the logits' width)
    patch_dim: int
    patches: int


def _shapes(model: ModelConfig, layout: ParallelConfig, batch: int) -> Shapes:
    d = model.dims
    tp = layout.tp
    tokens = model.layout().max_tokens
    patches = model.num_patches if model.arch == "vit" else 0
    return Shapes(batch, tokens, d.dim, d.heads * d.dim_head // tp, d.heads // tp, -(-d.mlp_dim // tp),
                  d.heads * model.alpha_rank, model.vocab_size if model.arch == "gpt" else model.num_classes,
                  model.patch_size ** 2 * model.channels, patches)


def block_activation_bytes(model: ModelConfig, layout: ParallelConfig, s: Shapes, p: Precision) -> int:
    """Bytes one block saves for backward on one rank (see ``docs/scale.md`` for the list)."""
    bn = s.batch * s.tokens
    stats = 2 * FP32  # the attention's LayerNorm mean and rstd
    dense = s.batch * s.heads * s.tokens ** 2
    causal_mask = s.tokens ** 2 if model.arch == "gpt" and layout.dispp == 1 else 0
    probs = p.probs(model, layout)
    ff = s.dim * p.resid + _feed_forward_beyond_input(s, p)  # its norm's input (the residual stream), the rest
    if model.attention == "translution":
        plain = 3 - len(model.relative)
        # The norm output, in the compute dtype (one autocast copy), is the input of every side, bank or Linear.
        inputs = s.dim * (p.linear_in if p.autocast else p.norm)
        attn = s.dim * p.resid + inputs + plain * s.inner * p.linear_out + s.inner * p.linear_in
    elif model.attention == "alpha":
        copies = 4 if p.autocast else 1  # qkv_proj and the three down projections read the norm output
        attn = (s.dim * p.resid + copies * s.dim * p.linear_in + 3 * s.inner * p.linear_out
                + 4 * s.low_rank * p.linear_out + s.inner * p.linear_in)
    else:  # self-attention: q, k, v (views of one projection), SDPA's output (out_proj's input) and log-sum-exp
        attn = s.dim * p.resid + s.dim * p.linear_in + 3 * s.inner * p.linear_out + s.inner * p.linear_out
        return bn * (attn + ff + stats) + s.batch * s.heads * s.tokens * FP32
    return bn * (attn + ff + stats) + dense * probs + causal_mask


def _feed_forward_beyond_input(s: Shapes, p: Precision) -> int:
    """Per token: the feed-forward's norm statistics, the (copy of the) norm output up_proj saves, GELU in/out."""
    return 2 * FP32 + s.dim * p.linear_in + 2 * s.mlp * p.linear_out


def feed_forward_bytes(s: Shapes, p: Precision) -> int:
    """Bytes a block's feed-forward saves beyond its input: what ``selective`` recomputation drops."""
    return s.batch * s.tokens * _feed_forward_beyond_input(s, p)


def root_activation_bytes(model: ModelConfig, s: Shapes, p: Precision) -> int:
    """Bytes the embeddings, final norms, head and loss save for backward."""
    bn = s.batch * s.tokens
    if model.arch == "gpt":
        norms = s.dim * p.resid + s.dim * p.norm + 2 * 2 * FP32  # the encoder's and the model's final norms
        head_in = s.dim * p.linear_in
        return bn * (norms + head_in + 2 * INDEX) + bn * s.vocab * FP32  # ids, targets; log-softmax output
    patches = s.batch * s.patches
    embed = patches * (s.patch_dim * FP32 + s.patch_dim * p.linear_in + s.dim * p.linear_out + 2 * 2 * FP32)
    norm = bn * (s.dim * p.resid + 2 * FP32)
    # The head reads the class token: a view that keeps the whole final norm output, or autocast's copy of it.
    head_in = s.batch * s.dim * p.linear_in if p.autocast else bn * s.dim * p.norm
    return embed + norm + head_in + s.batch * s.vocab * FP32


def head_transient_bytes(model: ModelConfig, s: Shapes) -> int:
    """The loss's backward: the log-softmax gradient and the logits gradient (fp32)."""
    rows = s.batch * s.tokens if model.arch == "gpt" else s.batch
    return 2 * rows * s.vocab * FP32


def autocast_weight_bytes(c: Census, layout: ParallelConfig, p: Precision) -> int:
    """Autocast's low-precision copies of fp32 ``nn.Linear`` weights, cached for the forward and
    kept for the backward (none when the engine already gathers them in bf16/fp16)."""
    if not p.autocast or p.param != FP32:
        return 0
    return 2 * sum(math.prod(model_parallel_shape(prm, layout, Coordinates(0, 0, 0, 0)))
                   for prm in c.params if prm.linear_weight)


def _bank_chunk_rows(model: ModelConfig, layout: ParallelConfig) -> list[tuple[int, int]]:
    """Bank rows of every chunk that the first displacement-parallel rank computes."""
    from parallelism.displacement_parallel import local_rows

    k = model.layout().num_displacements
    return [local_rows(a, b, layout.dispp, 0) for a, b in chunk_bounds(k, model.bank_chunks)]


@dataclass(frozen=True)
class PlanStats:
    """What the kernels' pair plans imply for memory (see ``translution_dist.ops.pair_plan``)."""

    largest_chunk: int  # token pairs of the largest pair chunk: the per-pair scratch rows
    gathered_rows: int  # bank rows the largest row-gathering chunk copies (chunks that are strided views copy none)
    planned_pairs: int  # padded pairs over all plans: what the cached plans index


def plan_stats(model: ModelConfig, layout: ParallelConfig, batch: int, row_bytes: int,
               cast_banks: bool) -> PlanStats:
    """Pair-plan figures for one rank's bank chunks; ``cast_banks``: bank rows are copied to the
    activations' dtype, so every chunk copies its rows.

    Exact (the real, cached plans) for layouts of at most :data:`EXACT_PLAN_PAIRS` pairs; for
    larger ones a bound: the kernels' pair budget and one bank chunk's pairs and rows.
    """
    relative = model.layout()
    budget = pairs_per_chunk(batch, row_bytes, DEFAULT_PAIR_CHUNK_BYTES)
    rows = _bank_chunk_rows(model, layout)
    counts = _pair_counts(relative)
    if counts.sum() <= EXACT_PLAN_PAIRS:
        chunks = [c for r in rows for c in pair_plan(relative, relative.max_tokens, budget, r).chunks]
        gathered = [c.shape[0] for c in chunks if cast_banks or c.row_slice is None]
        return PlanStats(max(c.shape[0] * c.shape[1] for c in chunks), max(gathered, default=0),
                         sum(c.shape[0] * c.shape[1] for c in chunks))
    per_chunk = [int(counts[a:b].sum()) for a, b in rows]
    return PlanStats(min(max(per_chunk), budget), min(max(b - a for a, b in rows), budget), sum(per_chunk))


@functools.lru_cache(maxsize=16)
def _pair_counts(relative: RelativeLayout) -> torch.Tensor:
    """Token pairs per bank row (storage order): computed once per layout."""
    return relative.pair_counts()[relative.storage_order]


def kernel_transient_bytes(model: ModelConfig, layout: ParallelConfig, s: Shapes, p: Precision) -> int:
    """Working memory of the last relative-attention layer's backward, where the step peaks.

    The value kernel's backward holds three dense ``B·h·N²`` tensors (the pair-major
    probabilities, their gradient and its dense copy), a fourth when several bank chunks'
    gradients for the probabilities are being summed; the score kernel's backward holds
    three (the incoming gradient, its scaled pair-major copy, the product). Each pass also
    has three token-major ``B·N·C`` tensors, the per-pair scratch rows of its largest pair
    chunk (scores: both sides' gathered inputs, projections and one gradient; values: the
    input, projection and output gradient), and copies of bank rows for chunks whose rows
    are not a strided view (scores: q, k and a gradient; values: v and a gradient).
    """
    dense = s.batch * s.heads * s.tokens ** 2 * p.probs(model, layout)
    if model.attention not in BANK_ATTENTIONS:  # self-attention; a mixer counted as one
        return 3 * dense
    c_in = s.low_rank if model.attention == "alpha" else s.dim
    c_out = s.low_rank // layout.tp if model.attention == "alpha" else s.inner
    es = p.norm
    stats = plan_stats(model, layout, s.batch, es * (2 * c_in + 2 * c_out), cast_banks=p.param != es)
    pair_row = stats.largest_chunk * s.batch * es
    bank_rows = stats.gathered_rows * c_in * c_out * es
    values = (3 + (model.bank_chunks > 1)) * dense + pair_row * (c_in + 2 * c_out + 2 * s.heads) + 2 * bank_rows
    scores = 3 * dense + pair_row * (2 * c_in + 3 * c_out + s.heads) + 3 * bank_rows
    token_major = 3 * s.batch * (s.tokens + 1) * max(c_in, c_out) * es
    return max(values, scores) + token_major


def index_bytes(model: ModelConfig, layout: ParallelConfig, batch: int) -> tuple[int, int]:
    """``(host, device)`` bytes of cached index tensors: the layout's ``[N, N]`` index maps
    (host) and the pair plans of every bank chunk (three int64 per planned pair, on the device)."""
    if model.attention not in BANK_ATTENTIONS:
        return 0, 0
    n = model.layout().max_tokens
    d = model.dims
    c_in = d.heads * model.alpha_rank if model.attention == "alpha" else d.dim
    c_out = (d.heads * model.alpha_rank if model.attention == "alpha" else d.heads * d.dim_head) // layout.tp
    planned = plan_stats(model, layout, batch, FP32 * (2 * c_in + 2 * c_out), False).planned_pairs
    owned = model.dims.depth * n * n if layout.dispp > 1 else 0  # displacement softmax masks, one per layer
    return 2 * INDEX * n * n, 3 * INDEX * planned + owned


@dataclass(frozen=True)
class RunShape:
    """What, besides the layout, sets a rank's memory."""

    model: ModelConfig
    micro_batch: int
    train_precision: str = "fp32"
    device: str = "cuda"  # cuda: GPUs; cpu: every term lives in host memory
    grad_accum: int = 1
    activation_checkpoint: ActivationCheckpoint = "none"


@functools.lru_cache(maxsize=32)
def _census(model_json: str, vocab_parallel: bool) -> Census:
    return census(ModelConfig.model_validate_json(model_json), vocab_parallel)


def model_census(model: ModelConfig, vocab_parallel: bool = False) -> Census:
    """:func:`launcher.shard_model.census`, cached per model config (the planner asks once per layout)."""
    return _census(model.model_dump_json(), vocab_parallel)


def _unsharded_numel(prm: ParamInfo, layout: ParallelConfig) -> int:
    """Elements of ``prm`` gathered by FSDP2: the largest rank's tp/dispp slice, dim 0 padded to ``dp_shard``."""
    shape = model_parallel_shape(prm, layout, Coordinates(0, 0, 0, 0))
    rows = -(-shape[0] // layout.dp_shard) * layout.dp_shard
    return rows * math.prod(shape[1:])


def _units(c: Census, layout: ParallelConfig) -> dict[str, int]:
    """Unsharded elements of every FSDP2 unit."""
    return {unit: sum(_unsharded_numel(prm, layout) for prm in params) for unit, params in c.units().items()}


def _largest(units: dict[str, int], prefix: str) -> int:
    return max((n for u, n in units.items() if u.startswith(prefix)), default=0)


def estimate(run: RunShape, layout: ParallelConfig) -> MemoryEstimate:
    """Per-rank memory of ``run`` under the resolved ``layout``."""
    model = run.model
    c = model_census(model, layout.vocab_parallel)
    if layout.engine == "deepspeed":  # DeepSpeed's bf16/fp16 mode (from train.precision) runs without autocast
        p = Precision.of("fp32", run.train_precision, run.device)
    else:
        p = Precision.of(run.train_precision, layout.mixed_precision, run.device)
    s = _shapes(model, layout, run.micro_batch)
    per_block = block_activation_bytes(model, layout, s, p)
    acts = Activations(per_block, model.dims.depth, root_activation_bytes(model, s, p),
                       s.batch * s.tokens * s.dim * p.resid, feed_forward_bytes(s, p), run.activation_checkpoint)
    working = max(kernel_transient_bytes(model, layout, s, p), head_transient_bytes(model, s))
    working += autocast_weight_bytes(c, layout, p)
    host_index, device_index = index_bytes(model, layout, run.micro_batch)
    shard = sum(padded_shard_numel(prm, layout) for prm in c.params)
    index_where: Where = "device" if run.device == "cuda" else "host"
    index_terms = (Term("index maps", host_index, "host"), Term("pair plans", device_index, index_where))
    if layout.engine == "deepspeed":
        persistent, phases = _deepspeed(c, layout, p, acts, working, run.device)
    else:
        persistent, phases = _torch(c, layout, p, acts, working, shard, run.grad_accum)
    return MemoryEstimate(layout, (*persistent, *index_terms), phases, acts, c.numel, shard * FP32)


def _torch(c: Census, layout: ParallelConfig, p: Precision, acts: Activations, working: int,
           shard: int, grad_accum: int) -> tuple[tuple[Term, ...], tuple[Phase, ...]]:
    """Plain PyTorch (engine none) and FSDP2: the trainer's ``TorchBackend``.

    Its AdamW runs the foreach kernels, whose one temporary is ``sqrt(v)`` of every parameter;
    tp/dispp without FSDP mix DTensors and plain tensors, which step one at a time: ``sqrt(v)``
    and its scaled copy, two temporaries of the largest parameter.
    With ``grad_accum > 1`` the trainer turns FSDP2's gradient reduction off for all but the
    last micro-batch, so every unit's *unsharded* gradient (fp32) is kept on the device
    until then.
    """
    states: Where = "host" if layout.cpu_offload else "device"
    params = shard * FP32
    persistent = (Term("parameters (fp32 shard)", params, states),
                  Term("optimizer states (AdamW m, v)", 2 * params, states))
    grads = Term("gradients (fp32 shard)", params, states)
    if layout.engine == "none" and layout.tp * layout.dispp > 1:
        temporary = Term("optimizer temporaries (one parameter at a time)",
                         2 * max(padded_shard_numel(prm, layout) for prm in c.params) * FP32, states)
    else:
        temporary = Term("optimizer temporaries (foreach sqrt(v))", params, states)
    optimizer = Phase("optimizer step", (grads, temporary))
    acts_term = Term("activations", acts.total, "device")
    working_term = Term("kernel working set", working, "device")
    if layout.engine == "none":  # gradients of earlier micro-batches wait in .grad
        start = (acts_term, working_term, *((grads,) if grad_accum > 1 else ()))
        return persistent, (Phase("backward start", start), Phase("backward end", (grads,)), optimizer)
    units = _units(c, layout)
    root, block = units.get("root", 0), _largest(units, "block.")
    chunk = _largest(units, "chunk.")
    reduce = FP32
    # Unsharded parameters and gradients of the root, one block and one bank chunk; the chunk's
    # all-gather output (FSDP2 frees it after the copy-out, but an in-flight collective may still
    # hold it) and the previous unit's reduce-scatter input, kept until the next reduce-scatter.
    # With accumulation the root's and block's gradients are part of the accumulated ones.
    unsynced = sum(units.values()) * reduce if grad_accum > 1 else 0
    grad_units = chunk if grad_accum > 1 else root + block + chunk
    gathered = (root + block + chunk + grad_units) * p.param + chunk * p.param + max(chunk, block) * reduce
    start = Phase("backward start", (acts_term, working_term,
                                     Term("gathered units (root, block, bank chunk) + grads", gathered, "device"),
                                     Term("unsharded gradients accumulated without sync", unsynced, "device")))
    end = Phase("backward end", (grads, Term("gathered root + grads", root * (2 * p.param + reduce), "device")))
    return persistent, (start, end, optimizer)


def _deepspeed(c: Census, layout: ParallelConfig, p: Precision, acts: Activations, working: int,
               device: str) -> tuple[tuple[Term, ...], tuple[Phase, ...]]:
    """DeepSpeed ZeRO-3 (-Infinity) as ``parallelism.deepspeed_zero`` configures it.

    Every parameter is partitioned over all ranks, except those of at most the persistence
    threshold, which stay whole; the partitions are in the compute dtype, with an fp32 master
    copy, fp32 gradient partitions and AdamW's states where the offload settings say. ZeRO-3
    allocates one ``reduce_bucket_size`` gradient bucket up front. A bank chunk is gathered
    whole (a ZeRO-3 leaf). The optimizer step makes no temporaries on GPUs (fused Adam,
    DeepSpeedCPUAdam); on CPUs it is ``torch.optim.AdamW`` over the flat fp32 partition, whose
    per-tensor path makes two temporaries of its size.
    """
    banks = [prm.numel for prm in c.params if prm.role == "bank"]
    threshold = min(DEEPSPEED_PERSISTENCE, min(banks) - 1) if banks else DEEPSPEED_PERSISTENCE
    partition = sum(padded_shard_numel(prm, layout) for prm in c.params if prm.numel > threshold)
    persistent_full = sum(prm.numel for prm in c.params if prm.numel <= threshold)
    where: dict[str, Where] = {"none": "device", "cpu": "host", "nvme": "nvme"}
    param_at, optim_at = where[layout.offload_param], where[layout.offload_optimizer]
    grads_at: Where = "device" if layout.offload_optimizer == "none" else "host"
    elements = partition + persistent_full
    dtype = "bf16" if p.param == 2 else "fp32"
    terms = [Term(f"parameters ({dtype} partition)", partition * p.param, param_at),
             Term("persistent small parameters", persistent_full * p.param, "device"),
             Term("fp32 master partition", elements * FP32, optim_at),
             Term("optimizer states (AdamW m, v)", 2 * elements * FP32, optim_at),
             Term("gradients (fp32 partition)", elements * FP32, grads_at),
             Term("reduce bucket", DEEPSPEED_REDUCE_BUCKET * p.param, "device")]
    if "nvme" in (layout.offload_param, layout.offload_optimizer):
        largest = max(prm.numel for prm in c.params)
        buffers = DEEPSPEED_PARAM_BUFFERS * max(DEEPSPEED_PARAM_BUFFER, largest) * p.param
        terms.append(Term("NVMe swap buffers (pinned)", buffers, "host"))
    chunk = max((sum(prm.numel for prm in group) for unit, group in c.units().items() if unit.startswith("chunk.")),
                default=max(prm.numel for prm in c.params))
    start = Phase("backward start", (Term("activations", acts.total, "device"),
                                     Term("kernel working set", working, "device"),
                                     Term("gathered bank chunk + grads", 2 * chunk * p.param, "device")))
    temporaries = 0 if device == "cuda" else 2 * elements * FP32
    optimizer = Phase("optimizer step", (Term("optimizer temporaries", temporaries, grads_at),))
    return tuple(terms), (start, optimizer)


def fmt_bytes(n: float) -> str:
    """``97.3 GiB``, ``512.0 MiB``: sizes in messages and tables."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
