"""Turn a config and a topology into the launcher command that runs ``translution train`` in every process.

``torchrun`` (run as ``python -m launcher.torchrun``, which exits 128 + the signal when a preempted
run stopped, see there) is the launcher for ``parallel.engine`` fsdp and none: ``--standalone`` on one node, a c10d rendezvous at the master's host:port on several,
elastic restarts (``--max-restarts``) and per-rank logs (``--log-dir`` with ``--redirects 3
--tee 3``). ``engine: deepspeed`` uses DeepSpeed's own launcher with a hostfile: the user's, from
which it starts every node over ssh, or one written for the scheduler's nodes (or for this one
machine), in which case every node runs its own launcher (``--no_ssh --node_rank``), as
torchrun does.

Everything that can be checked is checked here, before a process starts: the config, that the
layout's degrees multiply to nodes × processes per node, that the node has the GPUs asked for.
The layout itself comes from :func:`choose_layout`, the seam where the memory planner plugs in.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from launcher.errors import UsageError
from launcher.topology import Topology
from parallelism.config import ParallelConfig
from training import threads
from training.config import Config

WORKER = ("--module", "launcher.cli", "train")  # each process runs `python -m launcher.cli train CONFIG …`
TOPOLOGY_ENV = "TRANSLUTION_TOPOLOGY"  # the trainer tags its MLflow run with it
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's default list plus SIGUSR1, SLURM's early warning (``#SBATCH --signal=USR1@120``), which torchrun
then forwards to the ranks instead of dying of it."""
FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
"""Set to 1 for torchrun: rank 0 then hosts a fresh TCPStore for every restart attempt. With the store
torchrun's rendezvous shares by default, a restarted gloo group can read a dead attempt's peer address
and fail (``connectFullMesh … Connection refused``) or hang (measured: 3 of 3 killed runs; 0 of 15 with it)."""


