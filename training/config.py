"""The run configuration: one schema for ``train``, ``plan``, ``launch`` and ``k8s render``.

A config is a YAML file with one section per concern. A section may be given inline or as
the path of a YAML file holding just that section (``model: configs/models/mnist_vit_alpha.yaml``),
so that a run picks one file per thing. Dotted command-line overrides (``train.steps=50``)
are applied last; every value is validated before any process starts, and errors name
the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from parallelism.activation_checkpoint import ActivationCheckpoint
from parallelism.compile import CompileMode
from parallelism.config import ParallelConfig
from training.hardware import HardwareSection
from translution_dist.data.config import DataConfig
from translution_dist.models.config import ModelConfig

INCLUDABLE_SECTIONS = ("model", "data", "parallel", "train", "optim", "tracking", "cluster")
MAX_YAML_VALUES = 100_000
"""Values one YAML document (a config file, a section file, an override) may expand to; a real config has hundreds."""
MAX_YAML_DEPTH = 32
"""Nesting levels one YAML document may have; a real config has four."""


class ConfigError(ValueError):
    """A config or override that cannot be used; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("translution", description="Run name: the run directory and the MLflow run name.")
    output_dir: Path = Field(Path("runs"), description="Parent of run directories (checkpoints, logs, resolved config).")
    seed: int = Field(0, description="Seed of weights, data order and dropout.")


class OptimSection(_Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value; null: no clipping.")


class TrainSection(_Section):
    steps: int = Field(100, ge=1, description="Optimizer steps of the whole run.")
    micro_batch_size: int = Field(32, ge=1, description="Samples per data-parallel rank per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype where the device supports it.")
    activation_checkpoint: ActivationCheckpoint = Field(
        "none", description="Recompute activations in backward to save memory: none; block: every transformer block "
                            "keeps only its input (most memory saved, one more forward); selective: every block's "
                            "feed-forward is recomputed (cheap; the attention keeps its tensors).")
    compile: bool = Field(False, description="torch.compile every transformer block (after sharding; the bank "
                                             "kernels are custom operators, so a block is one graph without FSDP2). "
                                             "The first steps take the compile time.")
    compile_mode: CompileMode = Field("default", description="torch.compile mode with train.compile; reduce-overhead "
                                                             "records CUDA graphs (GPU runs).")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="Evaluate every this many steps and at the end; 0: only at the end.")
    eval_batches: int = Field(10, ge=0, description="Batches per evaluation per data-parallel rank; 0: no evaluation.")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every this many steps (and at the end); 0: only at the end.")
    keep_checkpoints: int = Field(3, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    async_checkpoint: bool = Field(False, description="Write checkpoints in the background (torch.distributed.checkpoint.async_save).")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest complete checkpoint of the run directory.")
    nonfinite_loss: Literal["skip", "stop"] = Field("stop", description="What a NaN/inf loss does: skip the step or stop the run.")
    collective_timeout_s: int = Field(600, ge=1, description="A collective that takes longer fails the job, naming the rank.")
    on_checkpoint_error: Literal["stop", "continue"] = Field(
        "stop", description="A checkpoint that cannot be written (disk full…): stop the run, or log it and train on "
                            "to the next one (the final checkpoint always stops). The previous one stays intact.")


class TrackingSection(_Section):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db.")
    experiment: str = "translution"
    log_model: bool = Field(True, description="Log the final consolidated model (safetensors) as an artifact.")
    register_model: str | None = Field(None, description="Register the final model under this name.")
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics (needs psutil).")


class ClusterSection(_Section):
    """Where a run goes; used by ``plan``, ``launch`` and ``k8s render``."""

    nodes: int = Field(1, ge=1)
    procs_per_node: int | None = Field(None, ge=1, description="Processes per node; default: GPUs per node, else 1.")
    gpu_memory: str | None = Field(None, description="Memory per GPU for planning, e.g. 80GiB.")
    cpu_memory: str | None = Field(None, description="Host memory per node for planning, e.g. 1TiB.")
    nvme: str | None = Field(None, description="NVMe space per node for ZeRO-Infinity offload, e.g. 6TiB.")
    max_restarts: int = Field(0, ge=0, description="Restarts torchrun (and the Kubernetes job) allow after a failure.")
    stop_grace_s: int = Field(60, ge=1, description="Seconds a preempted rank has to finish its step and checkpoint "
                              "before torchrun kills it (torchrun --shutdown-timeout; the pods' grace adds 30).")
    image: str | None = Field(None, description="Container image of the Kubernetes job; default translution-dist:latest.")
    storage: str = Field("100Gi", description="Size of the ReadWriteMany volume for checkpoints and data.")
    storage_class: str | None = Field(None, description="StorageClass of that volume; default: the cluster's.")
    mlflow_storage: str = Field("10Gi", description="Size of the MLflow server's volume.")
    shm_size: str | None = Field(None, description="/dev/shm of every pod (NCCL needs it); default 16Gi with GPUs, else 1Gi.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the training pods require.")
    trainjob_runtime: str = Field("torch-distributed", description="Kubeflow Trainer runtime a TrainJob refers to.")
    hardware: HardwareSection = Field(default_factory=HardwareSection,
                                      description="Device and link figures for step times and MFU (preset or measured).")


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="after")
    def _sections_agree(self) -> Config:
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds train.steps ({self.train.steps}); "
                "lower the warm-up or train longer")
        self.parallel.check_model(self.model)
        if self.parallel.engine == "deepspeed" and self.train.nonfinite_loss == "skip":
            raise ValueError("train.nonfinite_loss=skip is not possible with parallel.engine=deepspeed (DeepSpeed "
                             "counts micro-batches to place its updates); use stop, or engine fsdp")
        self._check_pipeline()
        if self.parallel.engine == "deepspeed" and self.train.compile:
            raise ValueError("train.compile is not wired for parallel.engine=deepspeed (DeepSpeed wraps the model "
                             "itself); use engine fsdp or none, or compile: false")
        return self

    def _check_pipeline(self) -> None:
        """What the trainer does not (yet) run through pipeline stages, refused with the field to change."""
        pc, train = self.parallel, self.train
        if pc.pp == 1:
            return
        if train.micro_batch_size % pc.pp_microbatches:
            raise ValueError(f"parallel.pp_microbatches={pc.pp_microbatches} must divide train.micro_batch_size="
                             f"{train.micro_batch_size} (a batch, also in evaluation, is cut into that many)")
        unsupported = {"parallel.pp_virtual_stages > 1 (the trainer runs one stage per rank)": pc.pp_virtual_stages > 1,
                       "train.precision=fp16 (loss scaling; use bf16)": train.precision == "fp16",
                       "parallel.vocab_parallel": pc.vocab_parallel}
        refused = [what for what, present in unsupported.items() if present]
        if refused:
            raise ValueError(f"parallel.pp={pc.pp} does not support {', '.join(refused)} yet")

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name


