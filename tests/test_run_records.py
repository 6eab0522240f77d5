"""What a run leaves in MLflow, read back from a real server on loopback: its data sets (training and
evaluation), the tokenizer beside the model, every resumed segment, the code's commit and whether it
was dirty; an embedded store under an awkward ``run.output_dir``; and ``translution generate`` on a
real tiny text run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from training.tracking import Tracker, default_tracking_uri, sqlite_uri


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
