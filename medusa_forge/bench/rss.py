"""Memory of a server under load: RSS of a process and its descendants, sampled on a thread, and the
growth from the end of a warm-up to the peak after it (the soak's memory check)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from medusa_forge.errors import ForgeError


def _proc_status_kb(pid: int, key: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _proc_children(pid: int) -> list[int]:
    """Descendants of ``pid`` from /proc (every process's parent), breadth first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, ...
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


class RssProbe:
    """RSS in MiB of one process, and of it plus its descendants."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            import psutil

            self._proc = psutil.Process(pid)
            self.source = "psutil"
        except ImportError:
            self._proc = None
            self.source = "/proc/PID/status VmRSS"

    def sample(self) -> tuple[float, float, int]:
        """(process MiB, process + descendants MiB, number of processes)."""
        if self._proc is not None:
            import psutil

            procs = [self._proc] + self._proc.children(recursive=True)
            sizes = []
            for p in procs:
                try:
                    sizes.append(p.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
            return sizes[0] if sizes else 0.0, sum(sizes), len(sizes)
        own = _proc_status_kb(self.pid)
        kids = [kb for kb in (_proc_status_kb(c) for c in _proc_children(self.pid)) if kb is not None]
        own_mb = (own or 0) / 1024
        return own_mb, own_mb + sum(kids) / 1024, 1 + len(kids)


class Sampler(threading.Thread):
    def __init__(self, probe: RssProbe, every_s: float, t0: float):
        super().__init__(daemon=True)
        self.probe, self.every_s, self.t0 = probe, every_s, t0
        self.samples: list[tuple[float, float, float, int]] = []  # t, server MiB, total MiB, processes
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic() - self.t0, *self.probe.sample()))
            self.done.wait(self.every_s)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.samples.append((time.monotonic() - self.t0, *self.probe.sample()))


def rss_summary(
    samples: list[tuple[float, float, float, int]], warmup_s: float, bound_mb: float, source: str
) -> dict[str, Any]:
    """Growth from the end of the warm-up to the peak after it, per series; slope as information."""
    after = [s for s in samples if s[0] >= warmup_s]
    if not after:
        raise ForgeError(f"no memory sample after the warm-up of {warmup_s:g} s; run longer than the warm-up")
    out: dict[str, Any] = {
        "source": source,
        "bound_mb": bound_mb,
        "warmup_s": warmup_s,
        "processes": after[-1][3],
        "samples": len(samples),
    }
    for key, col in (("server", 1), ("total", 2)):
        base, peak = after[0][col], max(s[col] for s in after)
        t = np.array([s[0] for s in after])
        y = np.array([s[col] for s in after])
        slope = float(np.polyfit(t, y, 1)[0] * 60) if len(after) > 2 and np.ptp(t) > 0 else 0.0
        out[key] = {
            "start_mb": round(samples[0][col], 1),
            "baseline_mb": round(base, 1),
            "peak_mb": round(peak, 1),
            "final_mb": round(after[-1][col], 1),
            "growth_mb": round(peak - base, 1),
            "slope_mb_per_min": round(slope, 2),
        }
    out["bounded"] = all(out[k]["growth_mb"] <= bound_mb for k in ("server", "total"))
    out["series"] = [[round(s[0], 2), round(s[1], 1), round(s[2], 1)] for s in samples]
    return out