class _Unbounded(ValueError):
    """A YAML document larger or deeper than any config needs."""


def _load_bounded_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing documents no config needs (:class:`_Unbounded`).

    An alias bomb ("billion laughs": a few lines of nested aliases that stand for billions of values)
    loads at once, as shared objects, but hangs and fills memory in whatever walks or prints it, such
    as a validation error's message; nesting a few hundred levels deep makes PyYAML and pydantic
    recurse past Python's limit. The expanded values are counted without recursion and with a budget,
    so the check itself costs at most ``MAX_YAML_VALUES`` steps.
    """
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise _Unbounded(f"is nested more than {MAX_YAML_DEPTH} levels deep") from None
    budget = MAX_YAML_VALUES
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        budget -= 1
        if budget < 0:
            raise _Unbounded(f"expands to more than {MAX_YAML_VALUES:,} values (nested YAML aliases?)")
        if depth > MAX_YAML_DEPTH:
            raise _Unbounded(f"is nested more than {MAX_YAML_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children)
    return value


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path} ({err.strerror}); check the path") from err
    try:
        return _load_bounded_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what}: {path} is not valid YAML: {err}") from err
    except _Unbounded as err:
        raise ConfigError(f"{what}: {path} {err}; no config needs that: write the values out") from err


def _resolve_includes(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    for section in INCLUDABLE_SECTIONS:
        value = raw.get(section)
        if isinstance(value, str):
            path = Path(value) if Path(value).is_absolute() else base / value
            if not path.exists() and Path(value).exists():
                path = Path(value)
            raw[section] = _read_yaml(path, f"section '{section}'")
            if not isinstance(raw[section], dict):
                raise ConfigError(f"section '{section}': {path} must hold a mapping of {section} settings")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw config mapping."""
    key, sep, value = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}': expected KEY=VALUE with a dotted key, e.g. train.steps=50")
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{'.'.join(parents[:depth + 1])}' is not a section")
        node = child
    try:
        node[leaf] = _load_bounded_yaml(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': value is not valid YAML ({err})") from err
    except _Unbounded as err:
        raise ConfigError(f"override of {key}: the value {err}; no config needs that: write the value out") from err


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for issue in err.errors():
        key = ".".join(str(p) for p in issue["loc"]) or "(top level)"
        message = issue["msg"].removeprefix("Value error, ")
        if issue["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the documented fields"
        elif issue["type"] == "missing":
            message = "required; add it to the config or pass it as an override"
        got = issue.get("input")
        suffix = "" if issue["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {message}{suffix}")
    return "invalid config:\n" + "\n".join(lines)


def _replaces_a_section(override: str) -> bool:
    """``model=configs/models/x.yaml`` (or an inline mapping): a whole section, not one value in it."""
    return override.partition("=")[0] in INCLUDABLE_SECTIONS


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, include, override and validate a run config.

    Overrides that replace a whole section (``model=FILE``) apply before the dotted ones
    (``model.context_length=64``), whatever their order on the command line, so a dotted
    override is never lost under a section that replaces it later (Hydra's rule for config
    groups). A section file named on the command line resolves against the working directory;
    one named inside a YAML file, against that file's folder.
    """
    path = Path(path)
    raw = _read_yaml(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping with sections such as model, data, train")
    raw = _resolve_includes(raw, path.parent)
    sections = [o for o in overrides if _replaces_a_section(o)]
    values = [o for o in overrides if not _replaces_a_section(o)]
    for override in sections:
        apply_override(raw, override)
    raw = _resolve_includes(raw, Path.cwd())
    for override in values:
        apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from err


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what the run used, includes expanded)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"train.steps": 100, …}``: the resolved config as flat parameters (for MLflow)."""
    return flatten_dict(cfg.model_dump(mode="json"))


def flatten_dict(tree: dict[str, Any]) -> dict[str, Any]:
    """Nested sections as dotted keys: ``{"train": {"steps": 100}}`` → ``{"train.steps": 100}``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat[prefix] = value

    walk("", tree)
    return flat
