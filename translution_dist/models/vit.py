"""The paper's image classifier: patch embedding, class token, encoder, class-token head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from translution_dist.models.blocks import Encoder, reset_submodules
from translution_dist.models.config import ModelConfig


class PatchEmbedding(nn.Module):
    """Non-overlapping ``ph×pw`` patches in row-major order → LayerNorm → Linear → LayerNorm.

    Each patch is flattened pixel row by pixel row, channels innermost (the official
    ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``), so official weights apply unchanged.
    """

    def __init__(self, patch_hw: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_hw = patch_hw
        patch_dim = patch_hw[0] * patch_hw[1] * channels
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        b, c, height, width = images.shape
        ph, pw = self.patch_hw
        patches = images.reshape(b, c, height // ph, ph, width // pw, pw).permute(0, 2, 4, 3, 5, 1)
        return self.norm_out(self.proj(self.norm_in(patches.reshape(b, -1, ph * pw * c))))


class ViT(nn.Module):
    """Images ``[B, C, H, W]`` → logits ``[B, num_classes]`` read from the class token (or the mean token)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "vit":
            raise ValueError(f"ViT needs arch=vit, got {cfg.arch}")
        self.config = cfg
        dim = cfg.dims.dim
        self.patch_embed = PatchEmbedding(cfg.patch_hw, cfg.channels, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        learned = cfg.learned_position
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.num_patches + 1, dim)) if learned else None
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.encoder = Encoder(cfg, cfg.layout(), causal=False)
        self.head = nn.Linear(dim, cfg.num_classes)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise all weights as the official code does; use after ``to_empty``."""
        reset_submodules(self)
        for table in (self.cls_token, self.pos_embedding):  # None: absent (no position table, a later pipeline stage)
            if table is not None:
                nn.init.normal_(table)

    def forward(self, images: Tensor) -> Tensor:
        return self.readout(self.encoder(self.embed(images)))

    def embed(self, images: Tensor) -> Tensor:
        """Images → the encoder's input tokens (a pipeline's first stage runs this part alone)."""
        cfg = self.config
        expected = (cfg.channels, *cfg.image_hw)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        return self.emb_dropout(x)

    def readout(self, x: Tensor) -> Tensor:
        """The encoder's output tokens → logits (a pipeline's last stage runs this part alone)."""
        return self.head(x.mean(dim=1) if self.config.pool == "mean" else x[:, 0])
