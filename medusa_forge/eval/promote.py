"""``promote``: gate a candidate engine on its eval report, then publish it atomically into a registry.

Registry layout (every version is a complete engine directory, so ``current`` can be served as is)::

    REGISTRY/
      versions/v0001/ ...        engine files + promotion.json + eval/{report,baseline}.json
      versions/v0002/ ...
      current  -> versions/v0002 (symlink; what serving uses)
      previous -> versions/v0001 (symlink; kept for rollback)
      history.jsonl              one line per attempt: promoted, rejected or rolled back, and why
      .lock                      file lock: concurrent promotions run one after another

A version is copied into a temporary sibling and renamed into ``versions/`` only when complete; the
``current``/``previous`` links are replaced with ``os.replace`` of a fresh symlink (atomic on POSIX),
so a reader always sees either the old or the new engine. A rejected candidate changes nothing but
the history.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from medusa_forge.atomic import atomic_output_dir, atomic_write_text
from medusa_forge.errors import ForgeError
from medusa_forge.eval.cache import read_complete
from medusa_forge.eval.report import compare_mmlu, engine_fingerprint, mmlu_summary
from medusa_forge.manifest import EngineManifest

MMLU_METRICS = ("micro", "macro")


@dataclass(frozen=True)
class Gates:
    max_mmlu_drop: float = 0.5  # accuracy points the candidate may lose against the baseline
    min_speedup: float = 1.5  # on the slowest topic
    require_identical: bool = False  # greedy outputs (speed) and MMLU answers equal to the baseline's
    mmlu_metric: str = "micro"  # the original's "Average accuracy"; "macro" = mean over subjects


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    detail: str


# ---------------------------------------------------------------- inputs
def _report_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "report.json" if path.is_dir() else path


def load_report(path: str | Path) -> dict[str, Any]:
    return read_complete(_report_file(path), "report")


def load_baseline_mmlu(path: str | Path) -> dict[str, Any]:
    """The baseline's MMLU summary, from its report (dir or report.json) or its ``eval mmlu`` output."""
    doc = read_complete(_report_file(path), ("report", "mmlu"))
    if doc["kind"] == "mmlu":
        return mmlu_summary(doc)
    if not doc.get("mmlu"):
        raise ForgeError(f"{path}: baseline report has no MMLU results")
    return doc["mmlu"]


# ---------------------------------------------------------------- gates
def check_gates(
    report: dict[str, Any], baseline: dict[str, Any], gates: Gates, candidate_fingerprint: dict[str, str]
) -> list[GateResult]:
    out = []
    rec = report.get("engine")
    if rec:
        same = rec["manifest_sha256"] == candidate_fingerprint["manifest_sha256"]
        out.append(
            GateResult(
                "engine",
                same,
                "report made for this engine" if same else f"report was made for another engine ({rec['path']})",
            )
        )
    else:
        out.append(GateResult("engine", True, "report names no engine (made without `eval report --engine`)"))

    cand = report.get("mmlu")
    comparison = None
    if not cand:
        out.append(GateResult("mmlu", False, "report has no MMLU results"))
    else:
        try:
            comparison = compare_mmlu(cand, baseline)
        except ForgeError as e:
            out.append(GateResult("mmlu", False, str(e)))
        else:
            key = f"{gates.mmlu_metric}_accuracy"
            drop = 100 * (baseline[key] - cand[key])
            out.append(
                GateResult(
                    "mmlu",
                    drop <= gates.max_mmlu_drop + 1e-9,
                    f"{gates.mmlu_metric} accuracy {100 * cand[key]:.2f} vs baseline "
                    f"{100 * baseline[key]:.2f}: drop {drop:+.2f} points (max {gates.max_mmlu_drop})",
                )
            )

    speed = report.get("speed")
    if not speed:
        out.append(GateResult("speedup", gates.min_speedup <= 0, "report has no speed results"))
    else:
        worst = min(speed["per_topic"].items(), key=lambda kv: kv[1]["speedup"])
        ok = speed["min_topic_speedup"] >= gates.min_speedup
        out.append(
            GateResult(
                "speedup",
                ok,
                f"slowest topic {worst[0]} {speed['min_topic_speedup']:.2f}x "
                f"(min {gates.min_speedup}x; overall {speed['overall']['speedup']:.2f}x)",
            )
        )

    if gates.require_identical:
        problems = []
        if not speed:
            problems.append("no speed results to compare outputs")
        elif not speed["all_identical"]:
            problems.append(f"greedy outputs differ from the base in {len(speed['mismatches'])} request pair(s)")
        if comparison is not None and not comparison["all_answers_identical"]:
            problems.append(f"MMLU answers differ from the baseline on {len(comparison['differing'])} question(s)")
        out.append(
            GateResult("identical", not problems, "; ".join(problems) or "greedy outputs and MMLU answers identical")
        )
    return out


