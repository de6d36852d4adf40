"""What a benchmark result records about where it ran: the commit, the device, the host."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity set, cut to a cgroup v2 CPU quota if one is set
    (a container's limit, which os.cpu_count() and the affinity set both ignore)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def source_commit() -> str:
    """The commit the running code is: MEDUSA_FORGE_COMMIT when set (a copied tree whose .git is
    missing or stale, as on the GPU machine), else ``git describe --always --dirty``, so a tree
    that differs from its HEAD says so ("<sha>-dirty") instead of passing for that commit."""
    commit = os.environ.get("MEDUSA_FORGE_COMMIT", "")
    try:
        commit = (
            commit
            or subprocess.run(
                ["git", "describe", "--always", "--dirty", "--abbrev=7"],
                capture_output=True,
                text=True,
                check=False,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
        )
    except OSError:
        pass
    return commit or "unknown"


def run_metadata() -> dict:
    """What a result needs to be reproducible: commit, device, library versions, time."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "commit": source_commit(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def machine() -> dict[str, Any]:
    """The host, for the result: CPU model, cores usable here, torch threads, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def served_result(kind: str, checks: dict[str, bool], config: dict, server: dict, **rest: Any) -> dict[str, Any]:
    """A served benchmark's document: what ran, whether every check held, on what, then its figures."""
    return {
        "kind": kind,
        "passed": all(checks.values()),
        "checks": checks,
        "config": config,
        "machine": machine(),
        "server": server,
        **rest,
    }
