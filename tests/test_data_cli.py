"""``translution data``: bad input exits 2 naming the option and leaves no output; inspect verifies."""

from __future__ import annotations

import argparse

import pytest

from translution_dist.data import cli


def run(argv: list[str]) -> int:
    return cli.main(["data", *argv])


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["mnist", "{out}", "--train-samples", "-3"], "argument --train-samples: must be a positive integer"),
        (["mnist", "{out}", "--source", "{tmp}/nowhere"], "argument --source: "),
        (["mnist", "{out}", "--source", "{tmp}"], "argument --source: "),  # no IDX files there
        (["mnist", "{out}", "--mode", "sideways"], "argument --mode: invalid choice"),
        (["text", "{tmp}", "{out}", "--context-length", "8"], "argument INPUT: no .txt files"),
        (["text", "{tmp}", "{out}", "--context-length", "0"], "argument --context-length: "),
        (["image-folder", "{out}", "--split", "train"], "argument --split: expected NAME=DIR"),
        (["image-folder", "{out}", "--split", "train={tmp}"], "argument --split: "),  # no class folders
    ],
)
def test_bad_arguments_exit_2_and_leave_no_output(argv, option, tmp_path, capsys):
    out = tmp_path / "parent" / "out"
    argv = [a.format(out=out, tmp=tmp_path) for a in argv]
    assert option in fails(argv, capsys)
    assert not (tmp_path / "parent").exists()


def test_build_inspect_and_existing_output(tmp_path, capsys):
    out = tmp_path / "mnist"
    assert run(["mnist", str(out), "--mode", "static", "--train-samples", "20", "--test-samples", "10"]) == 0
    assert "train 20 samples/1 shards" in capsys.readouterr().out
    assert "argument OUT: " in fails(["mnist", str(out)], capsys)
    assert run(["mnist", str(out), "--train-samples", "30", "--test-samples", "10", "--force"]) == 0
    capsys.readouterr()
    assert run(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "split train: 30 samples in 1 shards" in report and "shards (checksum, sample count): 2/2 OK" in report
    shard = out / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert run(["inspect", str(out)]) == 1
    assert "BAD train-000000.tar" in capsys.readouterr().out
    assert "argument DIR: no index.json" in fails(["inspect", str(tmp_path)], capsys)


def test_register_adds_the_data_command():
    parser = argparse.ArgumentParser(prog="translution")
    subparsers = parser.add_subparsers(dest="command")
    cli.register(subparsers)
    args = parser.parse_args(["data", "inspect", "somewhere", "--no-verify"])
    assert callable(args.func) and args.no_verify
