"""The memory planner: the parameter census, candidate layouts, the choice rule, refusals,
``translution plan`` and the check ``launch`` makes through ``choose_layout``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.errors import UsageError
from launcher.launch import choose_layout
from launcher.memory_model import RunShape, estimate, model_census
from launcher.plan import (
    Candidate,
    Cluster,
    candidate_layouts,
    layout_overrides,
    plan,
)
from launcher.topology import GPU, Devices, Topology
from parallelism.config import ParallelConfig
from training.config import Config, load_config
from translution_dist.models import build_model, count_parameters

GiB = 2**30
MODEL = {"arch": "gpt", "attention": "translution", "dim": 64, "depth": 2, "heads": 4, "dim_head": 16,
         "mlp_dim": 128, "context_length": 32, "vocab_size": 100, "bank_chunks": 4}
RUN = {
    "run": {"name": "plan-test"},
    "model": MODEL,
    "data": {"kind": "synthetic", "synthetic": {"task": "text", "context_length": 32, "vocab_size": 100}},
    "train": {"micro_batch_size": 2},
    "tracking": {"enabled": False},
    "cluster": {"nodes": 2, "procs_per_node": 4, "gpu_memory": "1GiB", "cpu_memory": "64GiB"},
}


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RUN))
    return path


@pytest.fixture
def cfg(config_path) -> Config:
    return load_config(config_path)


def test_census_counts_the_meta_model_exactly(cfg):
    census = model_census(cfg.model)
    assert census.numel == count_parameters(build_model(cfg.model))
    roles = {p.name: p.role for p in census.params}
    assert roles["encoder.blocks.0.attn.score_banks.3.k.weight"] == "bank"
    assert roles["encoder.blocks.1.ff.up_proj.bias"] == "colwise"
    assert roles["encoder.blocks.1.attn.out_proj.weight"] == "rowwise"
    assert roles["encoder.blocks.1.attn.out_proj.bias"] == "rowwise_bias"
    assert roles["token_embedding.weight"] == "replicated"
    units = {p.name: p.unit for p in census.params}
    assert units["encoder.blocks.1.attn.value_banks.2.v.weight"] == "chunk.1.value.2"
    assert units["encoder.blocks.1.attn.norm.weight"] == "block.1"
    assert units["head.weight"] == "root"
    banks = sum(n for key, n in census.numel_by_component().items() if key.startswith("banks"))
    assert banks == 2 * 3 * 32 * 64 * 64  # depth · sides · K · C · C'


def test_candidates_respect_the_code_and_the_node(cfg):
    cluster = Cluster.of(cfg)
    layouts = candidate_layouts(cfg, cluster)
    assert layouts
    for layout in layouts:
        assert layout.dp_replicate * layout.dp_shard * layout.dispp * layout.tp == 8
        model_parallel = layout.tp * layout.dispp
        assert cluster.procs_per_node % layout.tp == 0  # head parallelism stays inside a node
        assert cluster.procs_per_node % model_parallel == 0 or model_parallel % cluster.procs_per_node == 0
        assert cfg.model.dims.heads % layout.tp == 0 and layout.dispp <= 32 // 4
        if layout.engine == "deepspeed":
            assert (layout.tp, layout.dispp, layout.dp_replicate) == (1, 1, 1)
        if layout.engine == "none":
            assert layout.dp_replicate * layout.dp_shard == 1
    engines = {layout.engine for layout in layouts}
    assert engines == {"fsdp", "deepspeed", "none"}
    # `none` needs all 8 ranks model-parallel: only with displacement parallelism spanning both nodes.
    assert all(layout.dispp * layout.tp == 8 and layout.dispp >= 2 for layout in layouts if layout.engine == "none")
    assert any(layout.dispp == 8 for layout in layouts)
    assert any(layout.tp == 4 for layout in layouts) and any(layout.dispp == 4 for layout in layouts)


def test_choice_moves_the_least_data(cfg):
    result = plan(cfg, Cluster.of(cfg, gpu_memory="80GiB"))
    choice = result.choice
    assert choice is not None and choice.fits and choice.offload == "none"
    fitting = [c for c in result.candidates if c.fits]
    assert all(choice.rank_key(result.cluster) <= c.rank_key(result.cluster) for c in fitting)
    offloaded = [c for c in fitting if c.offload != "none"]
    assert offloaded and all(c.cost.pcie > 0 and c.cost.seconds > choice.cost.seconds for c in offloaded)


def test_offload_is_chosen_only_when_needed(cfg):
    """On GPUs too small for every layout without offload, the planner offloads, and says why the others fail."""
    roomy = plan(cfg, Cluster.of(cfg, gpu_memory="80GiB"))
    smallest = {offload: min(c.gpu_bytes for c in roomy.candidates if c.offload == offload)
                for offload in ("none", "all→cpu")}
    assert smallest["all→cpu"] < smallest["none"]
    usable = (smallest["all→cpu"] + smallest["none"]) // 2
    result = plan(cfg, Cluster.of(cfg, gpu_memory=str(int(usable / 0.9))))
    assert result.choice is not None and result.choice.offload != "none"
    assert not result.config_layout.fits
    problem = result.config_layout.problems[0]
    assert problem.startswith("needs ") and "per GPU >" in problem and "headroom" in problem
    assert "optimizer states (AdamW m, v)" in problem


def test_gpu_peak_is_sharded_states_plus_transients(cfg):
    layout = ParallelConfig(engine="fsdp").resolve(8)
    est = estimate(RunShape(cfg.model, 2, "fp32", "cuda"), layout)
    params = est.param_bytes_per_rank
    assert params == 4 * sum(-(-p.shape[0] // 8) * (p.numel // p.shape[0]) for p in model_census(cfg.model).params)
    persistent = {t.name: t.bytes for t in est.persistent}
    assert persistent["optimizer states (AdamW m, v)"] == 2 * params
    phases = {p.name: p for p in est.phases}
    assert {"backward start", "backward end", "optimizer step"} <= set(phases)
    assert est.peak("device") >= 3 * params + phases["optimizer step"].at("device")
    offloaded = estimate(RunShape(cfg.model, 2, "fp32", "cuda"), layout.model_copy(update={"cpu_offload": True}))
    assert offloaded.peak("host") >= 4 * params and offloaded.peak("device") < est.peak("device")


def test_overrides_select_the_planned_layout(config_path):
    cfg = load_config(config_path)
    choice = plan(cfg, Cluster.of(cfg, gpu_memory="80GiB")).choice
    again = load_config(config_path, layout_overrides(choice.layout))
    assert again.parallel.resolve(8) == choice.layout


def test_plan_command_text_and_json(config_path, capsys):
    assert main(["plan", str(config_path), "--gpu-mem", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "overrides: parallel.engine=" in out and "per GPU" in out
    assert "2 nodes × 4 processes = 8 ranks" in out
    assert main(["plan", str(config_path), "--json", "--nodes", "1", "--gpus-per-node", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["world_size"] == 2 and data["choice"]["fits"]
    assert {"device", "host", "nvme"} == set(data["choice"]["per_rank"]["peak_bytes"])
    assert all(c["layout"]["dp_replicate"] * c["layout"]["dp_shard"] * c["layout"]["dispp"] * c["layout"]["tp"] == 2
               for c in data["candidates"])


def test_plan_command_when_nothing_fits(config_path, capsys):
    assert main(["plan", str(config_path), "--gpu-mem", "64KiB", "--cpu-mem", "64GiB"]) == 2
    out = capsys.readouterr().out
    assert "no layout fits" in out and "needs" in out


def test_plan_command_rejects_bad_sizes(config_path, capsys):
    assert main(["plan", str(config_path), "--gpu-mem", "lots"]) == 2
    assert "expected a size such as 80GiB" in capsys.readouterr().err


def _topology(gpu_bytes: int | None, host_bytes: int, nodes: int = 2, procs: int = 4) -> Topology:
    gpus = tuple(GPU(i, "test", gpu_bytes) for i in range(procs)) if gpu_bytes else ()
    return Topology("slurm", nodes, 0, procs, "n0", 29500, Devices(gpus, (), 8, host_bytes))


def test_choose_layout_keeps_a_layout_that_fits(cfg):
    layout = choose_layout(cfg, _topology(80 * GiB, 512 * GiB))
    assert layout == cfg.parallel.resolve(8)


def test_choose_layout_refuses_and_names_the_planned_overrides(cfg):
    roomy = plan(cfg, Cluster.of(cfg, gpu_memory="80GiB"))
    no_offload = min(c.gpu_bytes for c in roomy.candidates if c.offload == "none")
    with pytest.raises(UsageError) as err:
        choose_layout(cfg, _topology(int(no_offload * 0.95 / 0.9), 512 * GiB))
    message = str(err.value)
    assert "does not fit" in message and "per GPU" in message
    assert "The memory planner's choice fits: add parallel.engine=fsdp" in message
    assert "parallel.cpu_offload=true" in message


def test_choose_layout_refuses_when_nothing_fits(cfg):
    with pytest.raises(UsageError, match="No layout fits this cluster"):
        choose_layout(cfg, _topology(64 * 2**10, 512 * GiB))


def test_choose_layout_on_cpus_checks_host_memory(cfg):
    assert choose_layout(cfg, _topology(None, 64 * GiB)) == cfg.parallel.resolve(8)
    with pytest.raises(UsageError, match="memory per node"):
        choose_layout(cfg, _topology(None, 2 * GiB))
    assert choose_layout(cfg, _topology(None, 0)) == cfg.parallel.resolve(8)  # unknown memory: nothing to check


def test_launch_refuses_with_exit_2(config_path, capsys, monkeypatch):
    monkeypatch.setattr("launcher.launch_command.detect", lambda hostfile=None: _topology(64 * 2**10, 512 * GiB))
    assert main(["launch", str(config_path), "--dry-run"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_candidate_table_rows_are_sorted(cfg):
    result = plan(cfg, Cluster.of(cfg, gpu_memory="80GiB"))
    fits = [c.fits for c in result.candidates]
    assert fits == sorted(fits, reverse=True)  # fitting ones first
    assert isinstance(result.candidates[0], Candidate)


def test_plan_sees_this_machine_as_launch_does(capsys, monkeypatch):
    """Planning for the machine it runs on, ``plan`` takes the processes per node as ``launch`` does (the
    scheduler's, else ``cluster.procs_per_node``) and the host memory ``translution topology`` reports."""
    from launcher.topology import detect

    for name in ("SLURM_JOB_ID", "PET_NNODES", "JOBSET_NAME", "WORLD_SIZE", "TRANSLUTION_HOSTFILE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")

    def planned() -> dict:
        assert main(["plan", quickstart, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["cluster"]

    assert main(["launch", quickstart, "--dry-run"]) == 0
    assert "--nproc-per-node 2 " in capsys.readouterr().out  # what scripts/quickstart.sh runs
    cluster = planned()
    assert cluster["procs_per_node"] == 2  # before: 1
    assert cluster["cpu_memory"] == detect().devices.host_memory_bytes > 0  # before: None, "host memory unknown"
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "cpu01", "SLURM_NNODES": "1",
                        "SLURM_NTASKS_PER_NODE": "3"}.items():
        monkeypatch.setenv(name, value)
    assert planned()["procs_per_node"] == 3  # the scheduler's word, as launch takes it
