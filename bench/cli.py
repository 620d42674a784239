"""``fastp2p bench {train,infer,data,kernels,all}``: a thin CLI over ``fastp2p.bench.ladder``.

``fastp2p bench`` (fastp2p/cli/bench.py) adds it with ``add_bench_subcommand(sub)``; standalone:
``python -m fastp2p.bench.cli train --quick``.
"""

from __future__ import annotations

import argparse
import sys


def _positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v!r}")
    return int(v)


def _count(v: str) -> int:
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {v!r}")
    return int(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("section", choices=("train", "infer", "data", "kernels", "all"), help="what to measure")
    p.add_argument("--quick", action="store_true", help="fewer repeats, same models (CPU train ladder: 129 s on a "
                   "2-core EPYC at load ~2.5, under 3 min when the cores are free)")
    p.add_argument("--contention", action="store_true",
                   help="train only: the main job (--preset debug) quiet vs beside one busy process, alternating, "
                   "3 runs each (bench/contention.py; ~3 min on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--json", default=None, metavar="PATH", help="write every number (and every repeat) here")
    p.add_argument("--plot", default=None, metavar="PNG", help="bar chart of the train ladder")
    p.add_argument("--large-batch", type=_positive, default=None,
                   help="the ladder's large batch (default: 16 GPU, 4 CPU)")
    p.add_argument("--compile-cpu", action="store_true", help="measure the compile rung on a CPU too (minutes)")
    p.add_argument("--neighbours", type=_count, default=0, metavar="N",
                   help="infer: N busy processes (python -c 'while True: pass') beside the timed calls; rows say "
                   "neighbours: N (default 0)")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="infer: a trained generator checkpoint (.safetensors / reference .pth) instead of the random "
                   "unet_256 ngf 64 teacher; same speed, meaningful max|err| and int8 error (default: random weights)")
    p.add_argument("--students", default=None, metavar="CKPT,CKPT",
                   help="infer: comma-separated student checkpoints instead of the random ngf 32 and ngf 16 "
                   "students (default: random weights)")
    # tests only: train ngf 8 unet_128 at 128x128; infer unet_256 at ngf 8/4/2 (it needs 256x256 inputs)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def add_bench_subcommand(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure speed against the reference baseline, side by side",
                       description="Benchmarks: the training ablation ladder, inference backends, data loaders and "
                       "fused kernels, each against a baseline measured in the same run. Table printed last.")
    add_arguments(p)
    return p


def run(args) -> int:
    import torch
    from fastp2p.bench import harness, ladder

    if getattr(args, "contention", False):
        if args.section != "train":
            print("fastp2p bench: --contention measures training only; use `fastp2p bench train --contention`",
                  file=sys.stderr)
            return 2
        from fastp2p.bench import contention

        return contention.run(argparse.Namespace(steps=60, rounds=3, neighbours=1, env=[]), args.json)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastp2p bench: --device cuda but no CUDA device is available here", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from pathlib import Path

    infer_only = [f for f, v in (("--neighbours", getattr(args, "neighbours", 0)), ("--teacher", getattr(
        args, "teacher", None)), ("--students", getattr(args, "students", None))) if v]
    if infer_only and args.section not in ("infer", "all"):
        print(f"fastp2p bench: {', '.join(infer_only)} apply to `fastp2p bench infer` (or all), not {args.section}",
              file=sys.stderr)
        return 2
    students = tuple(s for s in (getattr(args, "students", None) or "").split(",") if s)
    for flag, path in [("--teacher", getattr(args, "teacher", None))] + [("--students", s) for s in students]:
        if path and not Path(path).is_file():
            print(f"fastp2p bench: {flag} {path}: no such checkpoint file; give a fastp2p .safetensors (or a "
                  "reference .pth)", file=sys.stderr)
            return 2
    plan = ladder.Plan.make(device, args.quick, args.tiny, args.large_batch, args.compile_cpu,
                            neighbours=getattr(args, "neighbours", 0), teacher=getattr(args, "teacher", None),
                            students=students)
    result = ladder.run_bench(args.section, plan, log)
    result["config"]["argv"] = sys.argv[1:]
    if args.json:
        harness.write_json(result, args.json)
        log(f"JSON: {args.json}")
    if args.plot:
        if any(r["section"] == "train" for r in result["rows"]):
            try:
                harness.plot(result, args.plot)
                log(f"plot: {args.plot}")
            except Exception as e:  # e.g. no matplotlib on a bare GPU box: the numbers matter more
                log(f"--plot failed: {type(e).__name__}: {e}")
        else:
            log("--plot: no train ladder in this run; no plot written")
    sys.stdout.flush()
    other = [r for r in result["rows"] if r["section"] != "infer"]
    if other or not any(r["section"] == "infer" for r in result["rows"]):
        harness.print_table({**result, "rows": other})
    ladder.print_infer_table(result)  # its own columns (model, precision, params, GFLOP, p50/p99): printed last
    return 0


def main(argv=None) -> int:
    import os

    # Before torch loads (the OpenMP runtime reads it once): short spin-waits (fastp2p.perf.WAIT_ENV).
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    os.environ.setdefault("KMP_BLOCKTIME", "1")
    p = argparse.ArgumentParser(prog="fastp2p bench")
    add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
