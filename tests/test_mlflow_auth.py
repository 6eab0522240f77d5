"""The MLflow server `translution k8s render` deploys, started for real on loopback with the rendered login
wiring (its basic_auth.ini, and the Secret's keys where the Deployment and the training pods read them):
anonymous writes are refused, the trainer's Tracker logs in from its environment and writes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from launcher.k8s import basic_auth_ini, render
from reliability.harness import MlflowServer
from training.config import load_config
from training.tracking import Tracker, sqlite_uri

pytestmark = pytest.mark.multiprocess  # starts an MLflow server

ROOT = Path(__file__).resolve().parents[1]
SECRET = {"username": "admin", "password": "a-test-password-of-some-length", "flask-secret-key": "test-csrf-key"}


def _rendered_env() -> dict[str, dict[str, str]]:
    """Per rendered pod kind, its container's environment, with the Secret's test values where it names the Secret."""
    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"cluster={ROOT / 'configs/clusters/local_cpu.yaml'}"])
    envs = {}
    for name, text in render(cfg).items():
        for obj in yaml.safe_load_all(text) if name != "kustomization.yaml" else ():
            if obj["kind"] == "Deployment":
                spec = obj["spec"]["template"]["spec"]
            elif obj["kind"] == "PyTorchJob":
                spec = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
            else:
                continue
            envs[obj["kind"]] = {var["name"]: SECRET[var["valueFrom"]["secretKeyRef"]["key"]] if "valueFrom" in var
                                 else var["value"] for var in spec["containers"][0]["env"]}
    return envs


def _post(uri: str, path: str, body: dict) -> int:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_anonymous_writes_are_refused_and_the_trainer_logs_in(tmp_path, monkeypatch):
    envs = _rendered_env()
    server_env = envs["Deployment"]
    (tmp_path / "basic_auth.ini").write_text(basic_auth_ini(sqlite_uri(tmp_path / "basic_auth.db")))
    server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")  # the rendered /etc/mlflow/…
    del server_env["HOME"], server_env["MLFLOW_SERVER_ALLOWED_HOSTS"]  # the pod's emptyDir, the cluster's host names
    server = MlflowServer(tmp_path, app_name="basic-auth", server_env=server_env)
    server.start()
    try:
        assert _post(server.uri, "experiments/create", {"name": "anonymous"}) == 401
        assert _post(server.uri, "runs/create", {"experiment_id": "0"}) == 401
        assert _post(server.uri, "runs/log-metric", {"run_id": "0", "key": "loss", "value": 1.0, "timestamp": 0,
                                                     "step": 0}) == 401

        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, envs["PyTorchJob"][name])
        tracker = Tracker(server.uri, "authenticated")
        run_id = tracker.start("trainer", {"engine": "fsdp"})
        tracker.log_metrics({"loss": 0.5}, step=1)
        assert tracker.finish(wait_s=5) == 0

        import mlflow

        history = mlflow.MlflowClient(tracking_uri=server.uri).get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 0.5)]
    finally:
        server.kill()
