"""``fastp2p bench``: the benchmarks keep their own arguments (``fastp2p.bench.cli``); added here as a subcommand."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..bench.cli import add_bench_subcommand

    add_bench_subcommand(sub)
