"""The ``fastp2p`` command: one parser, one subcommand module per group, one ``main``.

    train      train.py        translate  translate.py (translate, pipe)     evaluate  evaluate.py (eval)
    deploy     checkpoints.py (convert, info), deploy.py (export, build-engine)     benchmark  bench.py
Shared argument builders and checks: args.py. Library modules take typed parameters and never import this package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import UserError
from . import bench, checkpoints, deploy, distill, evaluate, train, translate

# (group, [(command, one-line example)]): what `fastp2p --help` lists, in this order.
GROUPS = [
    ("train", [("train", "fastp2p train --preset facades --data datasets/facades --direction BtoA --amp"),
               ("distill", "fastp2p distill --teacher runs/facades --ngf 16 --data datasets/facades")]),
    ("translate", [("translate", "fastp2p translate photos/ --checkpoint G.safetensors -o out/"),
                   ("pipe", "ffmpeg ... -f rawvideo - | fastp2p pipe --size 640x360 --checkpoint G.safetensors | "
                            "ffmpeg ...")]),
    ("evaluate", [("eval", "fastp2p eval --checkpoint G.safetensors --data datasets/facades/val -o eval/G")]),
    ("deploy", [("export", "fastp2p export G.safetensors -o G.onnx --mode eval"),
                ("build-engine", "fastp2p build-engine G.onnx -o G.plan --precision fp16"),
                ("convert", "fastp2p convert latest_net_G.pth -o G.safetensors"),
                ("info", "fastp2p info G.safetensors")]),
    ("benchmark", [("bench", "fastp2p bench all --json bench.json")]),
]


class _Commands:
    """The subparsers as the subcommand modules see them: each ``add_parser(name, help=...)`` keeps its one-line help
    for the grouped listing below instead of argparse's flat one."""

    def __init__(self, sub):
        self._sub, self.help = sub, {}

    def add_parser(self, name: str, **kwargs):
        self.help[name] = kwargs.pop("help", "")
        return self._sub.add_parser(name, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line, ``fastp2p: error: <flag>: <problem> (<cmd> --help ...)``, exit 2
    (argparse prints the whole usage block first, several lines that bury the one that matters)."""

    def error(self, message: str):
        self.exit(2, f"fastp2p: error: {message} (`{self.prog} --help` lists the flags)\n")


def _listing(helps: dict[str, str]) -> str:
    lines = ["commands:"]
    for group, commands in GROUPS:
        lines.append(f"  {group}:")
        for name, example in commands:
            lines.append(f"    {name:<13} {helps.get(name, '')}")
            lines.append(f"    {'':<13}   e.g. {example}")
    return "\n".join(lines) + "\n\n`fastp2p COMMAND --help` lists a command's flags."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastp2p", description="Exact pix2pix, fast.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"fastp2p {__version__}")
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    train.add_parser(commands)
    distill.add_parser(commands)
    translate.add_parser(commands)
    translate.add_pipe_parser(commands)
    evaluate.add_parser(commands)
    deploy.add_parsers(commands)
    checkpoints.add_convert_parser(commands)
    checkpoints.add_info_parser(commands)
    bench.add_parser(commands)
    listed = {name for _, cmds in GROUPS for name, _ in cmds}
    assert listed == set(commands.help), f"GROUPS and the subcommands disagree: {listed ^ set(commands.help)}"
    parser.epilog = _listing(commands.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP reads these once, when torch loads (nothing above imports it): short spin-waits, so a thread waiting at
    # the end of a parallel region yields its core (fastp2p.perf.WAIT_ENV: 14-27x slower beside one busy process on
    # 2 cores with the default spinning, 2.4x with these). The user's own settings win.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    os.environ.setdefault("KMP_BLOCKTIME", "1")
    try:
        args = build_parser().parse_args(argv)
        # train --nproc N (or --gpu_ids 0,1) re-runs this command line under torchrun
        args.argv = list(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="fastp2p: %(message)s",
                            stream=sys.stderr)
        _image_warnings_are_errors()
        try:
            return args.func(args)
        except UserError as e:
            print(f"fastp2p: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fastp2p: interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:
        # The reader of stdout went away (`fastp2p info X | head -1`): stop quietly, as Unix tools do. fd 1 now points
        # at /dev/null so the interpreter's flush at exit does not fail again (the Python docs' SIGPIPE recipe).
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _stdout_to_devnull() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by something without a file descriptor
        pass


def _image_warnings_are_errors() -> None:
    """PIL only *warns* between its limit and twice that (DecompressionBombWarning) and decodes anyway; the command
    makes that an exception, which ``fastp2p.images.open_image`` reports as the same one-line --max_pixels error as
    larger images. Process-wide, so data loader workers (forked) inherit it."""
    import warnings

    from PIL import Image

    warnings.simplefilter("error", Image.DecompressionBombWarning)


if __name__ == "__main__":
    sys.exit(main())
