"""Readers: the global order, rank/worker slices, equal epoch lengths, corrupt shards, exact resume, evaluation.

Most tests read real tar shards whose sample ``k`` is the token window ``[k, k, k]``, so a
batch's ``inputs[:, 0]`` names the samples it holds.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torch.multiprocessing as mp

from translution_dist.data import IGNORE_INDEX, DataConfig, SyntheticConfig, build_dataloader, build_mnist_shards
from translution_dist.data.order import EpochOrder
from translution_dist.data.shards import SplitWriter, load_index, write_index
from translution_dist.data.sources import Counters, TarSource

WINDOW = 3


def write_id_shards(directory: Path, samples: int, per_shard: int, corrupt: tuple[int, ...] = ()) -> Path:
    """Text-kind shards whose sample k holds tokens [k, k, k]; ids in ``corrupt`` hold garbage."""
    directory.mkdir(parents=True)
    writer = SplitWriter(directory, "train", per_shard)
    for k in range(samples):
        tokens = b"garbage" if k in corrupt else np.full(WINDOW, k, np.uint16)
        writer.write({"__key__": f"train-{k:06d}", "tokens.npy": tokens})
    write_index(
        directory,
        kind="text",
        builder="test",
        params={},
        splits={"train": writer.close()},
        sample_keys=["tokens.npy"],
        extra={"text": {"context_length": WINDOW - 1, "window": WINDOW, "vocab_size": 1 << 16}},
    )
    return directory


def run_epoch(path: Path, *, rank: int = 0, ranks: int = 1, batch_size: int = 8, seed: int = 0, **cfg) -> list:
    loader, _ = build_dataloader(
        DataConfig(kind="text", path=path, **cfg),
        split="train",
        dp_rank=rank,
        dp_size=ranks,
        batch_size=batch_size,
        seed=seed,
    )
    return list(loader)


def ids(batches: list) -> list[int]:
    return [int(k) for inputs, _ in batches for k in inputs[:, 0]]


def test_epoch_order_is_a_seeded_permutation_shuffled_in_windows():
    counts = [45] * 4 + [23]
    order = EpochOrder(counts, seed=3, epoch=0, shuffle=True, shuffle_buffer=16)
    first = order.ids(0, 203)
    assert sorted(first) == list(range(203)) and first != list(range(203))
    assert sorted(order.ids(203, 406)) == list(range(203)) and order.ids(203, 406) != first, "cycle 1: a new permutation"
    for window in range(0, 203, 16):  # a window holds consecutive positions of the shard order: 2 shards at most
        assert len({order.locate(i)[0] for i in first[window : window + 16]}) <= 2
    assert EpochOrder(counts, seed=3, epoch=0, shuffle=True, shuffle_buffer=16).ids(0, 203) == first
    assert EpochOrder(counts, seed=3, epoch=1, shuffle=True, shuffle_buffer=16).ids(0, 203) != first
    assert EpochOrder(counts, seed=3, epoch=0, shuffle=False, shuffle_buffer=16).ids(0, 203) == list(range(203))
    assert order.locate(0) == (0, 0) and order.locate(46) == (1, 1) and order.locate(202) == (4, 22)
    with pytest.raises(ValueError, match="batch_size=64 exceeds"):
        build_dataloader(DataConfig(synthetic=SyntheticConfig(samples=50)), split="train", dp_rank=0, dp_size=1,
                         batch_size=64, seed=0)


@pytest.mark.multiprocess
def test_two_ranks_two_workers_get_equal_disjoint_slices(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=203, per_shard=45)
    epochs = [run_epoch(path, rank=r, ranks=2, num_workers=2, shuffle_buffer=16) for r in range(2)]
    assert [len(e) for e in epochs] == [12, 12]
    assert all(inputs.shape == (8, WINDOW - 1) for e in epochs for inputs, _ in e)
    seen = ids(epochs[0]) + ids(epochs[1])
    assert len(seen) == len(set(seen)) == 192 and set(seen) <= set(range(203))
    assert ids(epochs[0]) != sorted(ids(epochs[0])), "training batches are shuffled"
    batch = epochs[0][0]
    assert batch[0].dtype == torch.int64 and torch.equal(batch[0][:, 1:], batch[1][:, :-1])


@pytest.mark.multiprocess
def test_fewer_shards_than_ranks_times_workers(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=50, per_shard=50)
    epochs = [run_epoch(path, rank=r, ranks=2, batch_size=4, num_workers=2) for r in range(2)]
    assert [len(e) for e in epochs] == [6, 6]
    seen = ids(epochs[0]) + ids(epochs[1])
    assert len(set(seen)) == len(seen) == 48
    longer = [run_epoch(path, rank=r, ranks=2, batch_size=4, num_workers=2, samples_per_epoch=90) for r in range(2)]
    assert [len(e) for e in longer] == [22, 22], "the order cycles past the split instead of running dry"


@pytest.mark.multiprocess
def test_batches_do_not_depend_on_num_workers(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=100, per_shard=20)
    by_workers = [ids(run_epoch(path, num_workers=w, seed=5, shuffle_buffer=30)) for w in (0, 1, 2)]
    assert by_workers[0] == by_workers[1] == by_workers[2]
    assert ids(run_epoch(path, seed=6, shuffle_buffer=30)) != by_workers[0]


@pytest.mark.multiprocess
def test_truncated_shard_is_skipped_and_counted(tmp_path, caplog):
    path = write_id_shards(tmp_path / "d", samples=100, per_shard=25)
    shard = path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    kept = 0  # samples (one member each) still readable before the cut
    with tarfile.open(shard, "r|") as tar:
        try:
            for member in tar:
                tar.extractfile(member).read()
                kept += 1
        except tarfile.ReadError:
            pass
    assert 0 < kept < 25
    loader, state = build_dataloader(
        DataConfig(kind="text", path=path), split="train", dp_rank=0, dp_size=1, batch_size=10, seed=0, train=False
    )
    batches = list(loader)
    assert len(batches) == 10
    real = [int(k) for inputs, targets in batches for k in inputs[targets[:, 0] != IGNORE_INDEX, 0]]
    assert real == list(range(25 + kept)) + list(range(50, 100))
    assert (state.skipped_shards, state.skipped_samples) == (1, 25 - kept)
    assert state.metrics()["data/skipped_samples"] == 25 - kept
    assert "skipping shard" in caplog.text and "train-000001.tar" in caplog.text
    train_epochs = [run_epoch(path, rank=r, ranks=2, batch_size=5, num_workers=2) for r in range(2)]
    assert [len(e) for e in train_epochs] == [10, 10]


@pytest.mark.multiprocess
def test_resume_replays_exactly_the_unseen_batches(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=150, per_shard=25, corrupt=(*range(30, 38), 111))
    cfg = DataConfig(kind="text", path=path, num_workers=2, shuffle_buffer=16)

    def build():
        return build_dataloader(cfg, split="train", dp_rank=1, dp_size=2, batch_size=4, seed=7)

    loader, state = build()
    reference = list(loader) + list(loader)  # two epochs
    assert len(reference) == 2 * len(loader) == 36
    assert state.skipped_samples >= 1 and state.epoch == 2
    for stop in (7, 18, 23):
        loader, state = build()
        consumed = []
        while len(consumed) < stop:
            for batch in loader:
                consumed.append(batch)
                if len(consumed) == stop:
                    break
        saved = state.state_dict()
        resumed, resumed_state = build()
        resumed_state.load_state_dict(saved)
        rest = []
        while len(consumed) + len(rest) < len(reference):
            rest.extend(resumed)
        for (a, b), (c, d) in zip(consumed + rest, reference, strict=True):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_state_must_match_the_order(tmp_path, caplog):
    path = write_id_shards(tmp_path / "d", samples=40, per_shard=10)

    def build(seed: int):
        return build_dataloader(DataConfig(kind="text", path=path), split="train", dp_rank=0, dp_size=1,
                                batch_size=4, seed=seed)

    loader, state = build(0)
    next(iter(loader))
    saved = state.state_dict()
    assert saved["consumed"] == 4
    _, other = build(1)
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        other.load_state_dict(saved)
    assert (other.epoch, other.consumed) == (0, 0)
    other.load_state_dict({**saved, "epoch": 3}, strict=False)
    assert (other.epoch, other.consumed) == (3, 0) and "epoch 3 restarts from its first sample" in caplog.text
    old = {"version": 1, "epoch": 2, "batch": 5, "stream_positions": [20], "fingerprint": {"seed": 0}}
    with pytest.raises(ValueError, match="data state version 1"):
        state.load_state_dict(old)
    state.load_state_dict(old, strict=False)
    assert (state.epoch, state.consumed) == (2, 0) and "per-rank stream positions" in caplog.text


def test_evaluation_covers_each_sample_once(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=203, per_shard=45)
    counted, lengths = [], []
    for rank in range(2):
        loader, _ = build_dataloader(
            DataConfig(kind="text", path=path),
            split="train",
            dp_rank=rank,
            dp_size=2,
            batch_size=8,
            seed=0,
            train=False,
        )
        batches = list(loader)
        lengths.append(len(batches))
        counted += [int(k) for inputs, targets in batches for k in inputs[targets[:, 0] != IGNORE_INDEX, 0]]
    assert lengths[0] == lengths[1]
    assert sorted(counted) == list(range(203))
    first = next(iter(loader))
    assert torch.equal(first[0], next(iter(loader))[0]), "every evaluation pass starts at its first batch"


def test_reading_by_position_gives_webdatasets_samples(tmp_path):
    """The tar index (header scan, then one seek per sample) yields what webdataset's streaming reader does."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    out = tmp_path / "mnist"
    build_mnist_shards(out, train_samples=30, test_samples=10, samples_per_shard=12)
    shards = load_index(out)["splits"]["train"]["shards"]
    source = TarSource(out, shards)
    for shard, entry in enumerate(shards):
        with open(out / entry["file"], "rb") as stream:
            streamed = list(group_by_keys(tar_file_expander([{"url": str(out / entry["file"]), "stream": stream}])))
        assert [source.get(shard, i, Counters()) for i in range(entry["samples"])] == streamed


