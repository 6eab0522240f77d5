"""The step-time model: compute from the FLOP census, collectives on the links they cross, overlap, MFU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.plan import Cluster, evaluate, plan
from launcher.step_time import compute_seconds
from parallelism.config import ParallelConfig
from training.config import Config, load_config
from training.hardware import PRESETS
from translution_dist.models.flops import executed_flops_per_sample, model_flops_per_sample

MODEL = {"arch": "gpt", "attention": "translution", "dim": 64, "depth": 2, "heads": 4, "dim_head": 16,
         "mlp_dim": 128, "context_length": 32, "vocab_size": 100, "bank_chunks": 4}
RUN = {
    "run": {"name": "step-time-test"},
    "model": MODEL,
    "data": {"kind": "synthetic", "synthetic": {"task": "text", "context_length": 32, "vocab_size": 100}},
    "train": {"micro_batch_size": 2},
    "tracking": {"enabled": False},
    "cluster": {"nodes": 2, "procs_per_node": 4, "gpu_memory": "80GiB", "cpu_memory": "64GiB",
                "hardware": {"preset": "h100_sxm"}},
}
H100 = PRESETS["h100_sxm"]


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RUN))
    return path


@pytest.fixture
def cfg(config_path) -> Config:
    return load_config(config_path)


def _with(cluster: Cluster, **figures: float) -> Cluster:
    return dataclasses.replace(cluster, hardware=dataclasses.replace(cluster.hardware, **figures))


def _layout(world: int = 8, **fields) -> ParallelConfig:
    return ParallelConfig(**fields).resolve(world)


def test_compute_is_the_census_at_the_device_rate(cfg):
    """One process, no model parallelism: executed FLOPs of the micro-batch at peak × efficiency."""
    hw = dataclasses.replace(H100, kernel_efficiency=0.5, matmul_efficiency=0.5)
    seconds = compute_seconds(cfg, _layout(1, engine="none"), hw)
    assert seconds == pytest.approx(2 * executed_flops_per_sample(cfg.model) / (0.5 * H100.peak_flops))
    # Head and displacement parallelism divide the per-pair work; dense work is not divided by dispp.
    split = compute_seconds(cfg, _layout(8, engine="none", tp=2, dispp=4), hw)
    assert seconds / 8 < split < seconds / 2


def test_step_time_is_monotone_in_bandwidth_and_latency(cfg):
    cluster = Cluster.of(cfg)
    for layout in (_layout(engine="fsdp"), _layout(engine="fsdp", tp=2, dispp=4), _layout(engine="none", dispp=8),
                   _layout(engine="deepspeed", offload_optimizer="cpu")):
        base = evaluate(cfg, layout, cluster).time.step_s
        for field in ("intra_node_bandwidth", "inter_node_bandwidth", "pcie_bandwidth"):
            slower = evaluate(cfg, layout, _with(cluster, **{field: getattr(H100, field) / 1000})).time.step_s
            faster = evaluate(cfg, layout, _with(cluster, **{field: getattr(H100, field) * 1000})).time.step_s
            assert faster <= base <= slower, (layout, field)
        higher = evaluate(cfg, layout, _with(cluster, inter_node_latency=1e-3, intra_node_latency=1e-3)).time.step_s
        assert higher > base


def test_zero3_hides_behind_compute_and_model_parallel_collectives_do_not(cfg):
    # Slow compute: FSDP2's gathers and reductions are hidden but for one unit's.
    slow = _with(Cluster.of(cfg), peak_flops=1e9)
    fsdp = evaluate(cfg, _layout(engine="fsdp"), slow).time
    assert fsdp.hidden_comm_s > 0 and fsdp.hidden_comm_s < fsdp.compute_s
    assert fsdp.exposed_comm_s == pytest.approx(fsdp.unhidden_s) and fsdp.unhidden_s < fsdp.hidden_comm_s / 10
    # The same gathers on a link 10⁶ times slower outgrow compute: the excess is exposed.
    starved = evaluate(cfg, _layout(engine="fsdp"), _with(slow, inter_node_bandwidth=1e3)).time
    assert starved.exposed_comm_s == pytest.approx(starved.hidden_comm_s - starved.compute_s + starved.unhidden_s)
    # Head/displacement-parallel all-reduces are on the critical path however slow the compute.
    tp = evaluate(cfg, _layout(engine="none", tp=4, dispp=2), slow).time
    assert tp.critical_comm_s > 0 and tp.exposed_comm_s == pytest.approx(tp.critical_comm_s)
    assert tp.step_s == pytest.approx(tp.compute_s + tp.critical_comm_s + tp.optimizer_s)


def test_cpu_optimizer_is_serial_and_offload_copies_travel_with_the_gathers(cfg):
    cluster = Cluster.of(cfg)
    offloaded = evaluate(cfg, _layout(engine="fsdp", cpu_offload=True), cluster)
    on_gpu = evaluate(cfg, _layout(engine="fsdp"), cluster)
    t = offloaded.time
    assert offloaded.cost.cpu_updates > 0
    assert t.optimizer_s == pytest.approx(offloaded.cost.cpu_updates / H100.cpu_adam_params_per_s)
    assert on_gpu.time.optimizer_s < t.optimizer_s / 100  # memory-bound on the GPU
    halved = evaluate(cfg, _layout(engine="fsdp", cpu_offload=True),
                      _with(cluster, cpu_adam_params_per_s=H100.cpu_adam_params_per_s / 2)).time
    assert halved.step_s - t.step_s == pytest.approx(t.optimizer_s)


def test_dispp_across_nodes_is_priced_on_the_network(cfg):
    """dispp=8 over 2 nodes × 4: its all-reduces cross nodes; dispp=4 inside a node stays on NVLink."""
    cluster = Cluster.of(cfg)
    across = evaluate(cfg, _layout(engine="none", dispp=8), cluster)
    inside = evaluate(cfg, _layout(engine="fsdp", dispp=4, dp_shard=2), cluster)
    assert [c.inter_node for c in across.cost.collectives if c.name == "dispp all-reduce"] == [True]
    assert [c.inter_node for c in inside.cost.collectives if c.name == "dispp all-reduce"] == [False]
    slower = evaluate(cfg, _layout(engine="none", dispp=8), _with(cluster, inter_node_bandwidth=1e6)).time
    assert slower.critical_comm_s > across.time.critical_comm_s


def test_mfu_counts_model_flops_of_the_global_batch(cfg):
    c = evaluate(cfg, _layout(engine="fsdp"), Cluster.of(cfg))
    t = c.time
    assert t.tokens == 8 * 2 * 32
    assert t.mfu * t.step_s * 8 * H100.peak_flops == pytest.approx(16 * model_flops_per_sample(cfg.model))
    assert t.tokens_per_s == pytest.approx(t.tokens / t.step_s)


def test_choice_is_the_fastest_per_token(cfg):
    result = plan(cfg, Cluster.of(cfg))
    fitting = [c for c in result.candidates if c.fits]
    best = result.choice.time
    assert all(best.step_s / best.tokens <= c.time.step_s / c.time.tokens for c in fitting)


def test_plan_json_has_step_time_fields(config_path, capsys):
    assert main(["plan", str(config_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["hardware"]["peak_flops"] == H100.peak_flops
    for cand in data["candidates"]:
        assert {"compute_s", "step_s", "mfu", "tokens_per_s"} <= set(cand)
        assert 0 < cand["compute_s"] <= cand["step_s"] and 0 < cand["mfu"] < 1
    assert main(["plan", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "tokens/s" in out and "H100 SXM" in out and "step " in out


def test_calibrate_writes_a_cluster_file_the_plan_uses(config_path, tmp_path, capsys):
    """A real (short) measurement with 2 concurrent processes over gloo, then a plan with its figures."""
    out = tmp_path / "calibrated.yaml"
    assert main(["plan", str(config_path), "--calibrate", str(out), "--procs", "2", "--budget", "0.05"]) == 0
    assert "gloo all-reduce" in capsys.readouterr().out
    section = yaml.safe_load(out.read_text())
    hw = section["hardware"]
    assert (section["nodes"], section["procs_per_node"]) == (1, 2)
    for key in ("peak_flops", "matmul_efficiency", "kernel_efficiency", "cpu_adam_params_per_s", "pcie_bandwidth",
                "intra_node_bandwidth", "inter_node_bandwidth", "intra_node_latency"):
        assert hw[key] > 0, key
    assert main(["plan", str(config_path), f"cluster={out}", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["world_size"] == 2 and data["cluster"]["hardware"]["peak_flops"] == hw["peak_flops"]
    assert data["choice"]["step_s"] > data["choice"]["compute_s"] > 0


def test_cpu_processes_do_not_overlap_collectives_with_compute(cfg):
    """gloo's copies and reductions run on the cores that compute: every ZeRO-3 transfer is exposed."""
    cpu = dataclasses.replace(Cluster.of(cfg), gpu_memory=None)
    t = evaluate(cfg, _layout(engine="fsdp"), cpu).time
    assert t.hidden_comm_s > 0 and t.exposed_comm_s == pytest.approx(t.hidden_comm_s)
    assert t.step_s == pytest.approx(t.compute_s + t.hidden_comm_s + t.optimizer_s)
