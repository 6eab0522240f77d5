"""The paper's causal language model: token embedding, causal encoder, two norms, untied head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from translution_dist.models.blocks import Encoder, reset_submodules
from translution_dist.models.config import ModelConfig


class GPT(nn.Module):
    """Token ids ``[B, n]`` (``n ≤ context_length``) → next-token logits ``[B, n, vocab_size]``.

    The official model applies the encoder's final LayerNorm and then its own (``norm``)
    before the head; both are kept so that parameter counts and official weights match.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"GPT needs arch=gpt, got {cfg.arch}")
        self.config = cfg
        dim = cfg.dims.dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, dim)
        self.pos_embedding = nn.Embedding(cfg.context_length, dim) if cfg.learned_position else None
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.encoder = Encoder(cfg, cfg.layout(), causal=True)
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise all weights as the official code does; use after ``to_empty``."""
        reset_submodules(self)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.readout(self.encoder(self.embed(tokens)))

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids → the encoder's input (a pipeline's first stage runs this part alone)."""
        n = tokens.shape[1]
        if n > self.config.context_length:
            raise ValueError(f"sequence of {n} tokens exceeds context_length={self.config.context_length}")
        x = self.token_embedding(tokens)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(n, device=tokens.device))
        return self.emb_dropout(x)

    def readout(self, x: Tensor) -> Tensor:
        """The encoder's output → logits (a pipeline's last stage runs this part alone)."""
        return self.head(self.final_norm(x))
