"""What a model is trained on: image classification (ViT) or next-token prediction (GPT)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translution_dist.data.dataset import IGNORE_INDEX


@dataclass
class StepOutput:
    loss: Tensor
    samples: int
    tokens: int


class ClassificationTask:
    """Cross-entropy on class-token logits; evaluation reports top-1 and top-5 accuracy."""

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
        images, labels = batch
        loss = F.cross_entropy(model(images), labels)
        return StepOutput(loss, images.shape[0], images.shape[0])

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        """Sums over the batch; samples that only pad the split (``IGNORE_INDEX``) do not count."""
        images, labels = batch
        logits = model(images).float()
        real = labels != IGNORE_INDEX
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        return {
            "loss_sum": F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX).item(),
            "top1": ((top5[:, 0] == labels) & real).sum().item(),
            "top5": ((top5 == labels[:, None]).any(-1) & real).sum().item(),
            "count": real.sum().item(),
        }

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1)
        return {"eval_loss": sums["loss_sum"] / n, "eval_top1": sums["top1"] / n, "eval_top5": sums["top5"] / n}


class LanguageModelTask:
    """Next-token cross-entropy; evaluation reports loss and perplexity."""

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
        inputs, targets = batch
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return StepOutput(loss, inputs.shape[0], inputs.numel())

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        inputs, targets = batch
        logits = model(inputs).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
        return {"loss_sum": loss.item(), "count": (targets != IGNORE_INDEX).sum().item()}

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss_sum"] / max(sums["count"], 1)
        return {"eval_loss": loss, "eval_perplexity": float(torch.tensor(loss).exp())}


def task_for(arch: str) -> ClassificationTask | LanguageModelTask:
    return ClassificationTask() if arch == "vit" else LanguageModelTask()
