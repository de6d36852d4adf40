"""Find a ``tritonserver`` to run and what it needs (backends, libraries, import path).

Two installs are supported, tried in this order:

1. ``$MEDUSA_FORGE_TRITONSERVER`` or ``tritonserver`` on PATH: the NGC container
   (``nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3`` has ``/opt/tritonserver/bin`` on PATH and its
   backends, tensorrtllm and python included, in the default ``/opt/tritonserver/backends``).
2. The ``nvidia-pytriton`` wheel, which bundles a CPU-capable tritonserver (2.5x) with the Python
   backend and one stub per CPython version. As pytriton itself does (``pytriton/triton.py``,
   ``_prepare_triton_inference_server``), we assemble a backend directory whose ``python/`` holds the
   backend library plus the stub of the running interpreter, and put the wheel's
   ``nvidia_pytriton.libs`` on LD_LIBRARY_PATH. Two additions make the stub run *this* interpreter's
   environment (torch, medusa_forge): the interpreter's own ``libpython`` directory goes first on
   LD_LIBRARY_PATH (otherwise the stub binds the system libpython and its bare site-packages), and
   PYTHONPATH carries this process's ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.errors import ForgeError


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and what it needs to run."""

    binary: Path
    backend_dir: Path | None  # None: the binary's built-in default (/opt/tritonserver/backends)
    env: dict[str, str] = field(default_factory=dict)  # variables to set (prepended to any existing value)
    source: str = "PATH"  # PATH | env | pytriton

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env.items():
            env[key] = f"{value}{os.pathsep}{env[key]}" if env.get(key) else value
        return env


def find_tritonserver() -> TritonInstall:
    """The tritonserver to run: $MEDUSA_FORGE_TRITONSERVER, PATH, then the nvidia-pytriton wheel."""
    package_root = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # model.py imports medusa_forge
    explicit = os.environ.get("MEDUSA_FORGE_TRITONSERVER")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ForgeError(f"MEDUSA_FORGE_TRITONSERVER={explicit} is not an executable file")
        backends = path.resolve().parent.parent / "backends"
        return TritonInstall(path, backends if backends.is_dir() else None, package_root, source="env")
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, package_root, source="PATH")
    return _pytriton_install()


def _pytriton_install() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ForgeError(
            "no tritonserver found: not on PATH and nvidia-pytriton is not installed "
            "(pip install nvidia-pytriton, or run inside nvcr.io/nvidia/tritonserver:24.07-trtllm-python-py3)"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    for need in (binary, stub, root / "backends" / "python" / "libtriton_python.so"):
        if not need.is_file():
            raise ForgeError(f"nvidia-pytriton install is incomplete: {need} is missing (Python {version} supported?)")
    check_wheel_numpy(importlib.metadata.version("numpy"))
    backend_dir = _pytriton_backend_dir(root, stub, version)
    lib_path = [str(libs)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and sysconfig.get_config_var("LIBDIR"):
        lib_path.insert(0, sysconfig.get_config_var("LIBDIR"))
    env = {"LD_LIBRARY_PATH": os.pathsep.join(lib_path), "PYTHONPATH": os.pathsep.join(_python_path())}
    return TritonInstall(binary, backend_dir, env, source="pytriton")


def check_wheel_numpy(numpy_version: str) -> None:
    """The wheel's stubs are built against numpy 1.x (it pins numpy<2): under numpy 2 they misread
    every BYTES input, so refuse before the first request fails in the stub."""
    if int(numpy_version.split(".")[0]) >= 2:
        raise ForgeError(
            f"the nvidia-pytriton wheel's Python backend needs numpy<2 (found {numpy_version}): "
            "pip install 'numpy<2', or run inside an NGC tritonserver container"
        )


def _python_path() -> list[str]:
    """This interpreter's import path, with the directory holding medusa_forge first."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root] + [p for p in sys.path if p and Path(p).is_dir() and p != package_root]
    return list(dict.fromkeys(paths))


def cache_dir() -> Path:
    base = (
        os.environ.get("MEDUSA_FORGE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medusa_forge"
    )
    return Path(base)


def _pytriton_backend_dir(root: Path, stub: Path, version: str) -> Path:
    """``<cache>/triton_backends/pytriton-<ver>-py<X.Y>/python/`` = backend files + our stub (built once)."""
    try:
        wheel = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        wheel = "unknown"
    out = cache_dir() / "triton_backends" / f"pytriton-{wheel}-py{version}"
    if (out / "python" / "triton_python_backend_stub").is_file():
        return out
    try:
        with atomic_output_dir(out, overwrite=True) as tmp:
            shutil.copytree(root / "backends" / "python", tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
    except OSError:
        if not (out / "python" / "triton_python_backend_stub").is_file():  # not a lost race with a peer
            raise
    return out
