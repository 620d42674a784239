"""Benchmarks (installed as fastp2p.bench)."""
