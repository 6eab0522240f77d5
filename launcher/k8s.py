"""Kubernetes manifests for a run: the training job, its storage, its config and an MLflow server.

One function per object, plain dicts out, so the output is deterministic and easy to diff.
The training job comes in three flavors that start the same containers:

- ``pytorchjob``: Kubeflow Training Operator v1 (``kubeflow.org/v1``), Master + Workers with an
  elastic c10d policy; the operator sets ``PET_*`` in every pod;
- ``trainjob``: Kubeflow Trainer v2 (``trainer.kubeflow.org/v1alpha1``) on the
  ``torch-distributed`` runtime, which sets the same ``PET_*`` variables;
- ``jobset``: a bare JobSet (``jobset.x-k8s.io/v1alpha2``) of one Indexed Job; the pods get
  ``PET_*`` as plain values and their rank from ``JOB_COMPLETION_INDEX``.

Every pod runs ``translution launch /config/run.yaml``: the resolved config (includes and
overrides applied) comes from a ConfigMap, and ``launch`` reads the pod's topology from the
environment and starts torchrun with ``procs_per_node`` processes running ``train``. A pod
that ran ``train`` directly would be a single process. The working directory is the data
PVC, so relative ``run.output_dir`` and ``data.path`` land on shared storage.

Who can get in: the MLflow server runs MLflow's basic-auth app, its admin account and CSRF key
from a Secret the user creates (``<run>-mlflow-auth``; never rendered, so no password is ever in
these files), which the training pods read too (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``); a
NetworkPolicy admits to it only the run's training pods; people reach the UI through
``kubectl port-forward``. Every container runs as a non-root user without privileges or
capabilities, on a read-only root filesystem with ``emptyDir`` volumes for ``/tmp`` and ``$HOME``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UsageError
from launcher.launch import choose_layout
from launcher.topology import DEFAULT_PORT, from_cluster, parse_bytes
from training.config import Config, dump_config

FLAVORS = ("pytorchjob", "trainjob", "jobset")
DEFAULT_IMAGE = "translution-dist:latest"
CONFIG_DIR = "/config"
CONFIG_FILE = "run.yaml"
WORKDIR = "/workspace"
MLFLOW_PORT = 5000
RUN_AS = 1000  # the image's non-root user (docker/Dockerfile); fsGroup makes the volumes writable for it
HOME = "/home/translution"
"""That user's home: caches (matplotlib, torch extensions) go there, on an emptyDir, as the root filesystem is read-only."""
AUTH_SECRET_KEYS = {"username": "the MLflow admin account, which the trainers use too",
                    "password": "its password, at least 12 characters (MLflow's rule)",
                    "flask-secret-key": "the key MLflow's basic-auth app signs its CSRF tokens with"}
"""The keys of the ``<run>-mlflow-auth`` Secret, which the user creates (k8s/README.md)."""
AUTH_CONFIG_DIR = "/etc/mlflow"
AUTH_CONFIG_FILE = "basic_auth.ini"
TORCHRUN_EXIT_S = 30
"""What a pod's grace adds to ``cluster.stop_grace_s``. A preempted pod's SIGTERM reaches torchrun, which forwards
it to the ranks and kills them ``stop_grace_s`` later (``--shutdown-timeout``); in that time every rank finishes
its step and writes its checkpoint (training/preemption.py). The rest covers torchrun's own exit."""
OUTPUT_FILES = ("kustomization.yaml", "configmap.yaml", "storage.yaml", "mlflow.yaml",
                *(f"{flavor}.yaml" for flavor in FLAVORS))


@dataclass(frozen=True)
class RenderOptions:
    flavor: str = "pytorchjob"
    image: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class _Settings:
    """Everything the manifests need, read and checked once from the config and the options."""

    name: str
    namespace: str | None
    image: str
    nodes: int
    procs: int
    gpus: int
    max_restarts: int
    stop_grace_s: int
    storage: str
    storage_class: str | None
    mlflow_storage: str
    shm: str
    node_selector: dict[str, str]
    runtime: str
    tracking_uri: str | None  # set when this render deploys the MLflow server

    @property
    def auth_secret(self) -> str:
        return f"{self.name}-mlflow-auth"


