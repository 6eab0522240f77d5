"""Bad configs and bad command lines: each gets a message naming the problem and exit code 2, and leaves
no run directory, no MLflow store and no process behind.

The table runs ``launcher.cli.main`` in this process (``launch`` cannot start torchrun here: its exec is
replaced by a failure); a few rows run again as real commands for the exit status a shell sees.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from launcher import launch_command
from launcher.cli import main
from reliability.harness import launch_cmd, run, train_cmd, write_config
from translution_dist.data import IGNORE_INDEX, DataConfig, build_dataloader
from translution_dist.data.shards import SplitWriter, write_index

GOOD = "{tmp}/good.yaml"  # a valid tiny config, engine none (files written by the `inputs` fixture)
FSDP = "{tmp}/fsdp.yaml"  # the same with engine fsdp, for launch
ALIAS_BOMB = "[&a0 [x, x, x, x, x, x, x, x, x], " + ", ".join(  # "billion laughs": 9^9 values in 9 lines
    f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)) + "]"
GPT_ON_TOKENS = ["model.arch=gpt", "model.context_length=8", "model.vocab_size=64", "data.synthetic.task=text",
                 "data.synthetic.context_length=8", "data.synthetic.vocab_size=64"]  # a model that fits its data

# id: (argv, words the message must hold, environment)
CASES: dict[str, tuple[list[str], list[str], dict[str, str]]] = {
    # the config file itself
    "config file missing": (["train", "{tmp}/nothere.yaml"], ["config: cannot read", "nothere.yaml"], {}),
    "config not YAML": (["train", "{tmp}/broken.yaml"], ["not valid YAML"], {}),
    "config not a mapping": (["train", "{tmp}/list.yaml"], ["must hold a mapping"], {}),
    "unknown top-level key": (["train", "{tmp}/extra.yaml"], ["frobnicate: unknown key"], {}),
    "model section missing": (["train", "{tmp}/nomodel.yaml"], ["model: required"], {}),
    "included section missing": (["train", "{tmp}/include.yaml"], ["section 'model': cannot read", "nothere"], {}),
    # values
    "unknown nested key": (["train", GOOD, "train.stepz=5"], ["train.stepz: unknown key"], {}),
    "wrong type": (["train", GOOD, "train.steps=many"], ["train.steps", "integer", "'many'"], {}),
    "out of range": (["train", GOOD, "train.steps=0"], ["train.steps", "greater than or equal to 1"], {}),
    "bad choice": (["train", GOOD, "train.precision=fp8"], ["train.precision", "'fp8'"], {}),
    "zero learning rate": (["train", GOOD, "optim.lr=0"], ["optim.lr", "greater than 0"], {}),
    "warm-up longer than run": (["train", GOOD, "optim.warmup_steps=50"], ["warmup_steps (50) exceeds train.steps (6)"],
                                {}),
    "keep no checkpoints": (["train", GOOD, "train.keep_checkpoints=0"], ["train.keep_checkpoints"], {}),
    "bad checkpoint-error policy": (["train", GOOD, "train.on_checkpoint_error=retry"],
                                    ["train.on_checkpoint_error", "'retry'"], {}),
    "data path missing for kind": (["train", GOOD, "data.kind=mnist"], ["data.path is required for kind='mnist'"], {}),
    "removed data setting": (["train", GOOD, "data.streams_per_rank=4"],
                             ["data.streams_per_rank is no longer a setting", "delete the line"], {}),
    # overrides
    "override without =": (["train", GOOD, "train.steps"], ["expected KEY=VALUE"], {}),
    "override into a value": (["train", GOOD, "run.name.first=x"], ["'run.name' is not a section"], {}),
    "override not YAML": (["train", GOOD, "train.steps=[1"], ["value is not valid YAML"], {}),
    "override an alias bomb": (["train", GOOD, f"train.steps={ALIAS_BOMB}"],
                               ["override of train.steps", "expands to more than 100,000 values"], {}),
    "override nested 500 deep": (["train", GOOD, "train.steps=" + "[" * 500 + "]" * 500],
                                 ["override of train.steps", "nested more than 32 levels"], {}),
    "config an alias bomb": (["train", "{tmp}/bomb.yaml"], ["bomb.yaml expands to more than 100,000 values"], {}),
    # layouts
    "tp not dividing heads": (["launch", FSDP, "parallel.tp=3", "--nproc-per-node", "3"],
                              ["tp=3 must divide heads=2"], {}),
    "world size not matching": (["launch", FSDP, "parallel.dp_shard=3", "--nproc-per-node", "2"],
                                ["do not match the world size 2"], {}),
    "engine none on 2 ranks": (["launch", GOOD, "--nproc-per-node", "2"], ["engine=none does not reduce gradients"],
                               {}),
    "train rank with a mismatched world": (["train", FSDP, "parallel.dp_shard=4"], ["do not match the world size 2"],
                                           {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}),
    "fsdp without torchrun": (["train", FSDP], ["needs the process group that torchrun sets up", "translution launch"],
                              {}),
    "model that cannot fit": (["plan", GOOD, "--gpus-per-node", "1", "--gpu-mem", "1KiB"], ["no layout fits"], {}),
    # data and directories
    "data directory missing": (["train", GOOD, "data.kind=image_folder", "data.path={tmp}/nodata"],
                               ["data: no index.json in", "nodata"], {}),
    "output dir under a file": (["train", GOOD, "run.output_dir={tmp}/good.yaml/runs"],
                                ["run.output_dir: cannot write the run directory", "Not a directory"], {}),
    "output dir read-only": (["train", GOOD, "run.output_dir={ro}/runs"],
                             ["run.output_dir: cannot write the run directory", "Read-only file system"], {}),
    "model vocabulary smaller than the data's": (["train", GOOD, *GPT_ON_TOKENS, "model.vocab_size=32"],
                                                 ["model.vocab_size=32 but the data's vocabulary is 64",
                                                  "set model.vocab_size=64"], {}),
    "model context shorter than the data's": (["train", GOOD, *GPT_ON_TOKENS, "model.context_length=4"],
                                              ["model.context_length=4 but the data's context length is 8"], {}),
    "model with fewer classes than the data": (["launch", FSDP, "model.num_classes=5", "--nproc-per-node", "2"],
                                               ["model.num_classes=5 but the data's number of classes is 10"], {}),
    "language model on images": (["train", GOOD, "model.arch=gpt"], ["model.arch=gpt needs token data"], {}),
    "fault hook misspelt": (["train", GOOD], ["TRANSLUTION_FAULT: cannot parse 'kil@step:3'"],
                            {"TRANSLUTION_FAULT": "kil@step:3"}),
    # what `train` refuses, `launch` refuses before torchrun starts (before: each rank's error in torchrun's traceback)
    "launch output dir read-only": (["launch", FSDP, "run.output_dir={ro}/runs", "--nproc-per-node", "2"],
                                    ["run.output_dir: cannot write the run directory", "Read-only file system"], {}),
    "launch output dir under a file": (["launch", FSDP, "run.output_dir={tmp}/fsdp.yaml/runs", "--nproc-per-node", "2"],
                                       ["run.output_dir: cannot write the run directory", "Not a directory"], {}),
    "launch fault hook misspelt": (["launch", FSDP, "--nproc-per-node", "2"], ["TRANSLUTION_FAULT: cannot parse"],
                                   {"TRANSLUTION_FAULT": "kil@step:3"}),
    # command lines
    "no command": ([], ["required: COMMAND"], {}),
    "unknown command": (["frobnicate"], ["invalid choice: 'frobnicate'"], {}),
    "train without config": (["train"], ["required: config"], {}),
    "launch zero processes": (["launch", FSDP, "--nproc-per-node", "0"], ["--nproc-per-node", ">= 1, got '0'"], {}),
    "launch negative restarts": (["launch", FSDP, "--max-restarts", "-1"], ["--max-restarts", ">= 0, got '-1'"], {}),
    "launch unknown option": (["launch", FSDP, "--gpus", "2"], ["unrecognized arguments: --gpus"], {}),
    "launch nodes without master": (["launch", FSDP, "--nnodes", "2"], ["set MASTER_ADDR"], {}),
    "launch multi-node config locally": (["launch", FSDP, "cluster.nodes=4"], ["cluster.nodes=4", "--nnodes 1"], {}),
    "deepspeed with restarts": (["launch", FSDP, "parallel.engine=deepspeed", "--max-restarts", "2"], ["deepspeed"],
                                {}),
    "data build from a missing folder": (["data", "text", "{tmp}/nodocs", "{tmp}/out", "--context-length", "8"],
                                         ["nodocs is not a directory"], {}),
    "data build with nothing to test on": (["data", "text", "{tmp}/onedoc", "{tmp}/out", "--context-length", "8"],
                                           ["argument --test-fraction: a corpus of one document"], {}),
    "data build bad size": (["data", "mnist", "{tmp}/out", "--canvas-size", "0"],
                            ["--canvas-size", "must be a positive integer"], {}),
    "data inspect a missing set": (["data", "inspect", "{tmp}/nodata"], ["no index.json"], {}),
    "k8s render without --out": (["k8s", "render", FSDP], ["required: --out"], {}),
    "k8s render unknown flavor": (["k8s", "render", FSDP, "--out", "{tmp}/k8s", "--flavor", "helm"],
                                  ["invalid choice: 'helm'"], {}),
    "ckpt inspect a missing checkpoint": (["ckpt", "inspect", "{tmp}/nockpt"], ["no such file or directory"], {}),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The config files of the table, and a read-only file system (None where it cannot be mounted)."""
    tmp = tmp_path_factory.mktemp("inputs")
    good = yaml.safe_load(write_config(tmp, "good").read_text())
    write_config(tmp, "fsdp", parallel={"engine": "fsdp", "dp_shard": -1})
    (tmp / "broken.yaml").write_text("model: [unclosed\n")
    (tmp / "list.yaml").write_text("- model\n- data\n")
    (tmp / "extra.yaml").write_text(yaml.safe_dump({**good, "frobnicate": 1}))
    (tmp / "nomodel.yaml").write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "model"}))
    (tmp / "include.yaml").write_text(yaml.safe_dump({**good, "model": "models/nothere.yaml"}))
    (tmp / "onedoc").mkdir()
    (tmp / "onedoc" / "only.txt").write_text("one document, so nothing to evaluate on " * 20)
    (tmp / "bomb.yaml").write_text(yaml.safe_dump(good) + f"run_notes: {ALIAS_BOMB}\n")
    ro = tmp / "readonly"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True,
                             check=False)
    yield {"tmp": tmp, "ro": ro if mounted.returncode == 0 else None}
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as err:  # argparse
        return err.code


