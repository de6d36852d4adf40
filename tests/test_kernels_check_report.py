"""Spec for bench/kernels_check.py's report (the GPU check itself needs CUDA): every section's
rows render, a failed required check flips the verdict, and the sweep rows name their tiles."""

from __future__ import annotations

from medusa_forge.bench import kernels_check as KC


def test_report_renders_every_section_and_the_verdict():
    chk = KC.Check()
    chk.invariant("rope rows", True, "64/64 rows")
    chk.timing("rope_qkv_to_cache", 1, 2.0, 8.0)
    chk.rows.append(
        dict(
            section="sweep",
            shape="llama3-8b",
            split=128,
            block_m=16,
            block_n=32,
            warps=4,
            combine_rows=4,
            early_v=False,
            T=64,
            triton_us=48.8,
        )
    )
    text = KC.report(chk)
    assert "== invariance" in text and "== timing" in text and "x4.00" in text
    assert "llama3-8b      split 128  block_m 16  block_n 32  warps 4  combine rows 4  T=64     48.80 us" in text
    assert text.endswith("ALL CHECKS PASSED")
    chk.invariant("attention rows", False, "63/64 rows")
    assert KC.report(chk).endswith("SOME CHECKS FAILED") and not chk.ok
