"""Faults inside the training loop: a stalled rank, a NaN loss, and corrupt or truncated data shards."""

from __future__ import annotations

import math
import re
import signal
import time
from datetime import datetime

import numpy as np
import pytest

from reliability.harness import (
    MODEL,
    launch_cmd,
    lines_with,
    reap,
    run,
    start,
    train_cmd,
    wait_for_file,
    write_config,
)
from translution_dist.data.image_folder import build_image_folder_shards
from translution_dist.data.shards import load_index

pytestmark = pytest.mark.multiprocess  # every test here starts processes


def _log_time(line: str) -> float:
    stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line).group(1)
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_hung_collective_fails_the_job_naming_the_ranks(tmp_path):
    """Rank 1 sleeps before step 3: rank 0 waits in FSDP's all-gather until the gloo timeout, then says which
    rank it is, which collective, and which rank stayed silent; torchrun ends the job."""
    timeout_s = 10
    config = write_config(tmp_path, "hung", parallel={"engine": "fsdp"},
                          train={"collective_timeout_s": timeout_s, "checkpoint_every": 0})
    started = time.monotonic()
    result = run(launch_cmd(config, nproc=2), fault="hang@step:3:rank:1", expect=1, timeout=240)
    ended = time.monotonic()

    hang = lines_with(result.stderr, "[rank 1]", "TRANSLUTION_FAULT: hang at step 3")
    error = lines_with(result.stderr, "[rank 0] ERROR", "rank 0 of 2: collective", "in training step 3",
                       f"train.collective_timeout_s={timeout_s}s", "rank(s) 1 did not report a timeout")
    assert hang and error, result.stderr[-4000:]
    detected = _log_time(error[0]) - _log_time(hang[0])
    assert timeout_s <= detected <= timeout_s + 10, detected  # the timeout, plus 5 s for the other ranks' reports
    assert "CollectiveTimeoutError" in result.stderr and ended - started < 240


def test_nan_loss_is_skipped_and_the_run_goes_on(tmp_path):
    config = write_config(tmp_path, "skip", train={"nonfinite_loss": "skip", "checkpoint_every": 0})
    result = run(train_cmd(config), fault="nan@step:3")
    warning = lines_with(result.stderr, "WARNING", "step 3: non-finite values (loss=nan",
                         "non-finite gradients in param group 0", "step skipped as train.nonfinite_loss=skip")
    assert warning, result.stderr[-3000:]
    final = re.search(r"done: step 6, loss ([-0-9.naif]+)", result.stderr)
    assert final and math.isfinite(float(final.group(1)))


def test_nan_loss_stops_the_run_naming_step_and_group(tmp_path):
    """A learning rate of 1e30 blows the weights up in one step; the next loss is NaN and the run stops."""
    config = write_config(tmp_path, "stop", optim={"lr": 1e30}, train={"nonfinite_loss": "stop"})
    result = run(train_cmd(config), expect=1)
    error = lines_with(result.stderr, "ERROR", "step 2: non-finite values", "param group 0",
                       "stopping as train.nonfinite_loss=stop")
    assert error and "NonFiniteLossError" in result.stderr, result.stderr[-3000:]
    checkpoints = tmp_path / "runs" / "stop" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # nothing poisoned was saved


@pytest.fixture
def image_shards(tmp_path):
    """A real image-folder data set, 64 train images in 8 shards (2 classes, 12×12 RGB PNGs)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 64), ("test", 16)):
        for i in range(count):
            folder = tmp_path / "images" / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "shards"
    build_image_folder_shards({"train": tmp_path / "images" / "train", "test": tmp_path / "images" / "test"}, out,
                              image_size=12, image_format="png", samples_per_shard=8)
    return out


def test_corrupt_and_truncated_shards_are_skipped_and_counted(tmp_path, image_shards):
    shards = [image_shards / s["file"] for s in load_index(image_shards)["splits"]["train"]["shards"]]
    data = bytearray(shards[2].read_bytes())
    data[600:3000] = b"\xde\xad\xbe\xef" * 600  # garbage over headers and members
    shards[2].write_bytes(bytes(data))
    shards[5].write_bytes(shards[5].read_bytes()[:1500])  # cut short mid-member
    config = write_config(tmp_path, "shards", model={**MODEL, "channels": 3, "num_classes": 2},
                          data={"kind": "image_folder", "path": str(image_shards), "shuffle_buffer": 0},
                          train={"steps": 8, "checkpoint_every": 0}, tracking={"enabled": True, "log_model": False})
    result = run(train_cmd(config))

    assert lines_with(result.stderr, "skipping shard", shards[2].name)
    assert lines_with(result.stderr, "skipping shard", shards[5].name)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "runs" / "shards" / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FINISHED"
    skipped = client.get_metric_history(run_id, "data/skipped_shards")
    assert max(m.value for m in skipped) >= 2
    assert max(m.value for m in client.get_metric_history(run_id, "data/skipped_samples")) >= 1
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(1, 9))


def test_a_second_run_in_a_run_directory_is_refused_live_or_not_and_a_killed_one_leaves_no_lock(tmp_path):
    """Same run.name and output_dir, another seed: refused while the first lives, and also after it died (it would
    resume the first run's checkpoint), as is train.resume=never there; the first run's own config goes on."""
    config = write_config(tmp_path, "shared", train={"steps": 4})
    first = start(train_cmd(config), fault="hang@step:3:seconds:600")
    # past its set-up, the first run holds the directory
    wait_for_file(tmp_path / "runs" / "shared" / "checkpoints" / "step_00000002" / "COMPLETE.json", first)

    second = run(train_cmd(config, "run.seed=1"), expect=2)
    assert lines_with(second.stderr, "run.name:", "is in use by another run", '"pid": ' + str(first.pid))
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGKILL)
    first.communicate()
    reap(first.marker, "killed first run")
    other = run(train_cmd(config, "run.seed=1"), expect=2)
    assert lines_with(other.stderr, "run.name:", "holds another run", "run.seed: saved 0, now 1")
    fresh = run(train_cmd(config, "train.resume=never"), expect=2)
    assert lines_with(fresh.stderr, "train.resume: never", "holds checkpoints up to step_00000002")
    again = run(train_cmd(config, "optim.lr=0.002"))
    assert lines_with(again.stderr, "resumed from", "step_00000002")
    assert lines_with(again.stderr, "resuming step_00000002 with changed settings: optim.lr: saved")
