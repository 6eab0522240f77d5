"""Displacement-indexed weight banks."""

from __future__ import annotations

import math

import torch
from torch import nn


class DisplacementBank(nn.Module):
    """``K`` matrices of shape ``[in_features, out_features]``, one per displacement.

    ``weight`` is a plain ``[K, C_in, C_out]`` parameter: axis 0 is the displacement axis
    (sharded by displacement parallelism), axis 2 the output axis (sharded by heads).
    """

    def __init__(self, num_displacements: int, in_features: int, out_features: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_displacements = num_displacements
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_displacements, in_features, out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init, ``kaiming_uniform_(a=√5)`` of the ``[K, C_in, C_out]`` tensor.

        PyTorch takes that tensor's fan-in as ``C_in·C_out``, so the bound is
        ``1/√(C_in·C_out)``; it is written out so that a shard initialises like the whole.
        """
        if self.weight.device.type == "meta":
            return
        bound = 1.0 / math.sqrt(self.in_features * self.out_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"K={self.num_displacements}, in_features={self.in_features}, out_features={self.out_features}"
