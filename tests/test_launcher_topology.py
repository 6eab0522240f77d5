"""Topology detection: SLURM node lists, hostfiles, Kubeflow and JobSet variables, nvidia-smi output, precedence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.topology import (
    GPU,
    Devices,
    TopologyError,
    detect,
    expand_nodelist,
    parse_bytes,
    parse_nvidia_smi_gpus,
    parse_nvidia_smi_topo,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = Devices(cpu_cores=4, host_memory_bytes=2**34)
GPUS8 = Devices(tuple(GPU(i, "NVIDIA H100 80GB HBM3", 80 * 2**30) for i in range(8)), (), 64, 2**41)


def probe(devices: Devices = CPU):
    return lambda: devices


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu5", ["gpu5"]),
    ("a[1-2],b[08-10]", ["a1", "a2", "b08", "b09", "b10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[9-11].cluster", ["x9.cluster", "x10.cluster", "x11.cluster"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_rejects_garbage():
    with pytest.raises(TopologyError, match="cannot read the range"):
        expand_nodelist("node[a-b]")


def test_slurm(monkeypatch):
    monkeypatch.setattr("launcher.topology.shutil.which", lambda name: None)  # no scontrol: use the parser
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}
    topo = detect(env, probe=probe(GPUS8))
    assert (topo.kind, topo.nodes, topo.node_rank, topo.procs_per_node) == ("slurm", 4, 2, 8)
    assert (topo.master_addr, topo.master_port, topo.job_id) == ("gpu01", 29500, "4242")
    assert topo.hosts == ("gpu01", "gpu02", "gpu03", "gpu04")
    assert topo.procs_source == "SLURM_GPUS_ON_NODE"


def test_slurm_cpu_tasks_and_count_syntax():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "c[1-2]", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "MASTER_PORT": "31000"}
    topo = detect(env, probe=probe())
    assert (topo.nodes, topo.procs_per_node, topo.master_port) == (2, 4, 31000)


def test_slurm_node_count_mismatch_is_named():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "c[1-2]", "SLURM_NNODES": "3"}
    with pytest.raises(TopologyError, match="SLURM_NNODES=3"):
        detect(env, probe=probe())


def test_pytorchjob_master_worker():
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-master-0",
           "PET_MASTER_PORT": "23456", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "32",
           "RANK": "3"}
    topo = detect(env, probe=probe(GPUS8))
    assert (topo.kind, topo.nodes, topo.node_rank, topo.procs_per_node) == ("kubernetes", 4, 3, 8)
    assert topo.endpoint == "job-master-0:23456"


def test_pytorchjob_elastic_range_and_rdzv_endpoint():
    env = {"PET_NNODES": "2:4", "PET_NPROC_PER_NODE": "auto", "PET_RDZV_ENDPOINT": "job-worker-0:29400",
           "PET_RDZV_ID": "job", "PET_RDZV_BACKEND": "c10d"}
    topo = detect(env, probe=probe(GPUS8))
    assert (topo.nodes, topo.min_nodes, topo.procs_per_node, topo.job_id) == (4, 2, 8, "job")
    assert topo.endpoint == "job-worker-0:29400"


def test_old_pytorchjob_one_process_per_pod():
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456",
           "WORLD_SIZE": "3", "RANK": "2"}
    topo = detect(env, probe=probe())
    assert (topo.kind, topo.nodes, topo.node_rank, topo.procs_per_node) == ("kubernetes", 3, 2, 1)


def test_kubernetes_without_master_is_named():
    with pytest.raises(TopologyError, match="PET_MASTER_ADDR"):
        detect({"PET_NNODES": "2"}, probe=probe())


def test_jobset_rank_from_completion_index():
    env = {"JOBSET_NAME": "run", "REPLICATED_JOB_NAME": "node", "JOB_INDEX": "0", "JOB_COMPLETION_INDEX": "5",
           "PET_NNODES": "8", "PET_NPROC_PER_NODE": "8"}
    topo = detect(env, probe=probe(GPUS8))
    assert (topo.kind, topo.nodes, topo.node_rank, topo.job_id) == ("jobset", 8, 5, "run")
    assert topo.master_addr == "run-node-0-0.run"


def test_hostfile_wins_and_finds_this_host(tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.topology._local_names", lambda: {"beta"})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nalpha slots=4\nbeta slots=4  # this one\n\n")
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "x[1-9]"}  # an explicit hostfile beats SLURM
    topo = detect(env, hostfile=hostfile, probe=probe())
    assert (topo.kind, topo.nodes, topo.node_rank, topo.procs_per_node, topo.master_addr) == (
        "hostfile", 2, 1, 4, "alpha")


@pytest.mark.parametrize("text, match", [
    ("a slots=2\nb slots=4\n", "same slots"),
    ("a slots=2\na slots=2\n", "listed twice"),
    ("a 2\n", "expected 'HOST slots=N'"),
    ("# empty\n", "no hosts"),
])
def test_hostfile_errors(tmp_path, text, match):
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(TopologyError, match=match):
        detect({}, hostfile=path, probe=probe())


def test_local():
    topo = detect({}, probe=probe(GPUS8))
    assert (topo.kind, topo.nodes, topo.procs_per_node, topo.master_addr) == ("local", 1, 8, "127.0.0.1")
    assert topo.to_dict()["devices"]["accelerator"] == "cuda"


NVIDIA_SMI_TOPO = """\
\tGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity
GPU0\t X \tNV18\tSYS\tPIX\t0-47\t0
GPU1\tNV18\t X \tSYS\tPXB\t0-47\t0
GPU2\tSYS\tSYS\t X \tSYS\t48-95\t1
NIC0\tPIX\tPXB\tSYS\t X
"""


def test_nvidia_smi_parsers():
    gpus = parse_nvidia_smi_gpus("0, NVIDIA A100-SXM4-80GB, 81920\n1, NVIDIA A100-SXM4-80GB, 81920\n")
    assert gpus[1] == GPU(1, "NVIDIA A100-SXM4-80GB", 81920 * 2**20)
    links = parse_nvidia_smi_topo(NVIDIA_SMI_TOPO)
    assert [(link.a, link.b, link.link) for link in links] == [(0, 1, "NV18"), (0, 2, "SYS"), (1, 2, "SYS")]
    assert Devices(gpus, links[:1]).interconnect == "nvlink"
    assert Devices(gpus + (GPU(2, "x", 1),), links).interconnect == "pcie"


def test_parse_bytes():
    assert parse_bytes("80GiB", "x") == 80 * 2**30
    assert parse_bytes("2Ti", "x") == 2 * 2**40
    assert parse_bytes("512GB", "x") == 512 * 10**9
    with pytest.raises(TopologyError, match="cluster.gpu_memory='lots'"):
        parse_bytes("lots", "cluster.gpu_memory")


@pytest.mark.multiprocess
def test_topology_command_json():
    out = subprocess.run([sys.executable, "-c", "import sys; from launcher.cli import main; sys.exit(main())",
                          "topology", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "MASTER_PORT": "29999"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["kind"], data["nodes"], data["master_port"]) == ("local", 1, 29999)
    assert data["world_size"] == data["procs_per_node"]
