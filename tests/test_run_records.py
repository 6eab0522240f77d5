"""What a run leaves in MLflow, read back from a real server on loopback: its data sets (training and
evaluation), the tokenizer beside the model, every resumed segment, the code's commit and whether it
was dirty; an embedded store under an awkward ``run.output_dir``; and ``translution generate`` on a
real tiny text run."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from launcher.cli import main
from reliability.harness import MlflowServer, run, train_cmd, write_config
from training.provenance import git_state
from training.tracking import Tracker, default_tracking_uri, sqlite_uri
from translution_dist.data import build_text_shards

GPT = {"arch": "gpt", "attention": "translution", "dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32,
       "context_length": 16, "vocab_size": 300}
WORDS = "displacement bank query key value window token shard rank step checkpoint model".split()


# -- in process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", ["a%41b", "c?d"])
def test_embedded_store_under_an_output_dir_with_percent_or_question_mark(tmp_path, monkeypatch, directory):
    """The default store is ``OUTPUT_DIR/mlflow.db`` however the directory is spelt (before: SQLAlchemy read
    ``%41`` as ``A`` and cut the path at ``?``: an error, or a store in ``c/``)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output_dir = tmp_path / directory
    tracker = Tracker(default_tracking_uri(output_dir), "awkward")
    run_id = tracker.start("r", {})
    tracker.log_artifact(Path(__file__), "code")
    assert tracker.finish(wait_s=0) == 0
    store = output_dir / "mlflow.db"
    assert store.is_file() and not (tmp_path / "aAb").exists() and not (tmp_path / "c").exists()
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri(store))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert list((output_dir / "mlartifacts").rglob(Path(__file__).name))  # artifacts beside the store


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_git_state_says_commit_and_dirty_and_never_fails(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_state(repo) == {"git_commit": head, "git_dirty": "false"}
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(repo) == {"git_commit": head, "git_dirty": "true"}
    _git(repo, "checkout", "-q", "code.py")
    (repo / "new_module.py").write_text("")
    assert git_state(repo)["git_dirty"] == "true"  # an added file changes the code too
    unknown = {"git_commit": "unknown", "git_dirty": "unknown"}
    (tmp_path / "plain").mkdir()
    assert git_state(tmp_path / "plain") == unknown  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries"))
    assert git_state(repo) == unknown


def test_generate_refuses_a_path_that_is_no_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hello"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# -- real runs on a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.kill()


def _text_data(directory: Path) -> Path:
    docs = directory / "docs"
    docs.mkdir()
    for i in range(12):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(120)]
        (docs / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    data = directory / "text"
    build_text_shards(docs, data, context_length=GPT["context_length"], vocab_size=GPT["vocab_size"],
                      test_fraction=0.25, samples_per_shard=64)
    return data


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, server):
    """A tiny GPT trained for 4 steps on real text shards, tracked on the server: ``(run_dir, data, run_id)``."""
    directory = tmp_path_factory.mktemp("text")
    data = _text_data(directory)
    config = write_config(directory, "gpt", model=GPT, data={"kind": "text", "path": str(data)},
                          train={"steps": 4, "micro_batch_size": 4, "checkpoint_every": 2},
                          tracking={"enabled": True, "uri": server.uri, "experiment": "records"})
    run(train_cmd(config))
    run_dir = directory / "runs" / "gpt"
    return run_dir, data, (run_dir / "mlflow_run_id").read_text()


@pytest.mark.multiprocess
def test_a_text_run_records_its_data_sets_code_and_tokenizer(server, text_run, tmp_path):
    run_dir, data, run_id = text_run
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    found = client.get_run(run_id)
    index = (data / "index.json").read_bytes()
    inputs = {d.dataset.name: d for d in found.inputs.dataset_inputs}
    assert set(inputs) == {"text/train", "text/test"}
    splits = json.loads(index)["splits"]
    for split, context in (("train", "training"), ("test", "evaluation")):
        dataset = inputs[f"text/{split}"]
        assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == context
        assert dataset.dataset.digest == hashlib.sha256(index).hexdigest()[:32]
        assert json.loads(dataset.dataset.source)["uri"] == str(data.resolve())
        profile = json.loads(dataset.dataset.profile)
        assert profile["samples"] == splits[split]["samples"] and profile["index_sha256"] == hashlib.sha256(
            index).hexdigest()
    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    assert (downloaded / "data" / "DATACARD.md").read_text() == (data / "DATACARD.md").read_text()
    assert (downloaded / "model" / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert (downloaded / "model" / "model.safetensors").is_file()
    tags = found.data.tags
    assert tags["git_commit"] == git_state()["git_commit"] and tags["git_dirty"] in ("true", "false")
    assert tags["host"] == socket.gethostname() and tags["engine"] == "none" and tags["segment"] == "1"


@pytest.mark.multiprocess
def test_every_resumed_segment_is_recorded(tmp_path, server):
    """Resumed with more steps somewhere else: the run's parameters stay the first segment's, segment 2's
    changes, config and start are recorded beside them, and the tags say where it runs now."""
    config = write_config(tmp_path, "segments", train={"steps": 2, "checkpoint_every": 2},
                          tracking={"enabled": True, "uri": server.uri, "experiment": "records"})
    run(train_cmd(config))
    run(train_cmd(config, "train.steps=4"), TRANSLUTION_TOPOLOGY="elsewhere")
    run_dir = tmp_path / "runs" / "segments"
    run_id = (run_dir / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED"
    params, tags = found.data.params, found.data.tags
    assert params["train.steps"] == "2" and params["segment_2.train.steps"] == "4"
    assert not any(key.startswith("segment_2.") and key != "segment_2.train.steps" for key in params)
    assert tags["segment"] == "2" and tags["topology"] == "elsewhere"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "segment")] == [(0, 1.0), (2, 2.0)]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    segment_config = Path(client.download_artifacts(run_id, "segment_2/config.yaml", str(tmp_path)))
    assert yaml.safe_load(segment_config.read_text())["train"]["steps"] == 4
    synthetic = {d.dataset.name: d.dataset for d in found.inputs.dataset_inputs}
    assert set(synthetic) == {"synthetic-image/train", "synthetic-image/test"}
    assert json.loads(synthetic["synthetic-image/train"].source)["tags"]["config"]["samples"] == 256


@pytest.mark.multiprocess
def test_generate_samples_the_requested_tokens_deterministically(text_run, capsys):
    run_dir, data, _ = text_run

    def generate(seed: int) -> dict:
        argv = ["generate", str(run_dir), "--prompt", "displacement bank", "--max-new-tokens", "9",
                "--temperature", "0.8", "--top-k", "20", "--seed", str(seed), "--json"]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    first = generate(seed=3)
    assert len(first["ids"]) == 9 and first["step"] == 4 and first["text"].startswith("displacement bank")
    assert generate(seed=3) == first
    assert all(0 <= i < GPT["vocab_size"] for i in first["ids"])
    moved = data.rename(data.with_name("moved"))  # the run keeps its own tokenizer: the data set may go
    try:
        assert generate(seed=3) == first
    finally:
        moved.rename(data)
