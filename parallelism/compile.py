"""``torch.compile`` per transformer block, applied from outside (``train.compile``), as torchtitan does.

Each :class:`~translution_dist.models.blocks.Block`'s ``forward`` is compiled on its own:
the blocks of a model are alike, so one compiled graph serves them all (Dynamo guards on the
module, so a block traces once and the others reuse the code), and compile time does not
grow with depth. The module's ``forward`` is replaced, not ``__call__``: hooks stay outside
the compiled region, so FSDP2's per-unit all-gathers and reduce-scatters (whose hooks Dynamo
skips) and head/displacement parallelism's hooks compose with it in any order, and the
module tree and parameter names stay unchanged (checkpoints are unaffected). Activation
checkpointing wraps ``forward`` too: compile wraps whatever ``forward`` the block has.

The Translution kernels are custom operators (``translution::pair_scores``/``pair_values``),
so a block without FSDP units inside it compiles to one graph (``fullgraph``); with FSDP2,
each bank chunk is a unit whose hooks split the block's graph around it.

``mode`` is ``torch.compile``'s: ``"reduce-overhead"`` records CUDA graphs on a GPU (no step
copies from the host: layouts keep their masks and positions in device buffers).
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import torch
from torch import nn

from translution_dist.models.blocks import Block

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def _has_inner_fsdp_units(block: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in block.modules() if m is not block)


def apply_compile(model: nn.Module, mode: CompileMode = "default", backend: str = "inductor") -> nn.Module:
    """Compile every block's ``forward`` in place (``fullgraph`` where no FSDP unit sits inside); returns ``model``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    options = {} if mode == "default" else {"mode": mode}
    for block in model.modules():
        if isinstance(block, Block):
            forward = vars(block).get("forward") or functools.partial(type(block).forward, block)
            block.forward = torch.compile(forward, backend=backend, fullgraph=not _has_inner_fsdp_units(block),
                                          **options)
    return model
