"""What a model is trained on: image classification (ViT) or next-token prediction (GPT), and whether the
configured model can be trained on the configured data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translution_dist.data import IGNORE_INDEX, DataInfo
from translution_dist.models.config import ModelConfig


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


def check_model_fits_data(model: ModelConfig, info: DataInfo) -> list[str]:
    """Notes on a model larger than its data needs; raises ``ValueError`` naming each field the data cannot feed.

    A model smaller than its data (fewer classes or tokens, shorter context, other image shape) fails
    only at its first batch, with an ``IndexError`` deep in an embedding or the loss; a larger
    vocabulary or more classes train, with rows no target ever selects (on purpose when padded).
    """
    if model.arch == "gpt":
        if info.vocab_size is None:
            raise ValueError(f"model.arch=gpt needs token data, but the data ({info.kind}) holds images; set data.kind "
                             "and data.path to a set written by `translution data text`")
        outputs = ("model.vocab_size", model.vocab_size, info.vocab_size, "vocabulary")
        at_least = [outputs, ("model.context_length", model.context_length, info.input_shape[0], "context length")]
        equal = []
    else:
        if info.num_classes is None:
            raise ValueError(f"model.arch=vit needs image data, but the data ({info.kind}) holds tokens; set data.kind "
                             "and data.path to an image set (`translution data mnist` or `image-folder`)")
        outputs = ("model.num_classes", model.num_classes, info.num_classes, "number of classes")
        at_least = [outputs]
        equal = [("model.image_size", model.image_size, info.input_shape[-1], "image size"),
                 ("model.channels", model.channels, info.input_shape[0], "channels")]
    wrong = [field for field in at_least if field[1] < field[2]] + [field for field in equal if field[1] != field[2]]
    if wrong:
        fixes = [f"{key}={ours} but the data's {what} is {theirs}: set {key}={theirs}"
                 for key, ours, theirs, what in wrong]
        raise ValueError("; ".join(fixes) + " (the model must cover what the data holds)")
    key, ours, theirs, what = outputs
    if ours == theirs:
        return []
    return [f"{key}={ours} exceeds the data's {what} of {theirs}: {ours - theirs} outputs are never a target "
            f"(it trains; set {key}={theirs} unless padded on purpose)"]