def _refuse_exec(plan) -> None:
    raise AssertionError(f"launch would have started processes: {plan.shell()}")


def _leftovers(tmp: Path) -> list[str]:
    return [str(p) for p in (tmp / "runs", tmp / "mlflow.db", tmp / "out", tmp / "k8s") if p.exists()]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_naming_the_problem(case, inputs, capsys, monkeypatch):
    argv, words, environment = CASES[case]
    if "{ro}" in " ".join(argv) and inputs["ro"] is None:
        pytest.skip("cannot mount a read-only tmpfs here (needs root); as root every directory is writable")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TRANSLUTION_FAULT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launch_command, "execute", _refuse_exec)
    argv = [a.format(**inputs) for a in argv]
    before = {child.pid for child in psutil.Process().children(recursive=True)}  # e.g. multiprocessing's helpers

    code = _exit_code(argv)

    captured = capsys.readouterr()
    err = captured.err + captured.out  # `plan` reports on stdout
    assert code == 2, err
    assert all(word in err for word in words), err
    assert "Traceback" not in err
    assert not _leftovers(inputs["tmp"])
    assert not inputs["ro"] or not any(inputs["ro"].iterdir())
    assert not {child.pid for child in psutil.Process().children(recursive=True)} - before


def test_launch_refuses_missing_data_before_starting_processes(inputs, capsys, monkeypatch):
    monkeypatch.setattr(launch_command, "execute", _refuse_exec)
    argv = ["launch", FSDP.format(**inputs), "data.kind=image_folder", f"data.path={inputs['tmp']}/nodata",
            "--nproc-per-node", "2"]
    assert _exit_code(argv) == 2
    assert "data: no index.json" in capsys.readouterr().err


