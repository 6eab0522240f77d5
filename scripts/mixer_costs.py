"""Parameters and FLOPs of every token mixer at the Dynamic MNIST size, for docs/models.md.

    python scripts/mixer_costs.py

The model is the ``configs/models/mnist_vit_*.yaml`` ViT (tiny preset, 84×84 images, 12×12
patches: 49 patches and a class token) with ``model.attention`` swapped; FLOPs are the
census of ``translution_dist.models.flops`` (forward, per image; MFU counts 3×).
"""

from __future__ import annotations

from typing import get_args

import torch

from translution_dist.models import ModelConfig, build_model, count_parameters
from translution_dist.models.config import AttentionKind
from translution_dist.models.flops import flop_terms


def main() -> None:
    print("| model.attention | parameters | attention-layer parameters | forward FLOPs per image |")
    print("|---|---:|---:|---:|")
    for attention in get_args(AttentionKind):
        cfg = ModelConfig(arch="vit", attention=attention, preset="tiny", image_size=84, patch_size=12,
                          channels=1, num_classes=10)
        with torch.device("meta"):
            model = build_model(cfg)
        layer = count_parameters(model.encoder.blocks[0].attn)
        forward = sum(t.forward for t in flop_terms(cfg))
        print(f"| {attention} | {count_parameters(model):,} | {layer:,} | {forward / 1e6:,.1f} M |")


if __name__ == "__main__":
    main()
