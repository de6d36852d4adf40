"""The convert path under the interpreter a TensorRT-LLM image gives medusa-forge, against this environment's.

The Dockerfile installs medusa-forge with --no-deps, so inside the image it runs on that image's torch,
transformers, safetensors and numpy. ``tools/image_deps.sh 1.2|0.11`` builds a venv with the nearest released
versions; MEDUSA_FORGE_IMAGE_PYTHON=<venv>/bin/python points these tests at it. Unset, they skip (CI stays offline).
This checkout's code runs under that interpreter (PYTHONPATH), and must write the checkpoint this environment
writes: the same config.json bytes, the same tensor names, dtypes and bits in every rank file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from medusa_forge.convert.trtllm_profiles import PROFILES

IMAGE_PYTHON = os.environ.get("MEDUSA_FORGE_IMAGE_PYTHON")
pytestmark = [
    pytest.mark.skipif(not IMAGE_PYTHON, reason="MEDUSA_FORGE_IMAGE_PYTHON unset (tools/image_deps.sh builds one)"),
    pytest.mark.usefixtures("one_thread"),
]

VERSIONS = "import sys, torch, transformers, safetensors, numpy; print(sys.version.split()[0], torch.__version__, \
transformers.__version__, safetensors.__version__, numpy.__version__)"


def image_run(args: list, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([IMAGE_PYTHON, *map(str, args)], capture_output=True, text=True, env=env, timeout=900, **kw)


def test_the_interpreter_has_an_image_torch_and_not_this_one():
    done = image_run(["-c", VERSIONS])
    assert done.returncode == 0, done.stderr
    python, image_torch = done.stdout.split()[:2]
    print("image interpreter:", done.stdout.strip())
    image_minors = {".".join(p.image_torch.split(".")[:2]) for p in PROFILES.values()}
    assert ".".join(image_torch.split(".")[:2]) in image_minors, (image_torch, image_minors)
    assert (python, image_torch) != (sys.version.split()[0], torch.__version__)


CASES = {
    "fp16 tp1 for 1.2": (["--dtype", "float16", "--trtllm-version", "1.2"], 1),
    "bf16 tp2 for 1.2": (["--dtype", "bfloat16", "--tp-size", "2", "--trtllm-version", "1.2"], 2),
    "fp16 tp1 for 0.11": (["--dtype", "float16", "--trtllm-version", "0.11"], 1),
    "fp8 for 1.2": (
        [
            "--dtype",
            "float16",
            "--quantization",
            "fp8",
            "--calib-size",
            "4",
            "--device",
            "cpu",
            "--trtllm-version",
            "1.2",
        ],
        1,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_image_interpreter_writes_the_checkpoint_this_environment_writes(
    case, model_dir, heads_dir, tmp_path, capsys
):
    extra, ranks = CASES[case]
    args = ["convert", "trtllm", "--model", model_dir, "--medusa", heads_dir, *extra]
    code, _, err = run_cli([*args, "--out", tmp_path / "here"], capsys)
    assert code == 0, err
    done = image_run(["-m", "medusa_forge.cli", *args, "--out", tmp_path / "image"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    here, image = tmp_path / "here", tmp_path / "image"
    assert sorted(p.name for p in image.iterdir()) == sorted(p.name for p in here.iterdir())
    assert (image / "config.json").read_bytes() == (here / "config.json").read_bytes()
    assert json.loads((here / "config.json").read_text())["mapping"]["tp_size"] == ranks
    for r in range(ranks):
        ours, theirs = load_file(here / f"rank{r}.safetensors"), load_file(image / f"rank{r}.safetensors")
        assert sorted(theirs) == sorted(ours)
        differ = [k for k in ours if theirs[k].dtype != ours[k].dtype or not _same_bits(theirs[k], ours[k])]
        assert not differ, f"rank {r}: {len(differ)} of {len(ours)} tensors differ, e.g. {differ[:5]}"


def test_the_image_interpreter_tokenizes_the_held_out_prompts_as_this_environment(
    model_dir, held_out_prompts, tmp_path
):
    from medusa_forge.model.tokenizer import Tokenizer

    prompts = [row["prompt"] for row in held_out_prompts[:20]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = (
        "import json, sys; from medusa_forge.model.tokenizer import Tokenizer; t = Tokenizer(sys.argv[1]); "
        "print(json.dumps([t.encode(p) for p in json.load(open(sys.argv[2]))]))"
    )
    done = image_run(["-c", script, model_dir, tmp_path / "prompts.json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    here = Tokenizer(model_dir)
    assert json.loads(done.stdout) == [here.encode(p) for p in prompts]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() in (1, 2, 4, 8):
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)