def test_a_model_larger_than_its_data_is_accepted_with_a_note(inputs):
    from training.config import load_config
    from training.run import check_data

    good = load_config(GOOD.format(**inputs), GPT_ON_TOKENS)
    assert check_data(good) == []
    notes = check_data(load_config(GOOD.format(**inputs), [*GPT_ON_TOKENS, "model.vocab_size=100"]))
    assert notes == ["model.vocab_size=100 exceeds the data's vocabulary of 64: 36 outputs are never a target (it "
                     "trains; set model.vocab_size=64 unless padded on purpose)"]


def test_launch_refuses_a_run_directory_in_use(tmp_path, capsys, monkeypatch):
    from training.run_lock import RunDirectoryLock

    monkeypatch.setattr(launch_command, "execute", _refuse_exec)
    monkeypatch.delenv("TRANSLUTION_FAULT", raising=False)
    config = write_config(tmp_path, "busy", parallel={"engine": "fsdp", "dp_shard": -1})
    (tmp_path / "runs" / "busy").mkdir(parents=True)
    lock = RunDirectoryLock(tmp_path / "runs" / "busy")
    lock.acquire()  # a live run's rank 0
    try:
        assert _exit_code(["launch", str(config), "--nproc-per-node", "2"]) == 2
        assert "run.name: " in (err := capsys.readouterr().err) and "is in use by another run" in err
    finally:
        lock.release()