def test_mnist_batches_are_normalised_images(tmp_path):
    out = tmp_path / "mnist"
    build_mnist_shards(out, train_samples=64, test_samples=16, samples_per_shard=20)
    loader, _ = build_dataloader(
        DataConfig(kind="mnist", path=out), split="train", dp_rank=0, dp_size=1, batch_size=16, seed=0
    )
    assert loader.info.input_shape == (1, 84, 84) and loader.info.num_classes == 10
    images, labels = map(torch.cat, zip(*loader))
    assert images.shape == (64, 1, 84, 84) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() <= 9
    assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05
    raw, _ = build_dataloader(
        DataConfig(kind="mnist", path=out, normalize=False), split="test", dp_rank=0, dp_size=1, batch_size=16, seed=0
    )
    pixels = torch.cat([x for x, _ in raw])
    assert pixels.min() == 0 and 0.9 < pixels.max() <= 1
    with pytest.raises(ValueError, match="holds 'mnist'"):
        build_dataloader(DataConfig(kind="text", path=out), split="train", dp_rank=0, dp_size=1, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="no shards for split 'val'"):
        build_dataloader(DataConfig(kind="mnist", path=out), split="val", dp_rank=0, dp_size=1, batch_size=4, seed=0)


def test_synthetic_data_and_pickled_dataset(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(samples=40, samples_per_shard=8, image_size=12, channels=3))
    loader, _ = build_dataloader(cfg, split="train", dp_rank=0, dp_size=1, batch_size=4, seed=1)
    batches = list(loader)
    assert len(batches) == 10 and batches[0][0].shape == (4, 3, 12, 12) and batches[0][1].dtype == torch.int64
    again = list(pickle.loads(pickle.dumps(loader.dataset)))  # what spawned workers receive
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    text = DataConfig(synthetic=SyntheticConfig(task="text", context_length=5, vocab_size=11))
    loader, _ = build_dataloader(text, split="test", dp_rank=0, dp_size=1, batch_size=2, seed=1)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (2, 5) and loader.info.vocab_size == 11


def test_config_is_strict():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        DataConfig(kind="synthetic", shuffle=True)
    with pytest.raises(pydantic.ValidationError, match=r"data\.path is required"):
        DataConfig(kind="mnist")
    with pytest.raises(pydantic.ValidationError, match="data.streams_per_rank is no longer a setting"):
        DataConfig(num_workers=2, streams_per_rank=3)
    assert DataConfig(streams_per_rank=None) == DataConfig(), "configs dumped by earlier versions still load"


def _spawned_rank(rank: int, path: str, out: str) -> None:
    """One rank as a trainer starts it: no RANK in the environment, only the explicit rank."""
    assert "RANK" not in os.environ
    cfg = DataConfig(kind="text", path=path, num_workers=2, worker_start_method="fork")
    loader, _ = build_dataloader(cfg, split="train", dp_rank=rank, dp_size=2, batch_size=5, seed=0)
    torch.save(ids(list(loader)), f"{out}/rank{rank}.pt")


@pytest.mark.multiprocess
def test_ranks_under_multiprocessing_spawn(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=60, per_shard=60)
    mp.spawn(_spawned_rank, args=(str(path), str(tmp_path)), nprocs=2)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 30
    assert not set(seen[0]) & set(seen[1])
