"""Where a launch runs and what it has, read from the scheduler's environment and the local devices.

``launch`` needs four numbers before it can start anything (nodes, this node's rank, processes
per node, the rendezvous host:port) and each scheduler spells them differently. Detection
tries the sources in this order and the first that applies wins:

1. an explicit hostfile (``--hostfile`` or ``$TRANSLUTION_HOSTFILE``; DeepSpeed format
   ``host slots=N``) → ``hostfile``: the user named the machines, so nothing overrules that;
2. a JobSet pod (``JOBSET_NAME`` and the Indexed Job's ``JOB_COMPLETION_INDEX``; JobSet itself
   sets no variables, so the pod gets ``JOBSET_NAME``, ``REPLICATED_JOB_NAME`` and ``JOB_INDEX``
   from its JobSet annotations through the downward API and ``PET_NNODES`` etc. as plain values,
   see ``launcher/k8s.py``) → ``jobset``;
3. Kubeflow PyTorchJob / TrainJob (``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
   ``PET_MASTER_ADDR``/``MASTER_ADDR``, ``PET_MASTER_PORT``/``MASTER_PORT``, ``PET_RDZV_ENDPOINT``,
   ``PET_RDZV_ID``, or the older ``WORLD_SIZE``/``RANK`` per pod) → ``kubernetes``;
4. a SLURM allocation (``SLURM_JOB_ID`` with ``SLURM_JOB_NODELIST``) → ``slurm``;
5. otherwise this machine alone → ``local`` (``MASTER_ADDR``/``MASTER_PORT`` still name the
   rendezvous when the same command is started by hand on several machines with ``--nnodes``).

Processes per node come from the scheduler where it says (``PET_NPROC_PER_NODE``,
``SLURM_GPUS_ON_NODE``), else the local GPU count, else ``SLURM_NTASKS_PER_NODE``, else 1;
``procs_source`` records which, so that ``launch`` can let the config's
``cluster.procs_per_node`` win over a mere device count.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UsageError

DEFAULT_PORT = 29500
HOSTFILE_ENV = "TRANSLUTION_HOSTFILE"
_PROBE_TIMEOUT_S = 10


class TopologyError(UsageError):
    """The environment describes a topology that cannot be used; the message says which variable."""


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class GPULink:
    """How two local GPUs talk, as ``nvidia-smi topo -m`` names it (NV#: NVLink; PIX/PXB/PHB/NODE/SYS: PCIe paths)."""

    a: int
    b: int
    link: str


@dataclass(frozen=True)
class Devices:
    """What this machine has: GPUs (with their pairwise links where the driver tells), CPU cores, host memory."""

    gpus: tuple[GPU, ...] = ()
    links: tuple[GPULink, ...] = ()
    cpu_cores: int = 1
    host_memory_bytes: int = 0

    @property
    def accelerator(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def interconnect(self) -> str | None:
        """``nvlink`` when every GPU pair has NVLink, ``pcie`` when some pair goes over PCIe, None when unknown."""
        if len(self.gpus) < 2 or not self.links:
            return None
        return "nvlink" if all(link.link.startswith("NV") for link in self.links) else "pcie"


@dataclass(frozen=True)
class Topology:
    kind: str  # local | hostfile | kubernetes | jobset | slurm
    nodes: int
    node_rank: int
    procs_per_node: int
    master_addr: str
    master_port: int
    devices: Devices
    procs_source: str = "default"
    min_nodes: int | None = None  # elastic PyTorchJob: PET_NNODES=min:max
    hosts: tuple[str, ...] = ()
    hostfile: Path | None = None
    job_id: str | None = None
    rdzv_endpoint: str | None = None  # set when the scheduler names the rendezvous (PET_RDZV_ENDPOINT)
    sources: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def procs_choice(self, configured: int | None) -> tuple[int, str]:
        """Processes per node as ``launch`` and ``plan`` pick them when the command line does not say, and
        where the number comes from: the scheduler's word, else ``configured`` (``cluster.procs_per_node``),
        else the GPU count, else 1."""
        if self.procs_source in ("default", "local GPUs") and configured is not None:
            return configured, "cluster.procs_per_node"
        return self.procs_per_node, self.procs_source

    @property
    def endpoint(self) -> str:
        return self.rdzv_endpoint or f"{self.master_addr}:{self.master_port}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["hostfile"] = str(self.hostfile) if self.hostfile else None
        data["world_size"] = self.world_size
        data["devices"]["accelerator"] = self.devices.accelerator
        data["devices"]["interconnect"] = self.devices.interconnect
        return data

    def describe(self) -> str:
        dev = self.devices
        nodes = f"{self.min_nodes}-{self.nodes} (elastic)" if self.min_nodes else str(self.nodes)
        lines = [
            f"kind:           {self.kind}" + (f" (job {self.job_id})" if self.job_id else ""),
            f"nodes:          {nodes}, this node is rank {self.node_rank}",
            f"procs per node: {self.procs_per_node} (from {self.procs_source})",
            f"world size:     {self.world_size}",
            f"rendezvous:     {self.endpoint}",
        ]
        if self.hosts:
            shown = ", ".join(self.hosts[:8]) + (f", … ({len(self.hosts)} hosts)" if len(self.hosts) > 8 else "")
            lines.append(f"hosts:          {shown}")
        if dev.gpus:
            lines.append(f"GPUs:           {len(dev.gpus)}" + (f", {dev.interconnect}" if dev.interconnect else ""))
            lines += [f"  {g.index}: {g.name}, {_gib(g.memory_bytes)}" for g in dev.gpus]
        else:
            lines.append("GPUs:           none (CPU processes)")
        lines.append(f"CPU cores:      {dev.cpu_cores}")
        lines.append(f"host memory:    {_gib(dev.host_memory_bytes)}")
        if self.sources:
            lines.append(f"read from:      {', '.join(self.sources)}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40, "PI": 2**50}


def parse_bytes(text: str, what: str) -> int:
    """``80GiB``, ``1TiB``, ``512GB``, ``16Gi`` or a plain byte count; ``what`` names the setting in errors."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?)?B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise TopologyError(f"{what}={text!r}: expected a size such as 80GiB, 1TiB or 512GB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def from_cluster(cluster: Any, kind: str) -> Topology:
    """The topology a config's ``cluster`` section describes, for rendering and planning away from the machines.

    GPUs per node are ``cluster.procs_per_node`` when ``cluster.gpu_memory`` is set (a GPU cluster), else none.
    """
    procs = cluster.procs_per_node or 1
    gpus = ()
    if cluster.gpu_memory is not None:
        memory = parse_bytes(cluster.gpu_memory, "cluster.gpu_memory")
        gpus = tuple(GPU(i, "planned", memory) for i in range(procs))
    host = parse_bytes(cluster.cpu_memory, "cluster.cpu_memory") if cluster.cpu_memory else 0
    return Topology(kind, cluster.nodes, 0, procs, "planned", DEFAULT_PORT, Devices(gpus, (), 0, host),
                    procs_source="cluster.procs_per_node" if cluster.procs_per_node else "default")


# -- local devices -------------------------------------------------------------------------


def _run(argv: list[str]) -> str | None:
    """A probe command's output, or None when it is missing, fails or hangs (a wedged driver must not block launch)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def parse_nvidia_smi_gpus(text: str) -> tuple[GPU, ...]:
    """Rows of ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        index, rest = line.split(",", 1)
        name, mib = rest.rsplit(",", 1)
        gpus.append(GPU(int(index), name.strip(), int(float(mib)) * 2**20))
    return tuple(gpus)


def parse_nvidia_smi_topo(text: str) -> tuple[GPULink, ...]:
    """GPU-to-GPU links from the ``nvidia-smi topo -m`` matrix (rows and columns named GPU0, GPU1, …)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ()
    header = lines[0].split()
    columns = [i for i, name in enumerate(header) if re.fullmatch(r"GPU\d+", name)]
    links = []
    for line in lines[1:]:
        cells = line.split()
        if not cells or not re.fullmatch(r"GPU\d+", cells[0]):
            continue
        a = int(cells[0][3:])
        for col in columns:
            b = int(header[col][3:])
            if b > a and col + 1 < len(cells):
                links.append(GPULink(a, b, cells[col + 1]))
    return tuple(links)


def _gpus_from_torch() -> tuple[GPU, ...]:
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(GPU(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                 for i in range(torch.cuda.device_count()))


def _host_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_devices() -> Devices:
    """GPUs from nvidia-smi (no CUDA context, so it is safe before torchrun forks), else torch.cuda; cores; memory."""
    smi = _run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"])
    gpus = parse_nvidia_smi_gpus(smi) if smi else _gpus_from_torch()
    links = ()
    if len(gpus) > 1 and smi:
        topo = _run(["nvidia-smi", "topo", "-m"])
        links = parse_nvidia_smi_topo(topo) if topo else ()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Devices(gpus, links, cores, _host_memory_bytes())


# -- hostfile and SLURM node lists ---------------------------------------------------------


def parse_hostfile(path: Path) -> list[tuple[str, int]]:
    """``host slots=N`` lines (DeepSpeed's format); ``#`` comments and blank lines are skipped."""
    try:
        text = path.read_text()
    except OSError as err:
        raise TopologyError(f"hostfile {path}: cannot read it ({err.strerror}); "
                            f"check --hostfile / ${HOSTFILE_ENV}") from err
    entries: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise TopologyError(f"hostfile {path}:{number}: expected 'HOST slots=N' with N >= 1, got {raw.strip()!r}")
        if any(host == match.group(1) for host, _ in entries):
            raise TopologyError(f"hostfile {path}:{number}: host {match.group(1)!r} is listed twice")
        entries.append((match.group(1), int(match.group(2))))
    if not entries:
        raise TopologyError(f"hostfile {path}: no hosts in it; add lines such as 'node01 slots=8'")
    return entries


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``node[01-03,07],gpu5`` (zero padding kept) as ``scontrol show hostnames``."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        hosts.extend(_expand_item(item.strip()))
    if not hosts:
        raise TopologyError(f"SLURM_JOB_NODELIST={nodelist!r}: no host names in it")
    return hosts


def _expand_item(item: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not match:
        return [item] if item else []
    prefix, ranges, rest = match.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise TopologyError(f"SLURM node list item {item!r}: cannot read the range {part!r}")
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(prefix + str(n).zfill(len(lo)) + tail for tail in _expand_item(rest) or [""])
    return out


def slurm_hosts(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` where SLURM's tools are installed (it knows every syntax), else the parser above."""
    text = _run(["scontrol", "show", "hostnames", nodelist])
    return text.split() if text and text.strip() else expand_nodelist(nodelist)


# -- detection -----------------------------------------------------------------------------


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    value = env[name]
    match = re.match(r"\s*(\d+)", value)  # SLURM writes counts such as "8(x2)"
    if not match or int(match.group(1)) < minimum:
        raise TopologyError(f"${name}={value!r}: expected an integer >= {minimum}")
    return int(match.group(1))


def _local_names() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
    names |= {name.split(".")[0] for name in list(names)}
    return names


def _procs(env: Mapping[str, str], devices: Devices, *names: str) -> tuple[int, str]:
    for name in names:
        value = env.get(name)
        if value is None:
            continue
        if value in ("auto", "gpu", "cpu"):  # torchrun's symbolic values
            if value == "cpu" or (value == "auto" and not devices.gpus):
                return devices.cpu_cores, f"{name}={value}"
            return max(1, len(devices.gpus)), f"{name}={value}"
        if name == "SLURM_NTASKS_PER_NODE" and devices.gpus:
            continue  # one launcher per node runs under srun --ntasks-per-node=1; the GPUs say how many
        return _int(env, name, 1), name
    if devices.gpus:
        return len(devices.gpus), "local GPUs"
    return 1, "default"


def _port(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        if name in env:
            port = _int(env, name, 1)
            if port > 65535:
                raise TopologyError(f"${name}={port}: a port is at most 65535")
            return port
    return DEFAULT_PORT


def _from_hostfile(path: Path, env: Mapping[str, str], devices: Devices) -> Topology:
    entries = parse_hostfile(path)
    slots = {n for _, n in entries}
    if len(slots) > 1:
        raise TopologyError(f"hostfile {path}: every host needs the same slots= (got {sorted(slots)}); "
                            "torchrun starts the same number of processes on every node")
    hosts = tuple(host for host, _ in entries)
    local = _local_names()
    rank = next((i for i, host in enumerate(hosts) if host in local or host.split(".")[0] in local), 0)
    return Topology("hostfile", len(hosts), rank, slots.pop(), hosts[0], _port(env, "MASTER_PORT"), devices,
                    procs_source="hostfile slots", hosts=hosts, hostfile=path, sources=(str(path),))


def _from_kubernetes(env: Mapping[str, str], devices: Devices) -> Topology:
    used = [name for name in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                              "PET_MASTER_PORT", "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "MASTER_ADDR", "MASTER_PORT",
                              "WORLD_SIZE", "RANK") if name in env]
    procs, procs_source = _procs(env, devices, "PET_NPROC_PER_NODE", "PET_N_PROC_PER_NODE")
    min_nodes = None
    if "PET_NNODES" in env:
        low, sep, high = env["PET_NNODES"].partition(":")
        if not low.isdigit() or (sep and not high.isdigit()) or int(high or low) < max(1, int(low)):
            raise TopologyError(f"$PET_NNODES={env['PET_NNODES']!r}: expected N or MIN:MAX")
        nodes = int(high or low)
        min_nodes = int(low) if sep and int(low) != nodes else None
    else:  # an older PyTorchJob without nprocPerNode: one process per pod, WORLD_SIZE counts pods
        nodes = _int(env, "WORLD_SIZE", 1)
    if "PET_NODE_RANK" in env:
        rank = _int(env, "PET_NODE_RANK")
    elif "RANK" in env and "PET_NNODES" not in env:
        rank = _int(env, "RANK")
    else:
        rank = 0  # elastic: the c10d rendezvous assigns node ranks
    master = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
    endpoint = env.get("PET_RDZV_ENDPOINT")
    if not master and not endpoint:
        raise TopologyError("Kubernetes (PET_NNODES set) but neither $PET_MASTER_ADDR, $MASTER_ADDR nor "
                            "$PET_RDZV_ENDPOINT names the rendezvous host; set one in the pod spec")
    if not master:
        master = endpoint.rsplit(":", 1)[0]
    if rank >= nodes:
        raise TopologyError(f"node rank {rank} is not below the node count {nodes} (PET_NODE_RANK / PET_NNODES)")
    return Topology("kubernetes", nodes, rank, procs, master, _port(env, "PET_MASTER_PORT", "MASTER_PORT"), devices,
                    procs_source=procs_source, min_nodes=min_nodes, job_id=env.get("PET_RDZV_ID"),
                    rdzv_endpoint=endpoint, sources=tuple(used))


def _from_jobset(env: Mapping[str, str], devices: Devices) -> Topology:
    name, rjob = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "node")
    if "PET_NNODES" not in env:
        raise TopologyError("JobSet pod without $PET_NNODES: set it to the Job's parallelism "
                            "(translution k8s render --flavor jobset does)")
    nodes = _int(env, "PET_NNODES", 1)
    rank = _int(env, "PET_NODE_RANK") if "PET_NODE_RANK" in env else _int(env, "JOB_COMPLETION_INDEX")
    if rank >= nodes:
        raise TopologyError(f"node rank {rank} (JOB_COMPLETION_INDEX) is not below $PET_NNODES={nodes}")
    procs, procs_source = _procs(env, devices, "PET_NPROC_PER_NODE")
    # JobSet's DNS name of the first pod: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain = jobset>
    master = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or f"{name}-{rjob}-0-0.{name}"
    used = tuple(n for n in ("JOBSET_NAME", "REPLICATED_JOB_NAME", "JOB_INDEX", "JOB_COMPLETION_INDEX", "PET_NNODES",
                             "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT") if n in env)
    return Topology("jobset", nodes, rank, procs, master, _port(env, "PET_MASTER_PORT", "MASTER_PORT"), devices,
                    procs_source=procs_source, job_id=name, sources=used)


def _from_slurm(env: Mapping[str, str], devices: Devices) -> Topology:
    nodelist = env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
    hosts = tuple(slurm_hosts(nodelist))
    nodes = _int(env, "SLURM_NNODES", 1) if "SLURM_NNODES" in env else len(hosts)
    if nodes != len(hosts):
        raise TopologyError(f"$SLURM_NNODES={nodes} but $SLURM_JOB_NODELIST={nodelist!r} has {len(hosts)} hosts")
    if "SLURM_NODEID" in env:
        rank = _int(env, "SLURM_NODEID")
    else:  # the batch script itself, outside srun, runs on the first node of the allocation
        local = _local_names()
        rank = next((i for i, host in enumerate(hosts) if host in local), 0)
    procs, procs_source = _procs(env, devices, "SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE")
    used = tuple(n for n in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NNODES", "SLURM_NODEID",
                             "SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE", "MASTER_PORT") if n in env)
    return Topology("slurm", nodes, rank, procs, hosts[0], _port(env, "MASTER_PORT"), devices,
                    procs_source=procs_source, hosts=hosts, job_id=env["SLURM_JOB_ID"], sources=used)


def detect(env: Mapping[str, str] | None = None, hostfile: Path | None = None,
           probe: Callable[[], Devices] = local_devices) -> Topology:
    """The topology of this launch; see the module docstring for the order of the sources."""
    env = os.environ if env is None else env
    devices = probe()
    hostfile = hostfile or (Path(env[HOSTFILE_ENV]) if env.get(HOSTFILE_ENV) else None)
    if hostfile is not None:
        return _from_hostfile(hostfile, env, devices)
    if "JOBSET_NAME" in env and "JOB_COMPLETION_INDEX" in env:
        return _from_jobset(env, devices)
    pet = any(name in env for name in ("PET_NNODES", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT"))
    old_pytorchjob = all(name in env for name in ("KUBERNETES_SERVICE_HOST", "MASTER_ADDR", "WORLD_SIZE", "RANK"))
    if pet or old_pytorchjob:
        return _from_kubernetes(env, devices)
    if "SLURM_JOB_ID" in env and ("SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env):
        return _from_slurm(env, devices)
    procs, procs_source = _procs(env, devices)
    used = tuple(n for n in ("MASTER_ADDR", "MASTER_PORT") if n in env)
    return Topology("local", 1, 0, procs, env.get("MASTER_ADDR", "127.0.0.1"), _port(env, "MASTER_PORT"), devices,
                    procs_source=procs_source, hosts=(socket.gethostname(),), sources=used)