@pytest.mark.multiprocess
def test_real_commands_exit_2(inputs):
    """What a shell sees: the exit status of the process, its message, and nothing left running."""
    tmp = inputs["tmp"]
    rows = [
        (train_cmd(tmp / "extra.yaml"), "frobnicate: unknown key"),
        (train_cmd(tmp / "good.yaml", "data.kind=image_folder", f"data.path={tmp}/nodata"), "data: no index.json"),
        (launch_cmd(tmp / "fsdp.yaml", "parallel.dp_shard=3", nproc=2), "do not match the world size 2"),
        (train_cmd(tmp / "good.yaml", f"train.steps={ALIAS_BOMB}"), "expands to more than 100,000 values"),
    ]
    if inputs["ro"] is not None:  # before: torchrun started, each rank failed, a 40-line traceback and exit 1
        rows.append((launch_cmd(tmp / "fsdp.yaml", f"run.output_dir={inputs['ro']}/runs", nproc=2),
                     "run.output_dir: cannot write the run directory"))
    for cmd, words in rows:
        result = run(cmd, expect=2, timeout=120)  # the alias bomb ran for ever (printing its repr) and grew to GBs
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not _leftovers(tmp)


@pytest.mark.parametrize("order", ["section first", "dotted first"])
def test_a_dotted_override_survives_a_section_override_in_either_order(inputs, monkeypatch, order):
    """``model=FILE`` applies before ``model.key=value`` wherever it stands, so the value is never dropped."""
    from training.config import load_config

    tmp = inputs["tmp"]
    model = yaml.safe_load((tmp / "good.yaml").read_text())["model"]
    (tmp / "other_model.yaml").write_text(yaml.safe_dump({**model, "depth": 1, "mlp_dim": 24}))
    monkeypatch.chdir(tmp)  # a section file on the command line resolves against the working directory
    section, dotted = "model=other_model.yaml", "model.mlp_dim=40"
    overrides = [section, dotted] if order == "section first" else [dotted, section]
    cfg = load_config(tmp / "good.yaml", overrides)
    assert (cfg.model.depth, cfg.model.mlp_dim) == (1, 40)


