#!/usr/bin/env bash
# Run the convert path with the dependency versions a TensorRT-LLM Triton image gives medusa-forge.
#
#   tools/image_deps.sh 1.2|0.11 [pytest args...]        (make image-deps-check TRTLLM=1.2|0.11)
#
# The image installs medusa-forge with --no-deps, so it runs on the image's torch, transformers, safetensors and
# numpy, which CI never sees. This builds a venv outside the repository from tools/image_deps/trtllm-<profile>.txt
# (the nearest released versions; docs/convert.md says what still differs from the image), installs the package
# as the Dockerfile does, and runs the convert tests there, single-threaded and niced. Then
# MEDUSA_FORGE_IMAGE_PYTHON=<venv>/bin/python makes tests/test_image_deps.py compare that interpreter's checkpoint
# with the main environment's.
#
# Env: IMAGE_DEPS_VENVS (default ~/.cache/medusa-forge/image-deps), PYTHON (default python3.12 for 1.2,
# python3.10 for 0.11: the images' Python minor versions). Needs PyPI; torch alone is several GB.
set -euo pipefail

profile=${1:?usage: tools/image_deps.sh 1.2|0.11 [pytest args...]}
shift
case "$profile" in
    1.2) python=${PYTHON:-python3.12} ;;
    0.11) python=${PYTHON:-python3.10} ;;
    *) echo "error: profile '$profile': choose 1.2 or 0.11" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
requirements="$repo/tools/image_deps/trtllm-$profile.txt"
venv="${IMAGE_DEPS_VENVS:-$HOME/.cache/medusa-forge/image-deps}/trtllm-$profile"
case "$venv/" in "$repo"/*) echo "error: $venv is inside the repository; set IMAGE_DEPS_VENVS" >&2; exit 2 ;; esac

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -r "$requirements"
# As the Dockerfile does: copy what it copies, then install the package without its declared dependencies
# (building from the copy keeps build/ out of the working tree).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/Makefile" "$repo/medusa_forge" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$src"
"$venv/bin/medusa-forge" --version
# From / so that the installed package answers, not the checkout.
(cd / && "$venv/bin/python" -c '
import sys, importlib.metadata as m
import medusa_forge
print("python", sys.version.split()[0], "| medusa_forge from", medusa_forge.__file__)
print(" | ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "safetensors", "numpy", "tokenizers")))
')

# The convert path, then what else runs inside the image: the trtllm-build command and the Triton repository.
tests=(tests/test_convert_trtllm.py tests/test_convert_trtllm_families.py tests/test_fp8_qwen2.py tests/test_convert_fp8.py
    tests/test_build_trtllm.py tests/test_serve_trtllm_repo.py tests/test_serve_trtllm_repo_v12.py)
cd "$repo"
# The venv's pytest script, not `python -m pytest`: the working directory stays off sys.path, so the tests
# import the installed package, as the image would.
export OMP_NUM_THREADS=1
nice -n 19 "$venv/bin/pytest" -q -p no:cacheprovider "${tests[@]}" "$@"
echo "next, this checkout's convert under the venv against the main environment's:"
echo "  MEDUSA_FORGE_IMAGE_PYTHON=$venv/bin/python python -m pytest -q tests/test_image_deps.py"