def dns_name(text: str, limit: int = 40) -> str:
    """A DNS-1123 label from the run name; short enough for the suffixes pods and services add (-worker-63)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not name or not name[0].isalpha():
        raise UsageError(f"run.name={text!r} does not make a Kubernetes name (lowercase letters, digits, '-', "
                         "starting with a letter); set run.name, e.g. run.name=vit-alpha")
    return name


def quantity(text: str, what: str) -> str:
    """A Kubernetes quantity from a size such as ``16GiB`` (``16Gi``), checked with the same parser as the planner."""
    parse_bytes(text, what)
    return re.sub(r"(?i)([kmgtp]i?)b$", r"\1", str(text).strip())


def _settings(cfg: Config, options: RenderOptions) -> _Settings:
    if options.flavor not in FLAVORS:
        raise UsageError(f"--flavor {options.flavor!r}: choose one of {', '.join(FLAVORS)}")
    try:
        cfg.parallel.check_model(cfg.model)
    except ValueError as err:
        raise UsageError(f"parallel: {err}") from err
    topology = from_cluster(cfg.cluster, "kubernetes")
    choose_layout(cfg, topology)  # the job must be startable as rendered
    name = dns_name(cfg.run.name)
    cluster = cfg.cluster
    gpus = len(topology.devices.gpus)
    serve_mlflow = cfg.tracking.enabled and cfg.tracking.uri is None
    return _Settings(
        name=name,
        namespace=options.namespace,
        image=options.image or cluster.image or DEFAULT_IMAGE,
        nodes=topology.nodes,
        procs=topology.procs_per_node,
        gpus=gpus,
        max_restarts=cluster.max_restarts,
        stop_grace_s=cluster.stop_grace_s,
        storage=quantity(cluster.storage, "cluster.storage"),
        storage_class=cluster.storage_class,
        mlflow_storage=quantity(cluster.mlflow_storage, "cluster.mlflow_storage"),
        shm=quantity(cluster.shm_size or ("16Gi" if gpus else "1Gi"), "cluster.shm_size"),
        node_selector=cluster.node_selector,
        runtime=cluster.trainjob_runtime,
        tracking_uri=f"http://{name}-mlflow:{MLFLOW_PORT}" if serve_mlflow else None,
    )


# -- objects -------------------------------------------------------------------------------


def _meta(s: _Settings, name: str, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if s.namespace:
        meta["namespace"] = s.namespace
    meta["labels"] = _labels(s, component)
    return meta


def _labels(s: _Settings, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "translution", "app.kubernetes.io/instance": s.name,
            "app.kubernetes.io/component": component}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _scratch_volumes() -> list[dict[str, Any]]:
    """What a process may write besides its data volumes, the root filesystem being read-only."""
    return [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]


def _scratch_mounts() -> list[dict[str, Any]]:
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]


def _secret_env(s: _Settings, name: str, key: str) -> dict[str, Any]:
    assert key in AUTH_SECRET_KEYS
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": s.auth_secret, "key": key}}}


def basic_auth_ini(database_uri: str) -> str:
    """MLflow's basic-auth config: users in ``database_uri``; the admin comes from ``MLFLOW_AUTH_ADMIN_*``.

    No admin name or password is written here: MLflow reads them from the Secret's variables, and an
    MLflow too old to (< 3.16.1) fails to start instead of creating an account with a default password.
    Accounts the admin adds later may read every experiment (``default_permission = READ``).
    """
    return ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {database_uri}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def _pvc(s: _Settings, name: str, size: str, many: bool, component: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany" if many else "ReadWriteOnce"],
                            "resources": {"requests": {"storage": size}}}
    if s.storage_class:
        spec["storageClassName"] = s.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(s, name, component), "spec": spec}


def config_map(cfg: Config, s: _Settings) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(s, f"{s.name}-config", "config"),
            "data": {CONFIG_FILE: dump_config(cfg)}}


def data_pvc(s: _Settings) -> dict[str, Any]:
    """Checkpoints, run directories and data shards; shared by every node (ReadWriteMany when there are several)."""
    return _pvc(s, f"{s.name}-data", s.storage, s.nodes > 1, "storage")


def mlflow(s: _Settings) -> list[dict[str, Any]]:
    """A tracking server behind a login (SQLite store, artifacts and users on its own PVC), reachable by the trainers only."""
    name = f"{s.name}-mlflow"
    labels = _labels(s, "mlflow")
    auth_config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(s, f"{name}-auth-config", "mlflow"),
                   "data": {AUTH_CONFIG_FILE: basic_auth_ini("sqlite:////mlflow/basic_auth.db")}}
    container = {
        "name": "mlflow",
        "image": s.image,
        "command": ["mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", "sqlite:////mlflow/mlflow.db",
                    "--artifacts-destination", "/mlflow/artifacts", "--host", "0.0.0.0", "--port", str(MLFLOW_PORT)],
        "env": [
            # MLflow >= 3.5 checks the Host header: the trainers call it by its Service name, people through
            # `kubectl port-forward svc/NAME 5000:5000` as localhost:5000.
            {"name": "MLFLOW_SERVER_ALLOWED_HOSTS",
             "value": f"{name},{name}:{MLFLOW_PORT},localhost,localhost:{MLFLOW_PORT}"},
            {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": f"{AUTH_CONFIG_DIR}/{AUTH_CONFIG_FILE}"},
            _secret_env(s, "MLFLOW_AUTH_ADMIN_USERNAME", "username"),
            _secret_env(s, "MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
            _secret_env(s, "MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
            # The GenAI job runner (a consumer process per job type) has nothing to do for training runs.
            {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"},
            {"name": "HOME", "value": HOME},
        ],
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},  # open to all
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "mlflow", "mountPath": "/mlflow"},
                         {"name": "auth-config", "mountPath": AUTH_CONFIG_DIR, "readOnly": True},
                         *_scratch_mounts()],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(s, name, "mlflow"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one writer on a ReadWriteOnce volume
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "securityContext": _pod_security(),
                "containers": [container],
                "volumes": [{"name": "mlflow", "persistentVolumeClaim": {"claimName": name}},
                            {"name": "auth-config", "configMap": {"name": f"{name}-auth-config"}},
                            *_scratch_volumes()]}},
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(s, name, "mlflow"),
               "spec": {"selector": labels, "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": "http"}]}}
    return [auth_config, _pvc(s, name, s.mlflow_storage, False, "mlflow"), deployment, service, network_policy(s)]


def network_policy(s: _Settings) -> dict[str, Any]:
    """Only this run's training pods may open connections to its MLflow server.

    ``kubectl port-forward`` enters the pod's network namespace through the kubelet, not through the
    pod network, so it is not subject to this policy: people reach the UI that way, if RBAC lets them
    (``pods/portforward``), and then log in.
    """
    trainers = {"app.kubernetes.io/instance": s.name, "app.kubernetes.io/component": "trainer"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(s, f"{s.name}-mlflow", "mlflow"),
            "spec": {"podSelector": {"matchLabels": _labels(s, "mlflow")}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": trainers}}],
                                  "ports": [{"protocol": "TCP", "port": MLFLOW_PORT}]}]}}


def _env(s: _Settings) -> list[dict[str, Any]]:
    env = [{"name": "HOME", "value": HOME}]
    if s.tracking_uri:  # the server rendered here, and the login it needs
        env += [{"name": "MLFLOW_TRACKING_URI", "value": s.tracking_uri},
                _secret_env(s, "MLFLOW_TRACKING_USERNAME", "username"),
                _secret_env(s, "MLFLOW_TRACKING_PASSWORD", "password")]
    return env


def _resources(s: _Settings) -> dict[str, Any]:
    if s.gpus:
        return {"limits": {"nvidia.com/gpu": s.gpus}}
    return {"requests": {"cpu": s.procs}}


def _volumes(s: _Settings) -> list[dict[str, Any]]:
    return [{"name": "config", "configMap": {"name": f"{s.name}-config"}},
            {"name": "workspace", "persistentVolumeClaim": {"claimName": f"{s.name}-data"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm}},  # NCCL and DataLoader shared memory
            *_scratch_volumes()]


def _mounts() -> list[dict[str, Any]]:
    return [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *_scratch_mounts()]


def _command() -> list[str]:
    return ["translution", "launch", f"{CONFIG_DIR}/{CONFIG_FILE}"]


def _container(s: _Settings, name: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "image": s.image, "command": _command(), "workingDir": WORKDIR, "env": env,
            "resources": _resources(s), "securityContext": _container_security(), "volumeMounts": _mounts()}


def _pod_spec(s: _Settings, container: dict[str, Any], **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {**extra, "securityContext": _pod_security(),
                            "terminationGracePeriodSeconds": s.stop_grace_s + TORCHRUN_EXIT_S,
                            "containers": [container], "volumes": _volumes(s)}
    if s.node_selector:
        spec["nodeSelector"] = dict(sorted(s.node_selector.items()))
    return spec


def pytorchjob(s: _Settings) -> dict[str, Any]:
    """Master + Workers; the elastic policy makes the operator set PET_RDZV_ENDPOINT (the master) and PET_NNODES."""
    container = _container(s, "pytorch", _env(s))  # the operator looks for the container named "pytorch"
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": DEFAULT_PORT}]
    template = {"metadata": {"labels": _labels(s, "trainer")}, "spec": _pod_spec(s, container)}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if s.nodes > 1:
        replicas["Worker"] = {"replicas": s.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _meta(s, s.name, "trainer"),
        "spec": {
            "nprocPerNode": str(s.procs),
            "elasticPolicy": {"rdzvBackend": "c10d", "rdzvHost": f"{s.name}-master-0", "rdzvPort": DEFAULT_PORT,
                              "minReplicas": s.nodes, "maxReplicas": s.nodes, "maxRestarts": s.max_restarts},
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def _override_spec(s: _Settings) -> dict[str, Any]:
    spec: dict[str, Any] = {"securityContext": _pod_security()}
    if s.node_selector:
        spec["nodeSelector"] = dict(sorted(s.node_selector.items()))
    spec["volumes"] = _volumes(s)
    # the torch runtime's trainer container
    spec["containers"] = [{"name": "node", "securityContext": _container_security(), "volumeMounts": _mounts()}]
    return spec


def trainjob(s: _Settings) -> dict[str, Any]:
    """Kubeflow Trainer v2: the runtime supplies the pod; we supply image, command, sizes, env and volumes."""
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": _meta(s, s.name, "trainer"),
        "spec": {
            "runtimeRef": {"name": s.runtime},
            "trainer": {"image": s.image, "command": _command(), "numNodes": s.nodes, "numProcPerNode": s.procs,
                        "resourcesPerNode": _resources(s), "env": _env(s)},
            "podTemplateOverrides": [{
                "targetJobs": [{"name": "node"}],
                "metadata": {"labels": _labels(s, "trainer")},  # what the MLflow server's NetworkPolicy admits
                "spec": _override_spec(s),
            }],
        },
    }


def jobset(s: _Settings) -> dict[str, Any]:
    """One Indexed Job of ``nodes`` pods; rank from JOB_COMPLETION_INDEX, the master is pod 0's DNS name."""
    def annotation(var: str, key: str) -> dict[str, Any]:
        path = f"metadata.annotations['jobset.sigs.k8s.io/{key}']"
        return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [annotation("JOBSET_NAME", "jobset-name"), annotation("REPLICATED_JOB_NAME", "replicatedjob-name"),
           annotation("JOB_INDEX", "job-index"),
           {"name": "PET_NNODES", "value": str(s.nodes)}, {"name": "PET_NPROC_PER_NODE", "value": str(s.procs)},
           {"name": "PET_MASTER_ADDR", "value": f"{s.name}-node-0-0.{s.name}"},
           {"name": "PET_MASTER_PORT", "value": str(DEFAULT_PORT)}, *_env(s)]
    pod = {"metadata": {"labels": _labels(s, "trainer")},
           "spec": _pod_spec(s, _container(s, "trainer", env), restartPolicy="Never")}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": _meta(s, s.name, "trainer"),
        "spec": {
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {"maxRestarts": s.max_restarts},  # a failed pod restarts the whole set (a gang)
            "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": {
                "parallelism": s.nodes, "completions": s.nodes, "completionMode": "Indexed", "backoffLimit": 0,
                "template": pod}}}],
        },
    }


