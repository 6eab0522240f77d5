"""``translution ckpt inspect|export|reshard`` on the checkpoints of a real 2-process FSDP2 run.

One run trains a tiny α-Translution ViT for 4 steps in 2 processes (checkpoints at steps 2
and 4, the final model written as ``artifacts/model.safetensors``); every test reads it.
Resharding is checked by continuing training: the checkpoint resharded to 3 bank chunks and
the original continue in one process to the same parameters and optimizer state.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

import training.checkpoint.export as checkpoint_export
from launcher.cli import main
from test_train import _config, _env, _train
from training.checkpoint.locate import config_hash, locate, model_config
from training.checkpoint.reshard import read_state, regroup_state
from training.checkpoint.safetensors_file import TensorEntry, write_safetensors
from training.checkpoint.store import CheckpointManager, verify
from translution_dist.models import ModelConfig, build_model, count_parameters
from translution_dist.models.official import from_official

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # single-process DCP, on purpose

K = 28  # displacements of the 3x3 patch grid with a class token
BANK = "encoder.blocks.0.attn.score_banks.{}.q.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The run directory of a finished 2-process FSDP2 run (steps 2 and 4 checkpointed)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    config = _config(tmp, "fsdp", parallel={"engine": "fsdp", "dp_shard": -1}, train={"steps": 4})
    _train(config, nproc=2)
    return tmp / "runs" / "fsdp"


def _ckpt(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["ckpt", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# -- inspect ---------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_inspect_names_every_tensor_with_global_shapes(run, capsys, monkeypatch):
    monkeypatch.setattr(dcp, "load", lambda *a, **k: pytest.fail("inspect loaded tensors"))
    code, out, err = _ckpt(capsys, "inspect", run)
    assert code == 0, err
    assert "step_00000004" in out and "newest good checkpoint" in out
    assert "step 4  world size 2" in out and "checksums: verified" in out
    assert "K=28 displacements in 1 bank chunk(s)" in out
    assert re.search(r"model\.encoder\.blocks\.0\.attn\.score_banks\.0\.q\.weight +\[28, 4, 4\] +float32", out)
    assert re.search(r"optim\.state\.head\.weight\.exp_avg_sq +\[10, 16\]", out)  # global, not the rank's [5, 16]

    code, out, err = _ckpt(capsys, "inspect", run / "checkpoints" / "step_00000002", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["step"], report["world_size"], report["chosen_from"]) == (2, 2, None)
    shapes = {t["name"]: t["shape"] for t in report["tensors"]}
    assert shapes["model." + BANK.format(0)] == [K, 4, 4]
    assert shapes["optim.state." + BANK.format(0) + ".exp_avg"] == [K, 4, 4]
    with torch.device("meta"):
        params = count_parameters(build_model(model_config(locate(run))))
    model = report["totals"]["model"]
    assert model["elements"] == params and model["bytes"] == 4 * params
    assert model["banks"]["elements"] == 2 * 3 * K * 4 * 4  # 2 layers x q, k, v banks of [28, 4, 4]
    assert report["totals"]["optim"]["tensors"] == 3 * model["tensors"]  # exp_avg, exp_avg_sq, step


# -- export ----------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_export_is_the_final_model(run, tmp_path, capsys, monkeypatch):
    requested: list[str] = []
    load = checkpoint_export.load_entries
    monkeypatch.setattr(checkpoint_export, "load_entries",
                        lambda located, metadata, keys: requested.extend(keys) or load(located, metadata, keys))
    out = tmp_path / "model.safetensors"
    code, stdout, err = _ckpt(capsys, "export", run, "--out", out)
    assert code == 0, err
    assert "47 tensors" in stdout and "using" in err
    assert requested and all(key.startswith("model.") for key in requested)  # the optimizer is never read
    final = load_file(run / "artifacts" / "model.safetensors")
    exported = load_file(out)
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    with safe_open(out, "pt") as f:
        header = f.metadata()
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert header["step"] == "4" and header["config_sha256"] == config_hash(meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left

    # Batches of one tensor give the same file; bf16 is the rounded weights.
    small = tmp_path / "small.safetensors"
    checkpoint_export.export(locate(run), small, batch_bytes=1)
    assert small.read_bytes() == out.read_bytes()
    code, _, err = _ckpt(capsys, "export", run, "--out", tmp_path / "bf16.safetensors", "--dtype", "bf16")
    assert code == 0, err
    bf16 = load_file(tmp_path / "bf16.safetensors")
    assert all(torch.equal(bf16[k], final[k].bfloat16()) for k in final)


@pytest.mark.multiprocess
def test_export_official_names_round_trip(run, tmp_path, capsys):
    out = tmp_path / "official.safetensors"
    code, _, err = _ckpt(capsys, "export", run, "--out", out, "--official", "vit", "--query-projection", "to_k")
    assert code == 0, err
    official = load_file(out)
    assert "translution.layers.0.0.to_qkv.weight" in official and "mlp_head.weight" in official
    assert official["translution.layers.0.0.to_q2.unique_params"].shape == (K, 4, 4)
    final = load_file(run / "artifacts" / "model.safetensors")
    ours = from_official(official, model_config(locate(run)), query_projection="to_k")
    assert ours.keys() == final.keys()
    assert all(torch.equal(ours[k], final[k]) for k in final)


def test_export_official_gpt_names_in_batches_of_one_tensor(tmp_path, capsys):
    """A GPT with chunked Translution banks, checkpointed untrained: the official names need the
    chunks of each bank together, and the causal masks no checkpoint tensor at all."""
    cfg = ModelConfig(arch="gpt", attention="translution", dim=8, depth=2, heads=2, dim_head=4, mlp_dim=16,
                      context_length=8, vocab_size=11, bank_chunks=3)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()

    def save_state(directory: Path) -> None:
        dcp.save({"model": state}, checkpoint_id=str(directory / "dcp"), no_dist=True)

    manager = CheckpointManager(tmp_path / "gpt" / "checkpoints", keep=1, rank=0, world_size=1)
    manager.save(3, save_state, {}, {"config": {"model": cfg.model_dump(mode="json")}})
    out = tmp_path / "gpt.safetensors"
    code, _, err = _ckpt(capsys, "export", tmp_path / "gpt", "--out", out, "--official", "gpt",
                         "--query-projection", "to_q")
    assert code == 0, err
    official = load_file(out)
    assert official["translution.layers.0.0.causal"].shape == (1, 1, 8, 8)
    ours = from_official(official, cfg, query_projection="to_q")
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)
    one_by_one = tmp_path / "one.safetensors"
    checkpoint_export.export(locate(tmp_path / "gpt"), one_by_one, official="gpt", query_projection="to_q",
                             batch_bytes=1)
    assert one_by_one.read_bytes() == out.read_bytes()


# -- reshard ---------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_reshard_bank_chunks_there_and_back_then_resume(run, tmp_path, capsys):
    three, back = tmp_path / "three", tmp_path / "back"
    code, out, err = _ckpt(capsys, "reshard", run, "--out", three, "--bank-chunks", "3", "parallel.engine=none")
    assert code == 0, err
    assert "bank_chunks 1 -> 3" in out and f"translution train {three / 'config.yaml'}" in out
    step = three / "checkpoints" / "step_00000004"
    assert verify(step) is None
    meta = json.loads((step / "meta.json").read_text())
    assert (meta["step"], meta["world_size"]) == (4, 2)
    # meta.json records the layout the shards were written at; config.yaml the run that resumes them.
    assert meta["config"]["model"]["bank_chunks"] == 3
    assert meta["layout"] == "fsdp:dp_replicate=1,dp_shard=2,tp=1,dispp=1,bank_chunks=3"
    assert meta["config"]["run"]["name"] == "three"
    assert sorted(p.name for p in step.iterdir()) == ["COMPLETE.json", "dcp", "meta.json", "rank_0.pt", "rank_1.pt"]

    code, out, err = _ckpt(capsys, "inspect", three, "--json")
    shapes = {t["name"]: t["shape"] for t in json.loads(out)["tensors"]}
    assert [shapes["model." + BANK.format(c)] for c in range(3)] == [[9, 4, 4], [9, 4, 4], [10, 4, 4]]
    assert shapes["optim.state." + BANK.format(2) + ".exp_avg"] == [10, 4, 4]
    assert "model." + BANK.format(3) not in shapes

    code, _, err = _ckpt(capsys, "reshard", three, "--out", back, "--bank-chunks", "1")
    assert code == 0, err
    _assert_same_state(read_state(locate(run)), read_state(locate(back)))  # bitwise, optimizer included

    # Continue both in one process: the original (copied) and the resharded checkpoint.
    baseline = _config(tmp_path, "baseline", parallel={"engine": "none"}, tracking={"enabled": False})
    shutil.copytree(run / "checkpoints", tmp_path / "runs" / "baseline" / "checkpoints")
    commands = [[str(baseline)], [str(three / "config.yaml"), "train.steps=6", "tracking.enabled=false"]]
    procs = [subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *c], env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    logs = [proc.communicate(timeout=600)[1] for proc in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
        assert re.search(r"resumed from \S+step_00000004 at step 4", log)
    losses = [re.search(r"done: step 6, loss (\S+),", log).group(1) for log in logs]
    assert losses[0] == losses[1]
    resharded = read_state(locate(three))
    regroup_state(resharded, model_config(locate(three)), model_config(locate(run)))
    # Chunks sum the value side in another order: equal up to float rounding.
    _assert_same_state(read_state(locate(tmp_path / "runs" / "baseline")), resharded, rtol=1e-5, atol=1e-6)


def _flat(state: dict) -> dict:
    """``{"model.x": t, "optim.state.x.exp_avg": t, "optim.param_groups.0.params": [...]}``."""
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"optim.state.{p}.{s}": v for p, stats in state["optim"]["state"].items() for s, v in stats.items()})
    flat.update({f"optim.param_groups.{i}.{k}": v for i, g in enumerate(state["optim"]["param_groups"])
                 for k, v in g.items()})
    return flat


def _assert_same_state(expected: dict, got: dict, **tolerance: float) -> None:
    """The same entries; tensors equal (close, given a tolerance), everything else equal."""
    expected, got = _flat(expected), _flat(got)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor) and tolerance:
            torch.testing.assert_close(got[key], value, **tolerance, msg=lambda m, key=key: f"{key}: {m}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


# -- bad input -------------------------------------------------------------------------


def _damaged_copies(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An incomplete and a corrupted copy of the newest checkpoint."""
    incomplete, corrupted = tmp_path / "incomplete" / "step_00000004", tmp_path / "corrupted" / "step_00000004"
    for copy in (incomplete, corrupted):
        shutil.copytree(run / "checkpoints" / "step_00000004", copy)
    (incomplete / "COMPLETE.json").unlink()
    victim = next(corrupted.glob("dcp/*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    return incomplete, corrupted


@pytest.mark.multiprocess
def test_bad_input_exits_2_and_writes_nothing(run, tmp_path, capsys):
    incomplete, corrupted = _damaged_copies(run, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep").write_text("")
    before = _listing(tmp_path)
    missing = tmp_path / "nowhere"
    cases = [
        (["inspect", missing], "no such file or directory"),
        (["export", missing, "--out", out_dir / "m.safetensors"], "no such file or directory"),
        (["reshard", missing, "--out", tmp_path / "new", "--bank-chunks", "3"], "no such file or directory"),
        (["inspect", incomplete], "no completion marker"),
        (["export", incomplete, "--out", out_dir / "m.safetensors"], "no completion marker"),
        (["export", corrupted, "--out", out_dir / "m.safetensors"], "checksum mismatch"),
        (["reshard", corrupted, "--out", tmp_path / "new", "--bank-chunks", "3"], "checksum mismatch"),
        (["inspect", corrupted.parent], "holds no complete, verified checkpoint"),
        (["export", run, "--out", tmp_path / "no" / "dir" / "m.safetensors"], "is not a writable directory"),
        (["export", run, "--out", out_dir], "is a directory"),
        (["export", run, "--out", out_dir / "m.safetensors", "--official", "gpt", "--query-projection", "to_k"],
         "holds a vit model"),
        (["export", run, "--out", out_dir / "m.safetensors", "--official", "vit"], "query_projection is required"),
        (["export", run, "--out", out_dir / "m.safetensors", "--query-projection", "to_k"], "applies to --official"),
        (["reshard", run, "--out", out_dir, "--bank-chunks", "3"], "already exists"),
        (["reshard", run, "--out", tmp_path / "no" / "new", "--bank-chunks", "3"], "is not a writable directory"),
        (["reshard", run, "--out", tmp_path / "new"], "nothing to change"),
        (["reshard", run, "--out", tmp_path / "new", "--bank-chunks", "29"], "bank_chunks (29) exceeds the K=28"),
        (["reshard", run, "--out", tmp_path / "new", "model.dim=32"], "changes only model.bank_chunks"),
        (["reshard", run, "--out", tmp_path / "new", "--bank-chunks", "3", "parallel.dispp=10"], "dispp=10"),
    ]
    for args, message in cases:
        code, _, err = _ckpt(capsys, *args)
        assert code == 2, (args, err)
        assert message in err.partition("translution ckpt: error:")[2], (args, err)
    assert _listing(tmp_path) == before

    code, out, err = _ckpt(capsys, "inspect", corrupted, "--no-verify")  # to look at a damaged checkpoint anyway
    assert code == 0 and "checksums: not checked" in out, err


@pytest.mark.multiprocess
def test_newest_good_checkpoint_is_chosen_and_the_others_named(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    victim = next((copy / "checkpoints" / "step_00000004").glob("dcp/*.distcp"))
    victim.write_bytes(b"garbage" + victim.read_bytes()[7:])
    code, out, err = _ckpt(capsys, "export", copy, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "step_00000002" in err and "skipped step_00000004: checksum mismatch" in err
    assert "of step 2" in out


@pytest.mark.multiprocess
def test_failures_while_writing_leave_nothing(run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", fail)
    code = main(["ckpt", "reshard", str(run), "--out", str(tmp_path / "new"), "--bank-chunks", "2"])
    assert code == 2
    monkeypatch.setattr(checkpoint_export, "load_entries", fail)
    code = main(["ckpt", "export", str(run), "--out", str(tmp_path / "m.safetensors")])
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_safetensors_stream_matches_the_library(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor(3.5, dtype=torch.bfloat16),
               "c": torch.tensor([True, False, True]), "d": torch.arange(5, dtype=torch.int64)}
    path = tmp_path / "s.safetensors"
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_safetensors(path, entries, iter(tensors.items()), {"step": "1"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"step": "1"})
    reference = load_file(tmp_path / "ref.safetensors")
    assert all(torch.equal(reference[k], loaded[k]) for k in tensors)
    with pytest.raises(AssertionError):
        write_safetensors(tmp_path / "x.safetensors", entries, iter(list(tensors.items())[:2]), {})
    assert not (tmp_path / "x.safetensors").exists() and len(list(tmp_path.iterdir())) == 2
