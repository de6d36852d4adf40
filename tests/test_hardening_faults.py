"""Writers killed at random points leave the old output or a complete new one, never a mix.

`convert trtllm`, `build native` and `promote` run as real subprocesses of the installed `medusa-forge`
and are SIGKILLed: once during start-up (before the writer made its temporary output; every such kill takes
the same path), then once in each of N-1 equal slices of the rest of 0..1.1x the measured runtime, so kills
land mid-write, after the output was published, after the end. After every kill the output must be
byte-for-byte what it was, or a complete output of the new run that the project's own readers accept;
temporary siblings may be left by a kill, must be named as such, and are gone after the next complete run.
SIGTERM and SIGINT instead make the writer clean up, exit 128+N and say how to carry on.

Trials per command: 6 convert, 5 build, 8 promote by default; MEDUSA_FORGE_FAULT_TRIALS=N runs N of each
(20: the full run). The delays come from a seeded RNG, so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ctrl_c_for_children, make_heads

from medusa_forge.cli import main
from medusa_forge.manifest import EngineManifest

_ALL = os.environ.get("MEDUSA_FORGE_FAULT_TRIALS")
TRIALS = {cmd: int(_ALL) if _ALL else n for cmd, n in (("convert", 6), ("build", 5), ("promote", 8))}
SEED = 20261201
MF = [sys.executable, "-m", "medusa_forge.cli"]


# ------------------------------------------------------------------------------------------ helpers
def state(path: Path) -> dict:
    """Everything a reader could notice: each entry's type, size, mtime and inode (links: their target)."""
    if not path.exists() and not path.is_symlink():
        return {}
    out = {".": (path.lstat().st_ino, os.readlink(path) if path.is_symlink() else None)}
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.rglob("*")):
            st = p.lstat()
            out[str(p.relative_to(path))] = (
                os.readlink(p) if p.is_symlink() else p.is_dir(),
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
            )
    return out


