"""Benchmarks: printed tables plus JSON/Markdown/PNG under bench/results/."""