@dataclass(frozen=True)
class LaunchOptions:
    """Command-line choices that override what the config and the scheduler say."""

    nproc_per_node: int | None = None
    nnodes: int | None = None
    max_restarts: int | None = None
    log_dir: Path | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """What ``launch`` runs: the command, extra environment, files to write first, and why."""

    argv: tuple[str, ...]
    env: dict[str, str]
    topology: Topology
    layout: ParallelConfig
    files: dict[Path, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one shell-quoted line, environment first, for ``--dry-run`` and the logs."""
        env = [f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        return " ".join(env + [shlex.join(self.argv)])


def choose_layout(cfg: Config, topology: Topology) -> ParallelConfig:
    """The parallel layout this run uses on ``topology``: the config's own, resolved to its world size,
    once the memory planner (:mod:`launcher.plan`) has checked that every rank fits.

    A layout that does not fit is refused (exit 2) with the reason and the planner's choice as
    overrides to add: the workers read the config and the command-line overrides themselves, so
    a layout substituted here would not reach them. An elastic job is checked at its smallest
    size (the least sharding). Without any memory figure (no GPU, host memory unknown) there is
    nothing to check against.
    """
    from launcher.plan import Cluster, describe_layout, evaluate, hints, layout_overrides, plan

    sizes = [topology.world_size]
    if topology.min_nodes not in (None, topology.nodes):
        sizes.insert(0, topology.min_nodes * topology.procs_per_node)  # an elastic job runs at either end
    for world in sizes:
        try:
            layout = cfg.parallel.resolve(world)
        except ValueError as err:
            raise UsageError(
                f"parallel: {err}. This launch has {world} processes (nodes={world // topology.procs_per_node} × "
                f"procs_per_node={topology.procs_per_node}, {topology.kind}); change the parallel degrees or "
                "--nnodes / --nproc-per-node") from err
    cluster = Cluster.from_topology(topology, cfg, nodes=sizes[0] // topology.procs_per_node)
    if cluster.gpu_memory is None and cluster.cpu_memory is None:
        return layout
    verdict = evaluate(cfg, cfg.parallel.resolve(cluster.world_size), cluster)
    if verdict.fits:
        return layout
    message = (f"parallel layout {describe_layout(verdict.layout)} does not fit ({cluster.describe()}): "
               f"{'; '.join(verdict.problems)}")
    choice = plan(cfg, cluster).choice
    if choice is not None:
        message += (f". The memory planner's choice fits: add {' '.join(layout_overrides(choice.layout))} "
                    "(`translution plan CONFIG` lists every layout)")
    else:
        advice = hints(cfg, cluster)
        message += ". No layout fits this cluster" + (f"; one would with {' or '.join(advice)}" if advice else
                                                       "; use more nodes or GPUs with more memory")
    raise UsageError(message)


def resolve_topology(cfg: Config, detected: Topology, options: LaunchOptions) -> Topology:
    """Apply the command line and the config's ``cluster`` section to what detection found.

    Processes per node: ``--nproc-per-node``, else the scheduler's word, else ``cluster.procs_per_node``,
    else the GPU count, else 1. Nodes: the scheduler's (``--nnodes`` may only repeat it), or on a
    plain machine ``--nnodes`` (several machines started by hand, with ``MASTER_ADDR`` set) or 1.
    """
    procs, source = detected.procs_choice(cfg.cluster.procs_per_node)
    if options.nproc_per_node is not None:
        procs, source = options.nproc_per_node, "--nproc-per-node"
    gpus = len(detected.devices.gpus)
    if gpus and procs > gpus:
        raise UsageError(f"{procs} processes per node (from {source}) but this node has {gpus} GPUs; "
                         f"use --nproc-per-node {gpus} or fewer")

    nodes = detected.nodes
    if detected.kind == "local":
        nodes = options.nnodes or 1
        if nodes > 1 and "MASTER_ADDR" not in detected.sources:
            raise UsageError(f"--nnodes {nodes} on a machine outside SLURM, Kubernetes or a hostfile: set MASTER_ADDR "
                             "(and MASTER_PORT) to node 0's address and start the same command on every node")
        if options.nnodes is None and cfg.cluster.nodes > 1:
            raise UsageError(f"cluster.nodes={cfg.cluster.nodes} but no multi-node job was detected (SLURM, "
                             "Kubernetes, --hostfile); launch inside the job, or pass --nnodes 1 to try it on "
                             "this machine")
    elif options.nnodes is not None and options.nnodes != detected.nodes:
        raise UsageError(f"--nnodes {options.nnodes} disagrees with {detected.kind}, which has {detected.nodes} nodes "
                         f"({', '.join(detected.sources)}); drop --nnodes")
    elif cfg.cluster.nodes not in (1, detected.nodes):
        print(f"translution launch: note: cluster.nodes={cfg.cluster.nodes} but {detected.kind} has "
              f"{detected.nodes} nodes; launching on {detected.nodes}", file=sys.stderr)
    return replace(detected, nodes=nodes, procs_per_node=procs, procs_source=source,
                   min_nodes=detected.min_nodes if nodes == detected.nodes else None)


def _torchrun(cfg: Config, topology: Topology, worker: list[str], max_restarts: int, log_dir: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "launcher.torchrun"]  # torchrun, exiting 128 + signal when preempted
    if topology.nodes == 1:
        argv += ["--standalone", "--nnodes", "1"]
    else:
        nnodes = f"{topology.min_nodes}:{topology.nodes}" if topology.min_nodes else str(topology.nodes)
        argv += ["--nnodes", nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", topology.endpoint,
                 "--rdzv-id", topology.job_id or cfg.run.name]
    argv += ["--nproc-per-node", str(topology.procs_per_node), "--max-restarts", str(max_restarts),
             "--shutdown-timeout", str(cfg.cluster.stop_grace_s), "--signals-to-handle", SIGNALS_TO_HANDLE]
    if log_dir is not None:
        argv += ["--log-dir", str(log_dir), "--redirects", "3", "--tee", "3"]
    return argv + [*WORKER, *worker]


def _deepspeed(cfg: Config, topology: Topology, worker: list[str], max_restarts: int,
               log_dir: Path | None) -> tuple[list[str], dict[Path, str]]:
    if importlib.util.find_spec("deepspeed") is None:
        raise UsageError("parallel.engine=deepspeed needs DeepSpeed: pip install 'translution-dist[deepspeed]'")
    if max_restarts:
        raise UsageError(f"--max-restarts {max_restarts}: the deepspeed launcher does not restart workers; "
                         "drop it (or cluster.max_restarts), or use parallel.engine=fsdp with torchrun")
    files: dict[Path, str] = {}
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if topology.kind == "hostfile":
        if topology.node_rank != 0:
            raise UsageError(f"engine=deepspeed with a hostfile starts every node over ssh from the first host; "
                             f"run launch on {topology.hosts[0]}, not on node {topology.node_rank}")
        hostfile = topology.hostfile
    else:
        hostfile = cfg.run_dir / "launch" / "hostfile"
        hosts = topology.hosts
        if topology.nodes == 1:
            hosts = ("localhost",)
        elif len(hosts) != topology.nodes:  # Kubernetes: with --no_ssh only the ranks matter, not the names
            hosts = tuple(f"node-{i}" for i in range(topology.nodes))
        files[hostfile] = "".join(f"{host} slots={topology.procs_per_node}\n" for host in hosts)
    argv += ["--hostfile", str(hostfile), "--num_nodes", str(topology.nodes),
             "--num_gpus", str(topology.procs_per_node),
             "--master_addr", topology.master_addr, "--master_port", str(topology.master_port)]
    if topology.kind != "hostfile":  # one launcher per node, one machine included: nothing goes over ssh
        argv += ["--no_ssh", "--node_rank", str(topology.node_rank)]
    if log_dir is not None:
        argv += ["--enable_each_rank_log", str(log_dir)]
    return argv + ["--no_local_rank", *WORKER, *worker], files


def build_plan(cfg: Config, config_path: str, overrides: list[str], detected: Topology,
               options: LaunchOptions = LaunchOptions()) -> LaunchPlan:
    """Check everything and build the command; nothing is started or written."""
    try:
        cfg.parallel.check_model(cfg.model)
    except ValueError as err:
        raise UsageError(f"parallel: {err}") from err
    topology = resolve_topology(cfg, detected, options)
    layout = choose_layout(cfg, topology)
    max_restarts = options.max_restarts if options.max_restarts is not None else cfg.cluster.max_restarts
    worker = [config_path, *overrides]
    files: dict[Path, str] = {}
    env = {TOPOLOGY_ENV: topology.kind}
    if threads.user_threads() is None:  # torchrun's default is 1 per process, whatever the cores
        env[threads.THREADS_ENV] = str(threads.threads_per_process(topology.procs_per_node))
    if layout.engine == "deepspeed":
        argv, files = _deepspeed(cfg, topology, worker, max_restarts, options.log_dir)
    else:
        argv = _torchrun(cfg, topology, worker, max_restarts, options.log_dir)
        env[FRESH_STORE_ENV] = os.environ.get(FRESH_STORE_ENV, "1")
    return LaunchPlan(tuple(argv), env, topology, layout, files)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def execute(plan: LaunchPlan) -> NoReturn:
    """Write the plan's files and become the launcher (exec), so that SIGTERM from SLURM or the kubelet reaches it."""
    for path, text in plan.files.items():
        _write_atomically(path, text)
    print(f"translution launch: {plan.shell()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(plan.argv[0], list(plan.argv), {**os.environ, **plan.env})