def temps(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.tmp-*"))


def visible(parent: Path) -> list[str]:
    """What readers list: names not starting with a dot."""
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


def run_ok(argv: list[str], writing=lambda: False) -> tuple[float, float]:
    """Run the command to the end: its runtime, and when ``writing()`` first held (0 if never seen)."""
    with tempfile.TemporaryFile("w+") as err:
        t0, began = time.perf_counter(), None
        proc = subprocess.Popen([*MF, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err, text=True)
        while proc.poll() is None:
            if began is None and writing():
                began = time.perf_counter() - t0
            time.sleep(0.005)
        runtime = time.perf_counter() - t0
        err.seek(0)
        assert proc.returncode == 0, err.read()[-2000:]
    return runtime, began or 0.0


def kill_after(argv: list[str], delay: float, sig: int = signal.SIGKILL, log: Path | None = None) -> int:
    """Start the command, send ``sig`` after ``delay`` s (unless it finished), return its exit status."""
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen([*MF, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        return proc.wait(timeout=120)


def delays(runtime: float, began: float, n: int, rng: random.Random) -> list[float]:
    """One delay before the writer began writing, one per slice of [began, 1.1 * runtime], in random order."""
    span = 1.1 * runtime - began
    out = [rng.random() * began] + [began + (i + rng.random()) * span / (n - 1) for i in range(n - 1)]
    rng.shuffle(out)
    return out


class Outcomes:
    """Where the kills landed: before the writer made its temporary output, while it was writing (a
    temporary sibling was left behind), or after the new output was published."""

    def __init__(self, what: str, trials: int):
        self.what, self.trials = what, trials
        self.counts = {"before writing": 0, "mid-write": 0, "after publishing": 0, "finished": 0}

    def add(self, code: int, changed: bool, new_temps: set[str]) -> None:
        key = (
            "finished"
            if code == 0
            else "after publishing"
            if changed
            else "mid-write"
            if new_temps
            else "before writing"
        )
        self.counts[key] += 1

    def report(self) -> None:
        print(f"\n{self.what}: {self.trials} SIGKILL trials: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))


def wait_for_temp(proc: subprocess.Popen, parent: Path, name: str, timeout: float = 120.0) -> None:
    """Until the writer has created its temporary sibling (it is writing), or fail."""
    deadline = time.monotonic() + timeout
    while not temps(parent, name):
        assert proc.poll() is None, "the writer finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def heads1(model_dir, work) -> Path:
    """One head keeps every writer's output (and runtime) small."""
    return make_heads(model_dir, work / "heads1", num_heads=1)


def build_argv(model_dir, heads, out, tree: str) -> list:
    return [
        "build",
        "native",
        "--model",
        model_dir,
        "--medusa",
        heads,
        "--out",
        out,
        "--overwrite",
        "--dtype",
        "float32",
        "--medusa-choices",
        tree,
        "--verify-tokens",
        "2",
        "--device",
        "cpu",
    ]


TREES = ("[[0]]", "[[0], [1]]")  # alternated, so a replaced engine is told apart from the old one


@pytest.fixture(scope="module")
def built(model_dir, heads1, work) -> tuple[Path, float, float]:
    """An engine built by the CLI, how long that took and when it began writing."""
    out = work / "engine"
    return out, *run_ok(build_argv(model_dir, heads1, out, TREES[0]), lambda: temps(work, "engine"))


# ------------------------------------------------------------------------------------------ convert
def convert_argv(model_dir, heads, out, tp: int) -> list:
    return ["convert", "trtllm", "--model", model_dir, "--medusa", heads, "--out", out, "--overwrite", "--tp-size", tp]


def inspect_ok(ckpt: Path, capsys) -> int:
    """`medusa-forge convert inspect` (in this process) passes; returns the checkpoint's tp size."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["convert", "inspect", str(ckpt)])
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "valid: every expected tensor present" in out, out[-2000:]
    return json.loads((ckpt / "config.json").read_text())["mapping"]["tp_size"]


def test_killed_convert_leaves_the_old_checkpoint_or_a_complete_new_one(model_dir, heads1, work, capsys):
    out = work / "ckpt"
    runtime, began = run_ok(convert_argv(model_dir, heads1, out, 1), lambda: temps(work, "ckpt"))
    tp, seen = 1, Outcomes("convert trtllm", TRIALS["convert"])
    for delay in delays(runtime, began, TRIALS["convert"], random.Random(SEED)):
        before, want = state(out), 3 - tp  # tp 1 <-> 2: a new checkpoint has other files than the old one
        old_temps = set(temps(work, "ckpt"))
        code = kill_after(convert_argv(model_dir, heads1, out, want), delay)
        changed = state(out) != before
        seen.add(code, changed, set(temps(work, "ckpt")) - old_temps)
        if changed:  # else byte-for-byte the old checkpoint, which passed inspect
            assert inspect_ok(out, capsys) == want
            tp = want
        assert visible(work).count("ckpt") == 1 and all(t.startswith(".ckpt.tmp-") for t in temps(work, "ckpt"))
    run_ok(convert_argv(model_dir, heads1, out, 3 - tp))
    assert inspect_ok(out, capsys) == 3 - tp and temps(work, "ckpt") == []  # the next run cleaned up
    with capsys.disabled():
        seen.report()
    assert seen.counts["before writing"] + seen.counts["mid-write"] >= 1  # some kills landed before the end


# ------------------------------------------------------------------------------------------ build
def engine_ok(engine: Path) -> list[list[int]]:
    """Manifest present and loads, and the engine it describes opens and decodes; returns its tree."""
    from medusa_forge.engine.generation import GenerationConfig
    from medusa_forge.engine.load import load_engine

    manifest = EngineManifest.load(engine)
    assert manifest.kind == "native" and manifest.extra["verify"]["medusa_equals_greedy"] is True
    eng = load_engine(engine, device="cpu")
    assert len(eng.generate("def f(x):", GenerationConfig(max_new_tokens=2, ignore_eos=True)).tokens) == 2
    return manifest.medusa_choices


def test_killed_build_leaves_the_old_engine_or_a_complete_new_one(model_dir, heads1, built, work, capsys):
    engine, runtime, began = built
    out = work / "build_out"
    shutil.copytree(engine, out)
    trees = [json.loads(t) for t in TREES]
    current, seen = 0, Outcomes("build native", TRIALS["build"])
    for delay in delays(runtime, began, TRIALS["build"], random.Random(SEED + 1)):
        before, want = state(out), 1 - current
        old_temps = set(temps(work, "build_out"))
        code = kill_after(build_argv(model_dir, heads1, out, TREES[want]), delay)
        changed = state(out) != before
        seen.add(code, changed, set(temps(work, "build_out")) - old_temps)
        if changed:
            assert engine_ok(out) == trees[want]
            current = want
        assert visible(work).count("build_out") == 1
        assert all(t.startswith(".build_out.tmp-") for t in temps(work, "build_out"))
    assert engine_ok(out) == trees[current]
    run_ok(build_argv(model_dir, heads1, out, TREES[1 - current]))
    assert engine_ok(out) == trees[1 - current] and temps(work, "build_out") == []
    with capsys.disabled():
        seen.report()


# ------------------------------------------------------------------------------------------ promote
@pytest.fixture(scope="module")
def promotion(built, work) -> dict:
    """A candidate engine, its `eval report` (made by the CLI from a small MMLU result) and a baseline."""
    candidate = work / "candidate"
    shutil.copytree(built[0], candidate)
    mmlu = work / "mmlu.json"
    mmlu.write_text(
        json.dumps(
            {
                "kind": "mmlu",
                "complete": True,
                "model": "candidate",
                "shots": 0,
                "macro_accuracy": 0.5,
                "micro_accuracy": 0.5,
                "num_questions": 2,
                "subjects": {"cs": {"correct": 1, "total": 2, "accuracy": 0.5}},
                "questions": [{"id": "cs/0", "predicted": "A"}, {"id": "cs/1", "predicted": "B"}],
            }
        )
    )
    report = work / "report"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "eval",
                "report",
                "--mmlu",
                str(mmlu),
                "--baseline-mmlu",
                str(mmlu),
                "--engine",
                str(candidate),
                "--out",
                str(report),
            ]
        )
        raise SystemExit(0)
    assert exc.value.code == 0
    return {"candidate": candidate, "report": report, "baseline": mmlu}


def promote_argv(p: dict, registry: Path) -> list:
    return [
        "promote",
        "--candidate",
        p["candidate"],
        "--report",
        p["report"],
        "--baseline",
        p["baseline"],
        "--to",
        registry,
        "--min-speedup",
        "0",
        "--lock-timeout",
        "30",
    ]


def files_of(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}


def registry_ok(registry: Path, candidate: Path) -> str:
    """Every published version complete, `current` one of them, history whole lines; returns current."""
    want = files_of(candidate)
    versions = visible(registry / "versions")
    for v in versions:
        got = files_of(registry / "versions" / v)
        assert {k: got.get(k) for k in want} == want, f"{v} is incomplete"
        assert set(got) - set(want) == {"promotion.json", "eval/report.json", "eval/baseline_mmlu.json"}
        EngineManifest.load(registry / "versions" / v)
        assert json.loads((registry / "versions" / v / "promotion.json").read_text())["version"] == v
    current = os.readlink(registry / "current")
    assert current.startswith("versions/") and current.removeprefix("versions/") in versions
    for line in (registry / "history.jsonl").read_text().splitlines():
        json.loads(line)
    return current.removeprefix("versions/")


def registry_temps(registry: Path) -> list[str]:
    return sorted(
        str(p.relative_to(registry))
        for d in (registry, registry / "versions")
        if d.is_dir()  # before the first promote wrote them
        for p in d.iterdir()
        if ".tmp-" in p.name
    )


def test_killed_promote_leaves_the_old_or_the_new_engine_current(promotion, work, capsys):
    registry = work / "registry"
    runtime, began = run_ok(promote_argv(promotion, registry), lambda: registry_temps(registry))
    current, seen = registry_ok(registry, promotion["candidate"]), Outcomes("promote", TRIALS["promote"])
    for delay in delays(runtime, began, TRIALS["promote"], random.Random(SEED + 2)):
        before = {"current": os.readlink(registry / "current"), "old": state(registry / "versions" / current)}
        old_temps = set(registry_temps(registry))
        code = kill_after(promote_argv(promotion, registry), delay)
        left = registry_temps(registry)
        now = registry_ok(registry, promotion["candidate"])
        seen.add(code, now != current, set(left) - old_temps)
        assert state(registry / "versions" / current) == before["old"]  # the old version is never touched
        if now != current:
            assert int(now[1:]) > int(current[1:])
        else:
            assert os.readlink(registry / "current") == before["current"]
        assert all(Path(t).name.startswith(".") for t in left)  # temporary names only: readers skip them
        current = now
    run_ok(promote_argv(promotion, registry))
    assert registry_ok(registry, promotion["candidate"]) != current
    assert [t for t in registry_temps(registry) if t.startswith("versions/")] == []  # the next run cleaned up
    with capsys.disabled():
        seen.report()


# ------------------------------------------------------------------------------------------ SIGTERM / SIGINT
RERUN = (
    "no output was published (outputs appear only when complete, so any previous output is intact); "
    "re-run the same command"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_build_exits_nonzero_keeps_the_old_engine_and_says_how_to_rerun(
    sig, model_dir, heads1, built, work
):
    out = work / f"interrupted_{sig.name}"
    shutil.copytree(built[0], out)
    before = state(out)
    log = work / f"{sig.name}.log"
    with open(log, "w") as err, ctrl_c_for_children():
        proc = subprocess.Popen(
            [*MF, *map(str, build_argv(model_dir, heads1, out, TREES[1]))], stdout=subprocess.DEVNULL, stderr=err
        )
        wait_for_temp(proc, work, out.name)
        time.sleep(0.5)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    lines = log.read_text().strip().splitlines()
    # SIGINT: exit 130, or death by SIGINT itself (-2) when the KeyboardInterrupt passed through C code that ran
    # Python via PyRun_String (CPython then re-raises SIGINT at exit of a `python -m` run, as shells expect).
    assert code == 128 + sig or (sig == signal.SIGINT and code == -sig), code
    assert lines[-1] == f"error: interrupted by {sig.name}: {RERUN}"
    assert state(out) == before and temps(work, out.name) == []  # old engine intact, its temp removed
    assert engine_ok(out) == json.loads(TREES[0])


def test_interrupted_train_heads_points_at_resume(model_dir, work, prompts_path):
    out = work / "trained"
    argv = [
        "train-heads",
        "--model",
        model_dir,
        "--out",
        out,
        "--self-distill",
        "--prompts",
        prompts_path,
        "--num-heads",
        "1",
        "--distill-new-tokens",
        "200",
        "--max-seq-len",
        "256",
        "--no-progress",
    ]
    log = work / "train.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([*MF, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err)
        time.sleep(6.0)  # past start-up, into self-distillation
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    last = log.read_text().strip().splitlines()[-1]
    assert code == 128 + signal.SIGTERM
    assert last == (
        f"error: interrupted by SIGTERM: {RERUN} with --resume to continue from its last checkpoint "
        "(<out>.ckpt), if it saved one"
    )
    assert not out.exists() and temps(work, "trained") == []


# ------------------------------------------------------------------------------------------ serving
def test_a_request_cancelled_while_it_waited_never_starts(built):
    """The native model's service (what each Triton instance runs): a client that left while its request
    queued costs no prefill, and the next request is served as usual."""
    from medusa_forge.engine.generation import GenerationConfig
    from medusa_forge.serve.native_service import NativeModelSettings, NativeService, RequestCancelled
    from medusa_forge.serve.request import RowRequest

    service = NativeService(NativeModelSettings(engine_dir=str(built[0]), use_medusa="false", warmup_tokens="0"))
    row = RowRequest("def main():", GenerationConfig(max_new_tokens=4, use_medusa=False, ignore_eos=True), False)
    seen: list[int] = []
    with pytest.raises(RequestCancelled):
        service.run(row, on_tokens=seen.extend, cancelled=lambda: True)
    assert seen == []  # not even the prefill's token
    assert len(service.run(row, on_tokens=seen.extend, cancelled=lambda: False).tokens) == 4 and len(seen) == 4
