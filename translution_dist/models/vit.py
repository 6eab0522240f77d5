"""The paper's image classifier: patch embedding, class token, encoder, class-token head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from translution_dist.models.blocks import Encoder, reset_submodules
from translution_dist.models.config import ModelConfig


class PatchEmbedding(nn.Module):
    """Non-overlapping ``p×p`` patches in row-major order → LayerNorm → Linear → LayerNorm.

    Each patch is flattened pixel row by pixel row, channels innermost (the official
    ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``), so official weights apply unchanged.
    """

    def __init__(self, patch_size: int, channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = patch_size * patch_size * channels
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        b, c, height, width = images.shape
        p = self.patch_size
        patches = images.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.norm_out(self.proj(self.norm_in(patches.reshape(b, -1, p * p * c))))


class ViT(nn.Module):
    """Images ``[B, C, S, S]`` → logits ``[B, num_classes]`` read from the class token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "vit":
            raise ValueError(f"ViT needs arch=vit, got {cfg.arch}")
        self.config = cfg
        dim = cfg.dims.dim
        num_tokens = cfg.grid * cfg.grid + 1
        self.patch_embed = PatchEmbedding(cfg.patch_size, cfg.channels, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        learned = cfg.resolved_position == "learned"
        self.pos_embedding = nn.Parameter(torch.randn(1, num_tokens, dim)) if learned else None
        self.encoder = Encoder(cfg, cfg.layout(), causal=False)
        self.head = nn.Linear(dim, cfg.num_classes)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise all weights as the official code does; use after ``to_empty``."""
        reset_submodules(self)
        nn.init.normal_(self.cls_token)
        if self.pos_embedding is not None:
            nn.init.normal_(self.pos_embedding)

    def forward(self, images: Tensor) -> Tensor:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        return self.head(self.encoder(x)[:, 0])
