"""The data position is global: a checkpointed DataState resumes under any world size or layout at
exactly the next sample, neither replaying nor skipping one, and unreadable samples never move it.

Ranks run in this process, in lock step, each with its own loader (as each process of a run
builds one); samples are recorded by key (the id shards' sample ``k`` holds tokens ``[k, k, k]``).
"""

from __future__ import annotations

import pytest

from test_data_readers import write_id_shards
from translution_dist.data import IGNORE_INDEX, DataConfig, build_dataloader

SAMPLES = 240  # a multiple of every global batch below (4, 8, 12), so no epoch leaves a tail
BATCH = 4
EPOCH = SAMPLES  # samples per epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_id_shards(tmp_path_factory.mktemp("position") / "d", samples=SAMPLES, per_shard=25)


def consume(path, ranks: int, samples: int, state: dict | None = None, **cfg) -> tuple[list[int], dict]:
    """Keys of the next ``samples`` samples ``ranks`` ranks consume, in global order (global batch by
    global batch, rank by rank), and the data state every rank then holds."""
    built = [build_dataloader(DataConfig(kind="text", path=path, shuffle_buffer=16, **cfg), split="train",
                              dp_rank=r, dp_size=ranks, batch_size=BATCH, seed=3) for r in range(ranks)]
    loaders, states = zip(*built)
    if state is not None:
        for s in states:
            s.load_state_dict(state)
    keys: list[int] = []
    iterators = [iter(loader) for loader in loaders]
    while len(keys) < samples:
        batches = [next(it, None) for it in iterators]
        if batches[0] is None:  # an epoch ended on every rank
            assert all(b is None for b in batches)
            iterators = [iter(loader) for loader in loaders]
            continue
        keys += [int(k) for inputs, _ in batches for k in inputs[:, 0]]
    saved = [s.state_dict() for s in states]
    assert all(s == saved[0] for s in saved), "every rank holds the same data state"
    return keys, saved[0]


@pytest.fixture(scope="module")
def reference(shards):
    """Two epochs of an uninterrupted 2-rank run."""
    keys, _ = consume(shards, 2, 2 * EPOCH)
    assert sorted(keys[:EPOCH]) == sorted(keys[EPOCH:]) == list(range(SAMPLES)) and keys[:EPOCH] != keys[EPOCH:]
    return keys


@pytest.mark.parametrize(
    ("before", "after", "stop"),
    [
        (2, 1, 56),  # mid-epoch
        (1, 2, 56),
        (2, 3, 48),
        (2, 1, EPOCH),  # at the epoch boundary
        (1, 2, EPOCH + 8),  # in the second epoch
        (2, 3, EPOCH + 24),
    ],
)
def test_resume_under_another_data_parallel_size_neither_replays_nor_skips(shards, reference, before, after, stop):
    """Also the layout change dp_shard=2 → tp=2 at the same world size: data-parallel size 2 → 1."""
    first, state = consume(shards, before, stop)
    assert (state["epoch"], state["consumed"]) == divmod(stop, EPOCH)
    rest, _ = consume(shards, after, 2 * EPOCH - stop, state)
    assert first + rest == reference


def test_the_order_does_not_depend_on_ranks(shards, reference):
    assert consume(shards, 1, 2 * EPOCH)[0] == consume(shards, 3, 2 * EPOCH)[0] == reference


def test_a_tail_shorter_than_the_new_global_batch_ends_the_epoch(shards, reference):
    first, state = consume(shards, 1, 52)  # 188 samples left: 23 global batches of 8 and 4 samples
    rest, after = consume(shards, 2, 184 + EPOCH, state)
    assert first + rest == reference[:236] + reference[EPOCH:]
    assert (after["epoch"], after["consumed"]) == (2, 0)


@pytest.mark.multiprocess
def test_workers_do_not_change_the_position(shards, reference):
    first, state = consume(shards, 2, 40, num_workers=2)
    rest, _ = consume(shards, 1, 2 * EPOCH - 40, state, num_workers=2, worker_start_method="fork")
    assert first + rest == reference


def test_samples_per_epoch_is_kept_for_the_epoch_a_resumed_run_is_in(shards):
    """An epoch's length is fixed when it starts: 2 ranks x 60 = 120 samples, also after resuming on 1 rank."""
    first, state = consume(shards, 2, 48, samples_per_epoch=60)
    assert state["length"] == 120
    rest, after = consume(shards, 1, 72 + 60, state, samples_per_epoch=60)
    assert sorted(first + rest[:72]) == sorted(set(first + rest[:72]))
    assert (after["epoch"], after["consumed"], after["length"]) == (2, 0, 60)


def test_unreadable_samples_keep_their_slots(tmp_path, caplog):
    path = write_id_shards(tmp_path / "d", samples=100, per_shard=20, corrupt=(7, *range(40, 60)))
    loader, state = build_dataloader(DataConfig(kind="text", path=path, shuffle_buffer=0), split="train",
                                     dp_rank=0, dp_size=1, batch_size=10, seed=0)
    batches = list(loader)
    assert len(batches) == 10 and all(inputs.shape == (10, 2) for inputs, _ in batches)
    trained = [int(k) for inputs, targets in batches for k in inputs[targets[:, 0] != IGNORE_INDEX, 0]]
    assert state.skipped_samples == 21 and "skipping sample train-000007" in caplog.text
    # sample 7's slot holds a copy with an ignored target; the unreadable shard's two batches train on the
    # readable samples after them in the order (a batch with no target has no loss)
    whole = [inputs for inputs, targets in batches if (targets[:, 0] == IGNORE_INDEX).sum() == 1]
    assert len(whole) == 1 and 7 not in trained
    assert len(trained) == 99 - 20 + 20 and set(trained) == set(range(100)) - {7, *range(40, 60)}


def test_a_run_of_unreadable_batches_names_the_shards(tmp_path):
    path = write_id_shards(tmp_path / "d", samples=40, per_shard=20, corrupt=tuple(range(40)))
    loader, _ = build_dataloader(DataConfig(kind="text", path=path), split="train", dp_rank=0, dp_size=1,
                                 batch_size=4, seed=0)
    with pytest.raises(RuntimeError, match="all unreadable.*translution data inspect"):
        next(iter(loader))
