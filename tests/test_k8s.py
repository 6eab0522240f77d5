"""``translution k8s render``: manifests valid against Kubernetes 1.34 (core kinds, kubernetes-validate) and the
vendored CRD schemas (PyTorchJob, TrainJob, JobSet; jsonschema), deterministic, and the examples in k8s/ current."""

from __future__ import annotations

import copy
import json
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.cli import main
from launcher.k8s import FLAVORS, RenderOptions, render
from training.config import load_config

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
jsonschema = pytest.importorskip("jsonschema")
from referencing import Registry, Resource  # noqa: E402  (comes with jsonschema)

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.34"
CRDS = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.v1alpha1.yaml",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.v1alpha2.yaml",
}
EXAMPLES = yaml.safe_load((ROOT / "k8s" / "examples" / "examples.yaml").read_text())


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as kubectl's server-side field validation does (structural schemas only prune)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


@cache
def _registry() -> Registry:
    from kubernetes_validate.utils import schema_contents

    path = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json"
    definitions = schema_contents(path, K8S_VERSION)
    return Resource.from_contents(definitions) @ Registry()


@cache
def _crd_validator(filename: str) -> jsonschema.Draft202012Validator:
    schema = _strict(yaml.safe_load((ROOT / "k8s" / "crds" / filename).read_text()))
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def validate(obj: dict[str, Any]) -> None:
    crd = CRDS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    else:
        errors = sorted(_crd_validator(crd).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def documents(files: dict[str, str]) -> list[dict[str, Any]]:
    return [doc for name, text in files.items() if name != "kustomization.yaml" for doc in yaml.safe_load_all(text)]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples' overrides name files relative to the repository root


def a100(**overrides: str):
    base = ["cluster=configs/clusters/k8s_8x8_a100_80g.yaml", "run.name=vit-a100"]
    return load_config("configs/quickstart.yaml", base + [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_object_is_valid(flavor):
    files = render(a100(), RenderOptions(flavor, image="registry.example/translution:1", namespace="ml"))
    objects = documents(files)
    kinds = sorted(obj["kind"] for obj in objects)
    expected = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob", "jobset": "JobSet"}[flavor]
    assert kinds == sorted(["ConfigMap", "ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "Deployment",
                            "Service", "NetworkPolicy", expected])
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "ml"
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert kustomization["resources"] == [name for name in files if name != "kustomization.yaml"]


def test_validation_catches_mistakes():
    job = next(obj for obj in documents(render(a100())) if obj["kind"] == "PyTorchJob")
    broken = copy.deepcopy(job)
    broken["spec"]["elasticPolicy"]["rdzvBackendd"] = "c10d"
    with pytest.raises(AssertionError, match="rdzvBackendd"):
        validate(broken)
    broken = copy.deepcopy(job)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"] = {"limit": {}}
    with pytest.raises(AssertionError):
        validate(broken)


def test_pytorchjob_contents():
    objects = {obj["metadata"]["name"] if obj["kind"] == "PersistentVolumeClaim" else obj["kind"]: obj
               for obj in documents(render(a100()))}
    spec = objects["PyTorchJob"]["spec"]
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvHost": "vit-a100-master-0", "rdzvPort": 29500,
                                     "minReplicas": 8, "maxReplicas": 8, "maxRestarts": 3}
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 7)
    pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["translution", "launch", "/config/run.yaml"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://vit-a100-mlflow:5000"} in container["env"]
    assert {"name": "MLFLOW_TRACKING_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "vit-a100-mlflow-auth", "key": "password"}}} in container["env"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["terminationGracePeriodSeconds"] == 90  # cluster.stop_grace_s (torchrun --shutdown-timeout) + 30
    assert objects["vit-a100-data"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it
    assert objects["vit-a100-data"]["spec"]["resources"]["requests"]["storage"] == "2Ti"
    mlflow = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert mlflow[:4] == ["mlflow", "server", "--app-name", "basic-auth"] and "sqlite:////mlflow/mlflow.db" in mlflow


def _pods(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates (labels and spec) an object starts; a TrainJob's as its override gives them."""
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    if obj["kind"] == "PyTorchJob":
        return [replica["template"] for replica in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "JobSet":
        return [job["template"]["spec"]["template"] for job in obj["spec"]["replicatedJobs"]]
    if obj["kind"] == "TrainJob":
        return obj["spec"]["podTemplateOverrides"]
    return []


@pytest.mark.parametrize("flavor", FLAVORS)
def test_only_the_trainers_reach_mlflow_and_they_log_in_from_a_secret(flavor):
    objects = documents(render(a100(), RenderOptions(flavor)))
    assert "Secret" not in {obj["kind"] for obj in objects}  # the user creates it: no password in these files
    assert not any("admin_password" in text for obj in objects if obj["kind"] == "ConfigMap"
                   for text in obj["data"].values())
    policy = next(obj for obj in objects if obj["kind"] == "NetworkPolicy")
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    server = next(obj for obj in objects if obj["kind"] == "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"][0]["ports"][0]["port"] == 5000
    assert not admitted.items() <= server["spec"]["template"]["metadata"]["labels"].items()
    job = next(obj for obj in objects if obj["kind"] == {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob",
                                                         "jobset": "JobSet"}[flavor])
    for pod in _pods(job):
        assert admitted.items() <= pod["metadata"]["labels"].items()
    env = job["spec"]["trainer"]["env"] if flavor == "trainjob" else _pods(job)[0]["spec"]["containers"][0]["env"]
    secret_refs = {var["name"]: var["valueFrom"]["secretKeyRef"] for var in env if "valueFrom" in var
                   and "secretKeyRef" in var["valueFrom"]}
    assert secret_refs == {"MLFLOW_TRACKING_USERNAME": {"name": "vit-a100-mlflow-auth", "key": "username"},
                           "MLFLOW_TRACKING_PASSWORD": {"name": "vit-a100-mlflow-auth", "key": "password"}}
    server_env = {var["name"]: var for var in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, key in [("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")]:
        assert server_env[name]["valueFrom"]["secretKeyRef"] == {"name": "vit-a100-mlflow-auth", "key": key}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_container_is_unprivileged_on_a_read_only_root(flavor):
    objects = documents(render(a100(), RenderOptions(flavor)))
    pods = [pod for obj in objects for pod in _pods(obj)]
    assert len(pods) >= 2  # the MLflow server's and the trainers'
    for pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 1000
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                    "capabilities": {"drop": ["ALL"]}}
            mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounted["/tmp"] in scratch and mounted["/home/translution"] in scratch


def test_configmap_holds_the_resolved_config(tmp_path):
    cfg = a100(**{"train.steps": "7"})
    configmap = next(obj for obj in documents(render(cfg)) if obj["kind"] == "ConfigMap")
    path = tmp_path / "run.yaml"
    path.write_text(configmap["data"]["run.yaml"])
    assert load_config(path) == cfg  # includes and overrides are baked in; the pod needs no other file


def test_tracking_uri_in_config_means_no_server():
    files = render(a100(**{"tracking.uri": "http://mlflow.example:5000"}))
    assert "mlflow.yaml" not in files
    assert "MLFLOW_TRACKING_URI" not in files["pytorchjob.yaml"]


def test_render_is_deterministic():
    assert render(a100(), RenderOptions("jobset")) == render(a100(), RenderOptions("jobset"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["dir"] for e in EXAMPLES])
def test_examples_are_current(example):
    directory = ROOT / "k8s" / "examples" / example["dir"]
    files = render(load_config(example["config"], example["overrides"]), RenderOptions(example["flavor"]))
    command = shlex.join(["translution", "k8s", "render", example["config"], *example["overrides"],
                          "--flavor", example["flavor"], "--out", f"k8s/examples/{example['dir']}"])
    on_disk = {p.name: p.read_text() for p in sorted(directory.glob("*.yaml"))}
    assert on_disk == files, f"k8s/examples/{example['dir']} is stale; regenerate it with:\n  {command}"
    for obj in documents(files):
        validate(obj)


def test_command_writes_and_replaces(tmp_path, capsys):
    out = tmp_path / "manifests"
    argv = ["k8s", "render", "configs/quickstart.yaml", "--out", str(out), "--flavor", "trainjob"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["configmap.yaml", "kustomization.yaml", "mlflow.yaml",
                                                      "storage.yaml", "trainjob.yaml"]
    assert main([*argv[:-1], "jobset"]) == 0  # a re-render replaces the whole directory
    assert "trainjob.yaml" not in {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["manifests"]  # no staging directories left behind
    out = capsys.readouterr().out
    assert "kubectl apply -k" in out and "kubectl create secret generic quickstart-mlflow-auth " in out


@pytest.mark.parametrize("overrides, message", [
    (["run.name=___"], "does not make a Kubernetes name"),
    (["cluster.nodes=3", "cluster.procs_per_node=2", "parallel.dp_replicate=4"], "6 processes"),
    (["cluster.storage=lots"], "cluster.storage='lots'"),
    (["cluster.node_selector=[a]"], "cluster.node_selector: Input should be a valid dictionary"),
    (["train.steps=-1"], "train.steps"),
])
def test_bad_input_writes_nothing(tmp_path, capsys, overrides, message):
    out = tmp_path / "out"
    assert main(["k8s", "render", "configs/quickstart.yaml", *overrides, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_directory_with_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["k8s", "render", "configs/quickstart.yaml", "--out", str(tmp_path)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unknown_flavor_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["k8s", "render", "configs/quickstart.yaml", "--out", "/tmp/x", "--flavor", "mpijob"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_crd_schemas_are_documented():
    readme = (ROOT / "k8s" / "crds" / "README.md").read_text()
    for filename in CRDS.values():
        assert filename in readme
        json.dumps(yaml.safe_load((ROOT / "k8s" / "crds" / filename).read_text()))  # plain data, loads as JSON
