"""The report's PNG plots (matplotlib, Agg backend: no display needed on CI or a GPU box)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tokens_per_s_bars(path: Path, speed: dict[str, Any]) -> None:
    """Per-topic tokens/s, base vs Medusa, with the speedup written over each pair."""
    plt = _pyplot()
    topics = list(speed["per_topic"])
    base = [speed["per_topic"][t]["base"]["tokens_per_s"] for t in topics]
    med = [speed["per_topic"][t]["medusa"]["tokens_per_s"] for t in topics]
    x = np.arange(len(topics))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(topics) + 2), 4.5))
    ax.bar(x - 0.2, base, 0.4, label=f"base ({speed['base_model']})", color="#8c8c8c")
    bars = ax.bar(x + 0.2, med, 0.4, label=f"Medusa ({speed['medusa_model']})", color="#1f77b4")
    for bar, t in zip(bars, topics):
        ax.annotate(
            f"{speed['per_topic'][t]['speedup']:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(x, topics, rotation=20, ha="right")
    ax.set_ylabel("tokens/s")
    ax.set_title("Greedy decoding speed per topic")
    ax.set_ylim(0, 1.15 * max(base + med + [1e-9]))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdf(path: Path, speed_doc: dict[str, Any]) -> None:
    """Empirical CDF of end-to-end request latency for both models."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, color in (("base", "#8c8c8c"), ("medusa", "#1f77b4")):
        lat = np.sort([1e3 * r["total_s"] for r in speed_doc["requests"] if r["model"] == model])
        if len(lat):
            ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=model, color=color)
    ax.set_xlabel("request latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mmlu_delta(path: Path, comparison: dict[str, Any]) -> None:
    """Per-subject accuracy change (candidate - baseline) in points."""
    plt = _pyplot()
    subjects = list(comparison["per_subject_delta_points"])
    delta = [comparison["per_subject_delta_points"][s] for s in subjects]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(subjects) + 1.5))
    colors = ["#2ca02c" if d >= 0 else "#d62728" for d in delta]
    ax.barh(subjects, delta, color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    lim = max([abs(d) for d in delta] + [1.0])
    ax.set_xlim(-1.1 * lim, 1.1 * lim)
    ax.set_xlabel("accuracy delta (points, candidate - baseline)")
    ax.set_title(f"MMLU per subject (micro delta {comparison['micro_delta_points']:+.2f} points)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_plots(out: Path, report: dict[str, Any], speed_doc: dict[str, Any] | None) -> list[str]:
    """Draw the plots the data allows; return their file names."""
    drawn = []
    if report.get("speed") and speed_doc:
        tokens_per_s_bars(out / "tokens_per_s.png", report["speed"])
        latency_cdf(out / "latency_cdf.png", speed_doc)
        drawn += ["tokens_per_s.png", "latency_cdf.png"]
    if report.get("mmlu_comparison"):
        mmlu_delta(out / "mmlu_delta.png", report["mmlu_comparison"])
        drawn.append("mmlu_delta.png")
    return drawn
