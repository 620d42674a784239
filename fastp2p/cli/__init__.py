"""The ``fastp2p`` command line (see main.py for the layout); ``fastp2p.cli.main(argv)`` runs it."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
