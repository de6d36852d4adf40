"""bench/results/ stays small and holds only runs a document cites (bench/README.md, Retention)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LIMIT_BYTES = 1_000_000
KEPT_SUFFIXES = {".md", ".json", ".png"}


def _docs_text() -> str:
    docs = [
        ROOT / "README.md",
        ROOT / "bench" / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]
    return "\n".join(p.read_text(encoding="utf-8") for p in docs if p.is_file())


def _files() -> list[Path]:
    return [p for p in RESULTS.rglob("*") if p.is_file()]


def test_bench_results_stays_under_one_megabyte():
    total = sum(p.stat().st_size for p in _files())
    assert total < LIMIT_BYTES, f"bench/results holds {total} bytes (limit {LIMIT_BYTES})"
    # on disk too, as `du -sk` counts it: every file and folder takes whole blocks
    on_disk = sum(p.stat().st_blocks * 512 for p in [RESULTS, *RESULTS.rglob("*")])
    assert on_disk < LIMIT_BYTES, f"bench/results takes {on_disk // 1024} KB on disk (limit {LIMIT_BYTES // 1024})"


def test_every_run_folder_is_cited_by_a_doc():
    text = _docs_text()
    uncited = [d.name for d in RESULTS.iterdir() if d.is_dir() and f"bench/results/{d.name}" not in text]
    assert not uncited, f"run folders no doc cites: {uncited}"


def test_only_markdown_json_and_plots_are_kept():
    others = [str(p.relative_to(RESULTS)) for p in _files() if p.suffix not in KEPT_SUFFIXES]
    assert not others, f"not Markdown, JSON or PNG: {others}"


def test_no_two_kept_files_are_byte_identical():
    seen: dict[bytes, Path] = {}
    twins = []
    for p in sorted(_files()):
        data = p.read_bytes()
        if data in seen:
            twins.append((str(seen[data].relative_to(RESULTS)), str(p.relative_to(RESULTS))))
        seen.setdefault(data, p)
    assert not twins, f"byte-identical files: {twins}"
