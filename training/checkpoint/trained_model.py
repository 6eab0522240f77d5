"""A checkpoint's model rebuilt whole in one process, on the CPU, for use offline (``translution generate``).

The model tensors are read as ``ckpt export`` reads them (plain tensors assembled by DCP from
whatever shards the writing ranks held, the optimizer state never touched), so a checkpoint of
any engine, layout and world size loads.
"""

from __future__ import annotations

from torch import nn

from training.checkpoint.locate import (
    MODEL_PREFIX,
    CheckpointToolError,
    Located,
    dcp_metadata,
    load_entries,
    model_config,
    model_entries,
)
from translution_dist.models import build_model


def load_model(located: Located) -> nn.Module:
    """The model of ``located`` with its trained weights, in eval mode."""
    metadata = dcp_metadata(located)
    names = list(model_entries(metadata))
    state = load_entries(located, metadata, [MODEL_PREFIX + name for name in names])
    model = build_model(model_config(located))
    try:
        model.load_state_dict({name: state[MODEL_PREFIX + name] for name in names})
    except RuntimeError as err:
        raise CheckpointToolError(f"{located.path}: the weights do not fit the model in meta.json ({err})") from err
    return model.eval()
