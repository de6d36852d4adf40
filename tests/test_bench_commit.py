"""Spec for bench.cli.source_commit: results name the code they ran, and a tree that differs from
its HEAD (the GPU machine's copy with a stale .git) cannot pass for that commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from medusa_forge.bench import cli

REPO = Path(__file__).resolve().parents[1]


def test_the_environment_names_the_commit_of_a_copied_tree(monkeypatch):
    monkeypatch.setenv("MEDUSA_FORGE_COMMIT", "abc1234")
    assert cli.source_commit() == "abc1234"


def test_a_git_checkout_reports_its_head_and_whether_it_is_dirty(monkeypatch):
    monkeypatch.delenv("MEDUSA_FORGE_COMMIT", raising=False)
    if not (REPO / ".git").exists():
        pytest.skip("an exported tree without .git: the environment names its commit")
    head = subprocess.run(
        ["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    got = cli.source_commit()
    assert got.startswith(head[:7])
    assert got.endswith("-dirty") == dirty
