"""``convert inspect``: summarise a TensorRT-LLM Medusa checkpoint and validate it against the schema.

Validation is what ``trtllm-build`` would trip over, found before a GPU is involved: a missing rank file
or tensor (a hard error upstream: ``PretrainedModel.load`` raises "Required but not provided tensors"), an
unexpected one (upstream only warns, which hides a wrong name), a wrong shape or dtype, and — reading the
small tensors — FP8 scales that are not finite and positive or differ between ranks, and replicated tensors
(norms, embedding, duplicated KV heads) whose copies disagree between ranks. Expected names, shapes and
dtypes come from ``trtllm_names.expected_tensors``, the same table the writer and reader use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from medusa_forge.convert.trtllm_config import CheckpointConfig, read_config
from medusa_forge.convert.trtllm_names import (
    FP8_DTYPE,
    QKV,
    SCALE_DTYPE,
    Entry,
    cat,
    entries,
    expected_tensors,
    rank_qkv_parts,
    replica_groups,
)

# safetensors header dtype strings
ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", FP8_DTYPE: "F8_E4M3"}
RANK_FILE = re.compile(r"rank(\d+)\.safetensors")


@dataclass
class Inspection:
    config: CheckpointConfig
    files: dict[str, int]  # file -> bytes
    tensors_per_rank: int
    params: dict[str, int]  # base / heads -> unsplit parameter count
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def profile(self) -> str:
        return self.config.profile.version

    def summary_lines(self) -> list[str]:
        s, d = self.config.spec, self.config.raw
        quant = s.quant_algo or "none"
        if s.kv_cache_quant_algo:
            quant += f", KV cache {s.kv_cache_quant_algo}"
        total = sum(self.params.values())
        return [
            f"checkpoint    {self.config.directory}",
            f"architecture  {d['architecture']}  (TensorRT-LLM {self.profile} {d.get('dtype')} checkpoint, "
            f"{d.get('model_type', 'llama')}, quantization: {quant})",
            f"model         {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads / {s.num_kv_heads} KV "
            f"heads (head_size {s.head_size}), intermediate {s.intermediate_size}, vocab {s.vocab_size}",
            f"medusa        {s.num_medusa_heads} heads x {s.num_medusa_layers} layer(s), max_draft_len "
            f"{self.config.max_draft_len}",
            f"parallel      tp {s.tp_size}, {self.tensors_per_rank} tensors per rank",
            f"params        {total / 1e6:.2f} M (base {self.params['base'] / 1e6:.2f} M, "
            f"heads {self.params['heads'] / 1e6:.2f} M)",
            *[f"file          {name}  {size / 2**20:.1f} MiB" for name, size in self.files.items()],
        ]

    def to_dict(self) -> dict:
        s = self.config.spec
        return {
            "directory": str(self.config.directory),
            "architecture": self.config.raw["architecture"],
            "dtype": s.dtype,
            "quant_algo": s.quant_algo,
            "kv_cache_quant_algo": s.kv_cache_quant_algo,
            "num_medusa_heads": s.num_medusa_heads,
            "num_medusa_layers": s.num_medusa_layers,
            "max_draft_len": self.config.max_draft_len,
            "tp_size": s.tp_size,
            "tensors_per_rank": self.tensors_per_rank,
            "params": self.params,
            "files": self.files,
            "ok": self.ok,
            "problems": self.problems,
        }


def inspect_checkpoint(ckpt_dir: str | Path, check_values: bool = True) -> Inspection:
    """Summary and every problem found (config errors are raised: without a config there is no schema)."""
    ckpt = read_config(ckpt_dir)
    expected = expected_tensors(ckpt.spec)
    params = {"base": 0, "heads": 0}
    for e in entries(ckpt.spec):
        params["heads" if e.name.startswith("medusa_heads.") else "base"] += math.prod(e.shape)
    files = {p.name: p.stat().st_size for p in sorted(ckpt.directory.iterdir()) if p.is_file()}
    return Inspection(ckpt, files, len(expected), params, validate(ckpt, check_values))


def validate(ckpt: CheckpointConfig, check_values: bool = True) -> list[str]:
    """Every problem with the rank files, one line each (empty: the checkpoint matches the schema)."""
    spec = ckpt.spec
    problems = [
        f"unexpected file {p.name} (tp_size is {spec.tp_size})"
        for p in sorted(ckpt.directory.iterdir())
        if (m := RANK_FILE.fullmatch(p.name)) and int(m.group(1)) >= spec.tp_size
    ]
    expected = expected_tensors(spec)
    handles = []
    for r in range(spec.tp_size):
        path = ckpt.rank_file(r)
        if not path.is_file():
            problems.append(f"missing file {path.name}")
            continue
        try:
            f = safe_open(str(path), framework="pt")
            headers = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            problems.append(f"{path.name}: not a readable safetensors file ({e})")
            continue
        problems += _header_problems(path.name, headers, expected)
        handles.append((r, f))
    if check_values and len(handles) == spec.tp_size and not problems:
        problems += _value_problems(ckpt, [f for _, f in handles])
    return problems


def _header_problems(file: str, headers: dict, expected: dict) -> list[str]:
    out = [f"{file}: missing tensor {n}" for n in expected if n not in headers]
    out += [f"{file}: unexpected tensor {n}" for n in headers if n not in expected]
    for name, (shape, dtype) in expected.items():
        if name not in headers:
            continue
        got_shape, got_dtype = headers[name]
        if got_shape != shape:
            out.append(f"{file}: {name} has shape {list(got_shape)}, expected {list(shape)}")
        if got_dtype != ST_DTYPES[dtype]:
            out.append(f"{file}: {name} has dtype {got_dtype}, expected {ST_DTYPES[dtype]}")
    return out


def _value_problems(ckpt: CheckpointConfig, files: list) -> list[str]:
    """Scales finite, positive and equal on every rank; replicated tensors identical on every rank."""
    spec, out = ckpt.spec, []
    for name, (shape, dtype) in expected_tensors(spec).items():
        if dtype != SCALE_DTYPE or shape != (1,):
            continue
        values = [float(f.get_tensor(name)[0]) for f in files]
        if not all(math.isfinite(v) and v > 0 for v in values):
            out.append(f"{name}: scale {values} is not finite and positive")
        elif len(set(values)) > 1:
            out.append(f"{name}: scale differs between ranks {values}")
    for e in entries(spec):
        for group in replica_groups(e, spec):
            if not _replicas_equal(e, [files[r] for r in group], spec):
                out.append(f"{e.name}: copies on ranks {group} differ (replicated tensors must be identical)")
    return out


def _replicas_equal(e: Entry, files: list, spec) -> bool:
    parts = [f.get_tensor(e.name) for f in files]
    if e.split == QKV:
        parts = [cat(rank_qkv_parts(p, spec)[1:]) for p in parts]
    views = [p.view(torch.uint8) if p.dtype == FP8_DTYPE else p for p in parts]  # no equality on float8 on CPU
    return all(torch.equal(views[0], v) for v in views[1:])
