"""Tensor files of a heads checkpoint: read lazily by name, written without shared storage.

safetensors are opened by header, so a full-model checkpoint (axolotl) costs only the head tensors'
bytes. ``.pt`` files are loaded with ``torch.load(weights_only=True)`` (memory-mapped unless the file uses
torch's legacy non-zip serialization) and nothing else: pickled objects other than tensors in a plain dict
are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from medusa_forge.errors import ForgeError

_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class TensorStore:
    """name -> tensor over one or more files, with shapes and dtypes known before any data is read."""

    def __init__(self) -> None:
        self._meta: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self._getters: dict[str, Callable[[], Tensor]] = {}

    def _add(self, name: str, path: Path, shape: tuple[int, ...], dtype: str, get: Callable[[], Tensor]) -> None:
        if name in self._meta:
            raise ForgeError(f"tensor {name} is stored twice: in {self._meta[name][0]} and {path} (ambiguous)")
        self._meta[name] = (path, shape, dtype)
        self._getters[name] = get

    @classmethod
    def from_safetensors(cls, files: Iterable[Path], keep: Callable[[str], str | None] = lambda n: n) -> TensorStore:
        """Index the safetensors ``files``; ``keep`` maps a stored name to the store's name, or None to skip it."""
        store = cls()
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for stored in sf.keys():
                        name = keep(stored)
                        if name is None:
                            continue
                        sl = sf.get_slice(stored)
                        dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                        store._add(name, f, tuple(sl.get_shape()), dtype, _safetensors_getter(f, stored))
            except (SafetensorError, OSError, ValueError) as e:
                raise ForgeError(f"{f}: not a readable safetensors file ({e})") from None
        return store

    @classmethod
    def from_pt(cls, path: Path, keep: Callable[[str], str | None] = lambda n: n) -> TensorStore:
        try:
            obj = _load_pt(path)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ForgeError(
                f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            raise ForgeError(f"{path}: expected a flat dict of tensors")
        store = cls()
        for stored, t in obj.items():
            name = keep(stored)
            if name is not None:
                store._add(name, path, tuple(t.shape), str(t.dtype).removeprefix("torch."), lambda t=t: t)
        return store

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> str:
        return self._meta[name][2]

    def path(self, name: str) -> Path:
        return self._meta[name][0]

    def get(self, name: str) -> Tensor:
        try:
            return self._getters[name]()
        except SafetensorError as e:
            raise ForgeError(f"{self.path(name)}: tensor {name} is corrupt or truncated ({e})") from None


def _load_pt(path: Path) -> object:
    """mmap where the file allows it; files written with torch's legacy (pre-1.6, non-zip) serialization cannot
    be mapped and are read whole."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "_use_new_zipfile_serialization" not in str(e):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _safetensors_getter(path: Path, name: str) -> Callable[[], Tensor]:
    def get() -> Tensor:
        with safe_open(str(path), framework="pt") as sf:
            return sf.get_tensor(name)

    return get


def _owned(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies, one storage each, so no writer sees shared or strided memory."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(_owned(tensors), str(path), metadata={"format": "pt"})


def write_pt(tensors: dict[str, Tensor], path: Path) -> None:
    """A plain ``{name: tensor}`` dict, loadable by ``torch.load`` with or without ``weights_only``."""
    torch.save(_owned(tensors), str(path))


def _first_line(e: BaseException) -> str:
    """torch's unpickling errors run to several paragraphs; the first line names the problem."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    disallowed = [ln for ln in lines if "unsupported global" in ln.lower()]
    return (disallowed or lines or [type(e).__name__])[0]
