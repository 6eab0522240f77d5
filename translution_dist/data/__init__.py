"""Webdataset input pipelines: shard builders, deterministic resumable readers, CLI.

Trainer entry point::

    loader, state = build_dataloader(cfg.data, split="train", dp_rank=r, dp_size=n,
                                     batch_size=b, seed=s)
    state.load_state_dict(ckpt["data"])          # when resuming, under any layout
    for inputs, targets in loader:               # the rest of the current epoch
        ...
        log(state.metrics())                     # skipped shards/samples, epoch
    ckpt["data"] = state.state_dict()            # the same on every rank

* ``dp_rank``/``dp_size`` are the data-parallel coordinates (tensor-parallel peers pass
  the same ones and get the same batches); nothing is read from the environment.
* An epoch is one global sample order (seed, epoch; never ranks or workers); each global
  batch is its next ``dp_size x batch_size`` samples, rank ``r`` taking the ``r``-th slice.
  Every rank yields the same number of batches, whatever the number of shards and
  workers, and a restored state resumes at exactly the next sample under any world size
  or layout: nothing is replayed or skipped.
* Batches: images ``float32 [B, C, S, S]`` with ``int64 [B]`` labels; text ``int64
  [B, T]`` inputs and targets. Evaluation (``train=False``, default for splits other
  than ``train``) reads in order, each ``iter`` from the first batch, and covers the
  split once; padding repeats carry ``IGNORE_INDEX`` targets.
* ``loader.info`` (:class:`DataInfo`) gives the input shape, classes or vocabulary.

Builders (also ``translution data mnist|text|image-folder|inspect``):
:func:`build_mnist_shards`, :func:`build_text_shards`, :func:`build_image_folder_shards`.
"""

from translution_dist.data.config import DataConfig, SyntheticConfig
from translution_dist.data.dataset import IGNORE_INDEX
from translution_dist.data.image_folder import build_image_folder_shards
from translution_dist.data.loader import DataState, ResumableLoader, build_dataloader
from translution_dist.data.mnist import build_mnist_shards
from translution_dist.data.shards import BuildError, load_index, verify_shards
from translution_dist.data.sources import DataInfo
from translution_dist.data.text import build_text_shards

__all__ = [
    "IGNORE_INDEX",
    "BuildError",
    "DataConfig",
    "DataInfo",
    "DataState",
    "ResumableLoader",
    "SyntheticConfig",
    "build_dataloader",
    "build_image_folder_shards",
    "build_mnist_shards",
    "build_text_shards",
    "load_index",
    "verify_shards",
]
