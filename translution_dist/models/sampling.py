"""Sampling a continuation from a GPT, one token at a time (no cache: the Translution banks see the whole window)."""

from __future__ import annotations

import torch
from torch import Tensor

from translution_dist.models.gpt import GPT


@torch.no_grad()
def sample(model: GPT, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
           vocab_limit: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """``max_new_tokens`` token ids that follow ``prompt``.

    Each step feeds the last ``context_length`` tokens and draws the next from the softmax of the
    last position's logits over ``temperature`` (0: the most likely token), restricted to the
    ``top_k`` most likely and to ids below ``vocab_limit`` (a tokenizer smaller than the model's
    vocabulary). The same ``generator`` state gives the same tokens.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0, got {temperature}")
    window = model.config.context_length
    device = next(model.parameters()).device
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        context = torch.tensor([tokens[-window:]], dtype=torch.long, device=device)
        logits = model(context)[0, -1].float()
        tokens.append(_draw(logits[:vocab_limit], temperature, top_k, generator))
    return tokens[len(prompt):]


def _draw(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