# -- hostile samples: each is skipped, counted and named; the rest of the split is read ------------------------


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of ``side``×``side`` zero pixels: a few KB that inflate to ``side² / 8`` bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed pixels
    data = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _image_set(directory: Path, bad: dict) -> Path:
    """An 8-sample ``mnist``-kind set of 8x8 images, labels 0..9; sample 3 gets the fields in ``bad``."""
    directory.mkdir()
    writer = SplitWriter(directory, "train", 4)
    for k in range(8):
        sample = {"__key__": f"train-{k:06d}", "image.png": _png(Image.new("L", (8, 8), k)), "cls": k}
        writer.write({**sample, **bad} if k == 3 else sample)
    write_index(directory, kind="mnist", builder="test", params={}, splits={"train": writer.close()},
                sample_keys=["image.png", "cls"],
                extra={"image": {"key": "image.png", "mode": "L", "size": 8, "mean": [0.5], "std": [0.5]},
                       "num_classes": 10})
    return directory


def _text_set(directory: Path, bad: dict) -> Path:
    """An 8-sample ``text`` set with a vocabulary of 50 (windows of 3 tokens); sample 3 gets ``bad``."""
    directory.mkdir()
    writer = SplitWriter(directory, "train", 4)
    for k in range(8):
        sample = {"__key__": f"train-{k:06d}", "tokens.npy": np.full(3, k, np.uint16)}
        writer.write({**sample, **bad} if k == 3 else sample)
    write_index(directory, kind="text", builder="test", params={}, splits={"train": writer.close()},
                sample_keys=["tokens.npy"], extra={"text": {"context_length": 2, "window": 3, "vocab_size": 50}})
    return directory


# id: (kind, set builder, what sample 3 holds, words of the warning)
HOSTILE_SAMPLES = {
    "PNG decompression bomb": ("mnist", _image_set, {"image.png": _png_bomb(20_000)}, ["DecompressionBombError"]),
    "PNG bomb under PIL's limit": ("mnist", _image_set, {"image.png": _png_bomb(9_000)},  # refused from its header
                                   ["image is 9000x9000, expected 8x8"]),
    "label past the classes": ("mnist", _image_set, {"cls": 10}, ["label 10 is outside", "10 classes"]),
    "negative label": ("mnist", _image_set, {"cls": -1}, ["label -1 is outside"]),
    "token id past the vocabulary": ("text", _text_set, {"tokens.npy": np.array([1, 50, 2], np.uint16)},
                                     ["token ids 1..50 are outside", "vocabulary (0..49"]),
}


@pytest.mark.parametrize("case", HOSTILE_SAMPLES)
def test_hostile_sample_is_skipped_counted_and_named(case, tmp_path, caplog):
    kind, build, bad, words = HOSTILE_SAMPLES[case]
    path = build(tmp_path / "set", bad)
    loader, state = build_dataloader(DataConfig(kind=kind, path=path), split="train", dp_rank=0, dp_size=1,
                                     batch_size=4, seed=0, train=False)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)  # the split once; the last batch is padded with repeats (IGNORE_INDEX targets)
    kept = [int(x.flatten()[0]) if kind == "text" else int(y) for inputs, targets in batches
            for x, y in zip(inputs, targets) if y.flatten()[0] != IGNORE_INDEX]
    assert kept == [0, 1, 2, 4, 5, 6, 7]
    assert state.skipped_samples >= 1 and state.metrics()["data/skipped_samples"] == state.skipped_samples
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all(m.startswith("skipping sample train-000003: ") for m in warnings), warnings
    assert all(word in warnings[0] for word in words), warnings[0]


def test_an_index_that_over_claims_samples_fails_inspection(tmp_path, capsys):
    """Checksums match, but index.json says a shard holds more samples than it does (hand-edited, or another tool)."""
    path = _text_set(tmp_path / "set", {})
    index = json.loads((path / "index.json").read_text())
    index["splits"]["train"]["shards"][1]["samples"] = 6
    index["splits"]["train"]["samples"] = 10
    (path / "index.json").write_text(json.dumps(index))
    assert _exit_code(["data", "inspect", str(path)]) == 1
    report = capsys.readouterr().out
    assert "BAD train-000001.tar: holds 4 samples, index.json says 6" in report and "1 problem(s)" in report
    index["splits"]["train"]["samples"] = 12  # the split's total disagrees with its shards too
    (path / "index.json").write_text(json.dumps(index))
    assert _exit_code(["data", "inspect", str(path)]) == 1
    assert "BAD split train: index.json says 12 samples, its shards list 10" in capsys.readouterr().out