# -- files ---------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Writes a shared sub-object (the PyTorchJob's pod template) in full at each use instead of as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120,
                         explicit_start=True)


def auth_secret_command(cfg: Config, options: RenderOptions = RenderOptions()) -> str:
    """The ``kubectl`` command that creates the MLflow login Secret with random values (run once, before the job)."""
    namespace = f" --namespace {options.namespace}" if options.namespace else ""
    return (f"kubectl create secret generic {dns_name(cfg.run.name)}-mlflow-auth{namespace} "
            '--from-literal=username=admin --from-literal=password="$(openssl rand -base64 24)" '
            '--from-literal=flask-secret-key="$(openssl rand -hex 32)"')


def render(cfg: Config, options: RenderOptions = RenderOptions()) -> dict[str, str]:
    """``{file name: YAML}`` for the run; the same config and options always give the same bytes."""
    s = _settings(cfg, options)
    job = {"pytorchjob": pytorchjob, "trainjob": trainjob, "jobset": jobset}[options.flavor](s)
    files = {"configmap.yaml": _yaml([config_map(cfg, s)]), "storage.yaml": _yaml([data_pvc(s)])}
    if s.tracking_uri:
        files["mlflow.yaml"] = _yaml(mlflow(s))
    files[f"{options.flavor}.yaml"] = _yaml([job])
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": list(files)}
    return {"kustomization.yaml": _yaml([kustomization]), **files}


def write(files: dict[str, str], out: Path) -> None:
    """Write into a fresh directory beside ``out``, then swap it in: a failed render leaves ``out`` as it was."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory; choose a directory path")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise UsageError(f"--out {out}: holds files this command did not write ({', '.join(foreign[:5])}); "
                             "choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in files.items():
            (staging / name).write_text(text)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
