"""The memory planner: which parallel layouts fit a cluster, and which one to use.

For a config and a cluster (nodes × processes per node, memory per GPU, host memory and
NVMe per node) it enumerates every layout the code can run at that world size, estimates
each rank's memory with :mod:`launcher.memory_model`, and checks it against the cluster:

* a GPU's peak must stay under its memory less ``headroom`` (default 10%: CUDA context,
  NCCL buffers, allocator fragmentation);
* a node's host memory must hold its processes' host terms (offloaded states, index maps)
  plus a runtime allowance per process (:data:`HOST_RUNTIME`), under the same headroom;
  without GPUs every term is host memory;
* a node's NVMe must hold its processes' NVMe terms.

The choice among layouts that fit: the shortest estimated step per token (compute, exposed
collectives inside and across nodes, offload traffic, the optimizer step;
:mod:`launcher.step_time` over :mod:`launcher.step_cost`'s data movement), then the most memory left (the fuller of a GPU and a
node's host memory, as a fraction of what may be used). A launch keeps the config's own
layout when it fits (see ``launcher.launch.choose_layout``).

Candidates: ``tp`` dividing the heads and the MLP width, ``dispp`` at most the rows of a bank
chunk, ``tp·dispp`` dividing the processes of a node or a multiple of them (``tp`` inside a
node, ``dispp`` then spans nodes: its all-reduces are priced on the network), every
``dp_replicate`` (HSDP), and for each the engines and offloads: FSDP2 with or without
``cpu_offload``; DeepSpeed ZeRO-3 (data parallel only) with
parameters and optimizer states on the device, CPU or NVMe (NVMe needs ``parallel.nvme_path``
and ``cluster.nvme``); ``engine: none`` when there is no data parallelism. The model's own
choices (``bank_chunks``, precisions, micro-batch) are kept; when nothing fits the planner
says which ``model.bank_chunks`` or ``train.micro_batch_size`` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.memory_model import FP32, GiB, MemoryEstimate, RunShape, Term, estimate, fmt_bytes
from launcher.step_cost import StepCost, step_cost
from launcher.step_time import StepTime, step_time
from launcher.topology import Topology, parse_bytes
from parallelism.config import ParallelConfig
from training.config import Config
from training.hardware import PRESETS, Hardware
from translution_dist.models.config import BANK_ATTENTIONS

DEFAULT_HEADROOM = 0.10
HOST_RUNTIME = {"cuda": 4 * GiB, "cpu": GiB // 2}
"""Host memory per process besides tensors: interpreter, torch (and CUDA) libraries, data loading."""


@dataclass(frozen=True)
class Cluster:
    """What the planner fits a run into."""

    nodes: int
    procs_per_node: int
    gpu_memory: int | None  # bytes per GPU; None: the processes run on CPUs
    cpu_memory: int | None  # host bytes per node; None: unknown, not checked
    nvme: int | None = None  # NVMe bytes per node
    headroom: float = DEFAULT_HEADROOM
    hardware: Hardware = PRESETS["nominal"]  # device and link figures for step times

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def device(self) -> str:
        return "cuda" if self.gpu_memory else "cpu"

    def describe(self) -> str:
        gpu = f"{fmt_bytes(self.gpu_memory)} per GPU" if self.gpu_memory else "CPU processes"
        host = f"{fmt_bytes(self.cpu_memory)} host memory" if self.cpu_memory else "host memory unknown"
        nvme = f", {fmt_bytes(self.nvme)} NVMe" if self.nvme else ""
        nodes = f"{self.nodes} node" + ("s" if self.nodes != 1 else "")
        return (f"{nodes} × {self.procs_per_node} processes = {self.world_size} ranks; {gpu}; "
                f"{host}{nvme} per node; headroom {self.headroom:.0%}")

    def describe_hardware(self) -> str:
        hw = self.hardware
        return (f"{hw.name}: {hw.peak_flops / 1e12:.4g} TFLOP/s peak × {hw.kernel_efficiency:.0%} (kernels) / "
                f"{hw.matmul_efficiency:.0%} (matmuls); links {hw.intra_node_bandwidth / 1e9:.3g} GB/s in a node, "
                f"{hw.inter_node_bandwidth / 1e9:.3g} GB/s across, PCIe {hw.pcie_bandwidth / 1e9:.3g} GB/s, "
                f"NVMe {hw.nvme_bandwidth / 1e9:.3g} GB/s; host AdamW {hw.cpu_adam_params_per_s:.3g} params/s"
                + ("" if self.gpu_memory or hw != PRESETS["nominal"] else
                   " (GPU figures: for CPU processes measure them with --calibrate)"))

    @staticmethod
    def of(cfg: Config, nodes: int | None = None, procs_per_node: int | None = None, gpu_memory: str | None = None,
           cpu_memory: str | None = None, nvme: str | None = None, headroom: float = DEFAULT_HEADROOM,
           here: Topology | None = None) -> Cluster:
        """The config's ``cluster`` section with command-line values taking precedence.

        ``here`` is where the command runs (``detect()``); when the plan is for it (as many nodes as it
        has: one, on a plain machine), what the section and the command line leave open is taken from
        it as ``launch`` would: processes per node (the scheduler's, else the GPU count), the GPUs'
        memory and the host memory.
        """
        c = cfg.cluster
        nodes = nodes or c.nodes
        here = here if here is not None and here.nodes == nodes else None
        gpu = gpu_memory if gpu_memory is not None else c.gpu_memory
        host = cpu_memory if cpu_memory is not None else c.cpu_memory
        disk = nvme if nvme is not None else c.nvme
        gpu_bytes = parse_bytes(gpu, "--gpu-mem (cluster.gpu_memory)") if gpu else None
        host_bytes = parse_bytes(host, "--cpu-mem (cluster.cpu_memory)") if host else None
        nvme_bytes = parse_bytes(disk, "--nvme (cluster.nvme)") if disk else None
        procs = procs_per_node or c.procs_per_node or 1
        if here is not None:
            procs = procs_per_node or here.procs_choice(c.procs_per_node)[0]
            if gpu is None and here.devices.gpus:
                gpu_bytes = min(g.memory_bytes for g in here.devices.gpus)
            host_bytes = host_bytes or here.devices.host_memory_bytes or None
        return Cluster(nodes, procs, gpu_bytes, host_bytes, nvme_bytes, headroom, c.hardware.resolve())

    @staticmethod
    def from_topology(topology: Topology, cfg: Config, nodes: int | None = None) -> Cluster:
        """What ``launch`` found: the GPUs' memory (the smallest), the host memory, the config's NVMe."""
        gpus = topology.devices.gpus
        host = topology.devices.host_memory_bytes or None
        return Cluster(nodes or topology.nodes, topology.procs_per_node,
                       min(g.memory_bytes for g in gpus) if gpus else None, host,
                       parse_bytes(cfg.cluster.nvme, "cluster.nvme") if cfg.cluster.nvme else None,
                       hardware=cfg.cluster.hardware.resolve())


@dataclass(frozen=True)
class Candidate:
    """One layout with its estimate and verdict."""

    layout: ParallelConfig
    estimate: MemoryEstimate
    gpu_bytes: int  # peak per GPU (0 without GPUs)
    host_per_node: int  # including the runtime allowance
    nvme_per_node: int
    cost: StepCost
    time: StepTime
    problems: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def offload(self) -> str:
        return offload_of(self.layout)

    def rank_key(self, cluster: Cluster) -> tuple[float, float]:
        """The choice rule: the shortest estimated step per token (layouts differ in global batch,
        ``micro_batch_size`` × data-parallel ranks), then the most memory left."""
        return self.time.step_s / self.time.tokens, utilization(self, cluster)


@dataclass(frozen=True)
class Plan:
    """Every candidate (fitting ones first, best first), the choice, and the config's own layout."""

    cluster: Cluster
    run: RunShape
    candidates: tuple[Candidate, ...]
    config_layout: Candidate | None  # None when the config's degrees do not resolve for this world size
    config_error: str | None = None

    @property
    def choice(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None


def offload_of(layout: ParallelConfig) -> str:
    """What a layout keeps off the GPU: ``none``, ``optimizer→cpu``, ``all→cpu``, ``optimizer→nvme``, ``all→nvme``."""
    if layout.engine == "fsdp":
        return "all→cpu" if layout.cpu_offload else "none"
    if layout.engine == "deepspeed":
        param, optim = layout.offload_param, layout.offload_optimizer
        if "nvme" in (param, optim):
            return "all→nvme" if param == "nvme" else "optimizer→nvme"
        if optim == "cpu":
            return "all→cpu" if param == "cpu" else "optimizer→cpu"
    return "none"


def describe_layout(layout: ParallelConfig, offload: bool = True) -> str:
    """``fsdp dp_replicate=1 dp_shard=8 dispp=1 tp=8 cpu_offload``: a layout on one line."""
    parts = [layout.engine, f"dp_replicate={layout.dp_replicate}", f"dp_shard={layout.dp_shard}",
             f"dispp={layout.dispp}", f"tp={layout.tp}"]
    if not offload:
        return " ".join(parts)
    if layout.cpu_offload:
        parts.append("cpu_offload")
    if layout.offload_param != "none":
        parts.append(f"offload_param={layout.offload_param}")
    if layout.offload_optimizer != "none":
        parts.append(f"offload_optimizer={layout.offload_optimizer}")
    return " ".join(parts)


def layout_overrides(layout: ParallelConfig) -> list[str]:
    """``parallel.KEY=VALUE`` overrides that make a config use ``layout`` (``dp_shard=-1``: the rest of
    the world, which resolves to the same degree and also suits an elastic job)."""
    keys = ("engine", "dp_replicate", "dp_shard", "dispp", "tp", "vocab_parallel", "cpu_offload", "offload_param",
            "offload_optimizer")
    values = {key: -1 if key == "dp_shard" else getattr(layout, key) for key in keys}
    return [f"parallel.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in values.items()]


NO_PIPELINE = {"pp": 1, "pp_split": None, "pp_schedule": "1f1b", "pp_virtual_stages": 1}
"""Candidates are not pipelined: the planner does not price ``pp`` layouts yet (a config's own is estimated
as if each rank held the whole model, which overstates its memory)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, cluster: Cluster) -> list[ParallelConfig]:
    """Every layout of ``cluster.world_size`` ranks that the code accepts for ``cfg.model``."""
    world, base = cluster.world_size, cfg.parallel
    out: list[ParallelConfig] = []
    node = cluster.procs_per_node
    for tp in _divisors(node):
        for dispp in _divisors(world // tp):
            if world % (tp * dispp) or not _fits_the_nodes(tp * dispp, tp, node):
                continue
            data = world // (tp * dispp)
            for replicate in _divisors(data):
                for engine, offloads in _engines(cfg, cluster, tp, dispp, replicate, data):
                    for offload in offloads:
                        fields = {**base.model_dump(), **NO_PIPELINE, "engine": engine, "tp": tp, "dispp": dispp,
                                  "dp_replicate": replicate, "dp_shard": data // replicate,
                                  "vocab_parallel": base.vocab_parallel and tp > 1,
                                  "cpu_offload": False, "offload_param": "none", "offload_optimizer": "none",
                                  **offload}
                        if engine == "none":
                            fields["mixed_precision"] = "fp32"
                        try:
                            layout = ParallelConfig(**fields).resolve(world)
                            layout.check_model(cfg.model)
                        except ValueError:
                            continue
                        out.append(layout)
    return out


def _fits_the_nodes(model_parallel: int, tp: int, node: int) -> bool:
    """``tp·dispp`` ranks either inside one node, or whole nodes with ``tp`` inside each: the mesh
    (``parallelism.mesh``, innermost-fastest) then puts a ``dispp`` group ``tp`` ranks apart, one
    or more ranks per node, and only ``dispp``'s collectives cross nodes."""
    return node % model_parallel == 0 or (model_parallel % node == 0 and node % tp == 0)


def _engines(cfg: Config, cluster: Cluster, tp: int, dispp: int, replicate: int,
             data: int) -> list[tuple[str, list[dict[str, Any]]]]:
    engines: list[tuple[str, list[dict[str, Any]]]] = [("fsdp", [{}, {"cpu_offload": True}])]
    if data == 1 and replicate == 1:
        engines.append(("none", [{}]))
    if tp == 1 and dispp == 1 and replicate == 1:
        places = ["none", "cpu"] + (["nvme"] if cfg.parallel.nvme_path and cluster.nvme else [])
        offloads = [{"offload_param": param, "offload_optimizer": optim} for optim in places for param in places
                    if places.index(param) <= places.index(optim)]
        engines.append(("deepspeed", offloads))
    return engines


def run_shape(cfg: Config, cluster: Cluster) -> RunShape:
    return RunShape(cfg.model, cfg.train.micro_batch_size, cfg.train.precision, cluster.device, cfg.train.grad_accum,
                    cfg.train.activation_checkpoint)


def evaluate(cfg: Config, layout: ParallelConfig, cluster: Cluster) -> Candidate:
    """Estimate ``layout`` (resolved for the cluster) and say whether and why it does not fit."""
    run = run_shape(cfg, cluster)
    est = estimate(run, layout)
    procs = cluster.procs_per_node
    runtime = HOST_RUNTIME[cluster.device]
    problems = []
    if cluster.gpu_memory:
        gpu = est.peak("device")
        host = procs * (est.peak("host") + runtime)
        usable = int(cluster.gpu_memory * (1 - cluster.headroom))
        if gpu > usable:
            problems.append(f"needs {fmt_bytes(gpu)} per GPU > {fmt_bytes(usable)} usable "
                            f"({fmt_bytes(cluster.gpu_memory)} less {cluster.headroom:.0%} headroom): "
                            f"{_top_terms(est.breakdown('device'))}")
    else:
        gpu = 0
        host = procs * (est.peak_total + runtime)
    if cluster.cpu_memory:
        usable = int(cluster.cpu_memory * (1 - cluster.headroom))
        if host > usable:
            where = "host memory" if cluster.gpu_memory else "memory"
            terms = est.breakdown("host") if cluster.gpu_memory else [*est.breakdown("device"), *est.breakdown("host")]
            problems.append(f"needs {fmt_bytes(host)} {where} per node ({procs} processes, "
                            f"{fmt_bytes(runtime)} runtime each) > {fmt_bytes(usable)} usable: {_top_terms(terms)}")
    nvme = procs * est.peak("nvme")
    if nvme and not cluster.nvme:
        problems.append(f"offloads {fmt_bytes(nvme)} per node to NVMe but the cluster has none (set cluster.nvme)")
    elif nvme > (cluster.nvme or 0):
        problems.append(f"needs {fmt_bytes(nvme)} NVMe per node > {fmt_bytes(cluster.nvme)}")
    cost = step_cost(cfg, layout, procs)
    time = step_time(cfg, layout, cost, est.param_bytes_per_rank // FP32, cluster.world_size,
                     bool(cluster.gpu_memory), cluster.hardware)
    return Candidate(layout, est, gpu, host, nvme, cost, time, tuple(problems))


def _top_terms(terms: list[Term], count: int = 3) -> str:
    return ", ".join(f"{t.name} {fmt_bytes(t.bytes)}" for t in sorted(terms, key=lambda t: -t.bytes)[:count])


def plan(cfg: Config, cluster: Cluster) -> Plan:
    """Evaluate every candidate layout; fitting ones first, by the choice rule; then the others by overshoot."""
    candidates = [evaluate(cfg, layout, cluster) for layout in candidate_layouts(cfg, cluster)]
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: c.rank_key(cluster))
    failing = sorted((c for c in candidates if not c.fits), key=lambda c: utilization(c, cluster))
    own, error = None, None
    try:
        own = evaluate(cfg, cfg.parallel.resolve(cluster.world_size), cluster)
    except ValueError as err:
        error = str(err)
    return Plan(cluster, run_shape(cfg, cluster), (*fitting, *failing), own, error)


def utilization(c: Candidate, cluster: Cluster) -> float:
    """The fuller of a GPU and a node's host memory, as a fraction of what may be used."""
    ratios = [0.0]
    if cluster.gpu_memory:
        ratios.append(c.gpu_bytes / (cluster.gpu_memory * (1 - cluster.headroom)))
    if cluster.cpu_memory:
        ratios.append(c.host_per_node / (cluster.cpu_memory * (1 - cluster.headroom)))
    return max(ratios)


def hints(cfg: Config, cluster: Cluster) -> list[str]:
    """When nothing fits: the smallest change that would make a layout fit (``model.bank_chunks``,
    the micro-batch, with or without more accumulation, or an NVMe path for DeepSpeed)."""
    out = []
    k = cfg.model.layout().num_displacements if cfg.model.attention in BANK_ATTENTIONS else 1
    for chunks in sorted({min(k, cfg.model.bank_chunks * 2 ** i) for i in range(1, 8)}):
        if chunks > cfg.model.bank_chunks and _any_fits(cfg, {"model": {"bank_chunks": chunks}}, cluster):
            out.append(f"model.bank_chunks={chunks} (a smaller ZeRO-3 gather unit; changes the checkpoint's keys)")
            break
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    batch = micro
    while batch > 1:
        batch //= 2
        same_global = {"micro_batch_size": batch, "grad_accum": accum * micro // batch}
        if micro % batch == 0 and _any_fits(cfg, {"train": same_global}, cluster):
            out.append(f"train.micro_batch_size={batch} train.grad_accum={same_global['grad_accum']}")
            break
        if _any_fits(cfg, {"train": {"micro_batch_size": batch}}, cluster):
            out.append(f"train.micro_batch_size={batch} (a smaller global batch)")
            break
    if cluster.nvme and not cfg.parallel.nvme_path and _any_fits(
            cfg, {"parallel": {"nvme_path": "/local/nvme"}}, cluster):
        out.append("parallel.nvme_path=DIR on the nodes' NVMe (DeepSpeed can then offload there)")
    return out


def _any_fits(cfg: Config, update: dict[str, dict[str, Any]], cluster: Cluster) -> bool:
    try:
        changed = cfg.model_copy(update={
            section: getattr(cfg, section).model_copy(update=values) for section, values in update.items()})
        type(changed.model).model_validate(changed.model.model_dump())
    except ValueError:
        return False
    return any(evaluate(changed, layout, cluster).fits for layout in candidate_layouts(changed, cluster))


def global_batch(cfg: Config, layout: ParallelConfig) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * layout.dp_replicate * layout.dp_shard