# ---------------------------------------------------------------- registry
class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.versions = self.root / "versions"
        self.history = self.root / "history.jsonl"

    def lock(self, timeout: float) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=timeout)

    def link(self, name: str) -> str | None:
        """The version a link (``current``/``previous``) points at, or None."""
        path = self.root / name
        return Path(os.readlink(path)).name if path.is_symlink() else None

    def _set_link(self, name: str, version: str) -> None:
        """Swap the link by rename. The caller holds the registry lock, so any other ``.NAME.tmp-*``
        is what a killed promotion left: removed here, so no run leaves one behind for long."""
        for stale in self.root.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        os.symlink(Path("versions") / version, tmp)
        os.replace(tmp, self.root / name)

    def next_version(self) -> str:
        taken = [int(p.name[1:]) for p in self.versions.glob("v[0-9]*") if p.name[1:].isdigit()]
        return f"v{max(taken, default=0) + 1:04d}"

    def install(self, candidate: Path, version: str, files: dict[str, Any]) -> Path:
        """Copy the engine plus promotion records into ``versions/<version>`` (atomically)."""
        dest = self.versions / version
        with atomic_output_dir(dest) as tmp:
            shutil.copytree(candidate, tmp, dirs_exist_ok=True, symlinks=False)
            for rel, obj in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(json.dumps(obj, indent=2) + "\n")
        return dest

    def switch(self, version: str) -> str | None:
        """Point ``current`` at ``version`` and ``previous`` at what was current; return that."""
        old = self.link("current")
        if old is not None and old != version:
            self._set_link("previous", old)
        self._set_link("current", version)
        return old

    def record(self, entry: dict[str, Any]) -> None:
        """Append one history line (rewritten atomically; the caller holds the lock)."""
        old = self.history.read_text() if self.history.is_file() else ""
        atomic_write_text(self.history, old + json.dumps(entry, sort_keys=True) + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history.is_file():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@dataclass
class Outcome:
    promoted: bool
    version: str | None
    gates: list[GateResult]
    current: str | None
    previous: str | None


def promote(
    candidate: str | Path,
    report_path: str | Path,
    baseline_path: str | Path,
    registry: str | Path,
    gates: Gates = Gates(),
    lock_timeout: float = 600.0,
) -> Outcome:
    """Check the gates; on success install the candidate and make it ``current``. Always records history."""
    if gates.mmlu_metric not in MMLU_METRICS:
        raise ForgeError(f"unknown MMLU metric {gates.mmlu_metric!r}; use micro or macro")
    candidate = Path(candidate)
    manifest = EngineManifest.load(candidate)
    fingerprint = engine_fingerprint(candidate)
    report = load_report(report_path)
    baseline = load_baseline_mmlu(baseline_path)
    results = check_gates(report, baseline, gates, fingerprint)
    passed = all(g.passed for g in results)
    reg = Registry(registry)
    try:
        with reg.lock(lock_timeout):
            entry = {
                "action": "promote" if passed else "reject",
                **_who(),
                "candidate": fingerprint,
                "engine_kind": manifest.kind,
                "report": str(_report_file(report_path).resolve()),
                "baseline": str(_report_file(baseline_path).resolve()),
                "gates_config": asdict(gates),
                "gates": [asdict(g) for g in results],
                "current_before": reg.link("current"),
            }
            version = None
            if passed:
                version = reg.next_version()
                reg.install(
                    candidate,
                    version,
                    {
                        "promotion.json": {**entry, "version": version},
                        "eval/report.json": report,
                        "eval/baseline_mmlu.json": baseline,
                    },
                )
                reg.switch(version)
            reg.record({**entry, "version": version, "current_after": reg.link("current")})
            return Outcome(passed, version, results, reg.link("current"), reg.link("previous"))
    except Timeout:
        raise ForgeError(f"{reg.root}: another promotion holds the registry lock; retry later") from None


def rollback(registry: str | Path, lock_timeout: float = 600.0) -> Outcome:
    """Swap ``current`` and ``previous`` (a second rollback rolls forward again)."""
    reg = Registry(registry)
    if not (reg.root / "current").is_symlink():
        raise ForgeError(f"{reg.root}: not a registry with a current engine")
    try:
        with reg.lock(lock_timeout):
            cur, prev = reg.link("current"), reg.link("previous")
            if prev is None or not (reg.versions / prev).is_dir():
                raise ForgeError(f"{reg.root}: no previous engine to roll back to")
            reg.switch(prev)
            reg.record({"action": "rollback", **_who(), "current_before": cur, "current_after": prev, "version": prev})
            return Outcome(True, prev, [], reg.link("current"), reg.link("previous"))
    except Timeout:
        raise ForgeError(f"{reg.root}: another promotion holds the registry lock; retry later") from None
