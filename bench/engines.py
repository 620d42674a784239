"""Inference engines benchmark: latency (p50, p99) and throughput of the pix2pix generator per backend.

    python -m fastp2p.bench.engines [--quick] [--mode eval|paper] [--batch 1,8,32] [--compile] [--json PATH]

Backends (rungs), all on the same unet_256 weights at 256x256, fp32 unless named: ``torch-eager`` (the baseline:
``with_mode(G, mode)`` called eagerly under ``inference_mode``), ``torch-compile`` (``--compile``; compile time is
reported apart), ``onnxruntime`` (the ``fastp2p export`` file through ``fastp2p.engines.runtime``, IO binding, CPU
provider, or CUDA where present; ``--spin`` adds one whose idle threads spin), and on a machine with TensorRT and a
GPU ``tensorrt-fp16`` / ``tensorrt-fp32`` (CUDA graphs on) plus ``torch-eager-cuda``, the GPU baseline.

Rungs run interleaved call by call: per batch size, rounds of one call of each rung, as many rounds as ``--rounds``
times about ``--calls`` seconds of the baseline, so a burst of load from elsewhere on a shared machine slows every rung
alike. Latency percentiles are over all timed calls; throughput is batch / p50. On CUDA every call is synchronized
before the clock stops. Warm-up calls are not timed. The table is printed last; the JSON beside it has every timing.

Targets (the engines issue): on a 2-core CPU, against torch-eager fp32, batch-1 latency at least 1.8x lower and
batch-8 throughput at least 1.3x higher; on an H100, TensorRT fp16 batch-1 p50 under 1 ms and batch-32 throughput at
least 3x torch-eager fp32 on the same GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastp2p.bench.core import cpu_model

from fastp2p import __version__
from fastp2p.models import build_generator


def environment() -> dict:
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads":
           torch.get_num_threads(), "fastp2p": __version__, "python": platform.python_version()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


@dataclass
class Rung:
    backend: str
    batch: int
    fn: object = None  # callable() -> None, one timed call
    sync: bool = False
    setup_s: float = 0.0
    skipped: str | None = None
    max_abs_err: float | None = None
    times: list = field(default_factory=list)


def _pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def build_rungs(args, work: Path) -> list[Rung]:
    from fastp2p.engines.onnx import export_onnx, source_from_generator
    from fastp2p.engines.runtime import OnnxRuntimeGenerator, TensorRTGenerator, TorchGenerator, _flat_meta

    torch.manual_seed(0)
    G = build_generator("unet_256")
    src = source_from_generator(G, None, crop_size=args.size)
    meta = _flat_meta(backend="torch", mode=args.mode, dropout=False, precision="fp32",
                      preprocessing=src.preprocessing, arch=src.arch, dynamic_hw=True)
    eager = TorchGenerator(copy.deepcopy(G), meta=dict(meta))
    engines: dict[str, tuple[object, float]] = {"torch-eager": (eager, 0.0)}

    if args.compile:
        compiled = TorchGenerator(copy.deepcopy(G), meta=dict(meta), compile=True)
        engines["torch-compile"] = (compiled, 0.0)  # compile time: measured at the first call per batch size

    t0 = time.perf_counter()
    try:
        onnx_path = export_onnx(src, work / "G.onnx", mode=args.mode, dropout=False)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engines["onnxruntime"] = (OnnxRuntimeGenerator(onnx_path, device=device), export_s + time.perf_counter() - t0)
        if device == "cpu" and args.spin:
            engines["onnxruntime-spin"] = (OnnxRuntimeGenerator(onnx_path, spin=True), 0.0)
    except Exception as e:  # a missing optional dependency must not stop the other rungs
        engines["onnxruntime"] = (f"{type(e).__name__}: {e}", 0.0)

    if torch.cuda.is_available():
        cuda_meta = dict(meta)
        cuda_eager = TorchGenerator(copy.deepcopy(G), meta=cuda_meta, device="cuda")
        engines["torch-eager-cuda"] = (cuda_eager, 0.0)
        from fastp2p.engines import tensorrt as engine_trt

        ok, why = engine_trt.tensorrt_available()
        for precision in ("fp16", "fp32"):
            name = f"tensorrt-{precision}"
            if not ok:
                engines[name] = (why, 0.0)
                continue
            t0 = time.perf_counter()
            p = export_onnx(src, work / f"G_{precision}.onnx", mode=args.mode, precision=precision)
            plan = engine_trt.build_engine(p, work / f"G_{precision}.plan", batch=(1, 8, max(args.batch)),
                                           timing_cache=work / "timing.cache")
            engines[name] = (TensorRTGenerator(plan, cuda_graph=True), time.perf_counter() - t0)
    else:
        engines["tensorrt"] = ("no CUDA GPU here", 0.0)

    rungs = []
    for bs in args.batch:
        x = torch.rand(bs, 3, args.size, args.size, generator=torch.Generator().manual_seed(bs)) * 2 - 1
        ref = None
        for name, (engine, setup_s) in engines.items():
            if isinstance(engine, str):
                rungs.append(Rung(name, bs, skipped=engine))
                continue
            xd = x.to(engine.device)
            sync = engine.device.type == "cuda"

            def call(engine=engine, xd=xd, sync=sync):
                engine(xd)
                if sync:
                    torch.cuda.synchronize()

            t0 = time.perf_counter()
            y = engine(xd).float().cpu()
            first_s = time.perf_counter() - t0
            if ref is None:
                ref = y
            r = Rung(name, bs, call, sync, setup_s=setup_s + (first_s if name == "torch-compile" else 0.0),
                     max_abs_err=(y - ref).abs().max().item())
            for _ in range(args.warmup):
                call()
            rungs.append(r)
    return rungs


def run_rounds(rungs: list[Rung], rounds: int, per_round: dict) -> None:
    """Call by call interleaving: for each batch size, ``rounds * per_round`` rounds of one call per rung, so a burst of
    load from elsewhere on the machine hits every rung alike."""
    for bs in sorted(per_round):
        live = [r for r in rungs if r.batch == bs and not r.skipped]
        for _ in range(rounds * per_round[bs]):
            for r in live:
                t = time.perf_counter()
                r.fn()
                r.times.append(time.perf_counter() - t)


def summarize(rungs: list[Rung]) -> list[dict]:
    base = {r.batch: r for r in rungs if r.backend == "torch-eager" and not r.skipped}
    base_cuda = {r.batch: r for r in rungs if r.backend == "torch-eager-cuda" and not r.skipped}
    rows = []
    for r in rungs:
        row = {"backend": r.backend, "batch": r.batch, "skipped": r.skipped}
        if not r.skipped:
            p50 = statistics.median(r.times)
            b = (base_cuda if r.backend.startswith("tensorrt") or r.backend.endswith("cuda") else base).get(r.batch)
            b50 = statistics.median(b.times) if b else None
            row.update(p50_ms=p50 * 1e3, p99_ms=_pct(r.times, 99) * 1e3, img_per_s=r.batch / p50,
                       speedup=(b50 / p50) if b50 else None, calls=len(r.times), setup_s=r.setup_s,
                       max_abs_err=r.max_abs_err, times_s=r.times)
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[str]:
    def row(backend, batch):
        return next((r for r in rows if r["backend"] == backend and r["batch"] == batch and not r["skipped"]), None)

    lines = []
    for backend in ("onnxruntime", "torch-compile"):
        r1, r8 = row(backend, 1), row(backend, 8)
        if r1 and r1["speedup"]:
            lines.append(f"{backend}: batch-1 latency {r1['speedup']:.2f}x lower than torch-eager (target >= 1.8x): "
                         f"{'met' if r1['speedup'] >= 1.8 else 'NOT met'}")
        if r8 and r8["speedup"]:
            lines.append(f"{backend}: batch-8 throughput {r8['speedup']:.2f}x torch-eager (target >= 1.3x): "
                         f"{'met' if r8['speedup'] >= 1.3 else 'NOT met'}")
    t1, t32 = row("tensorrt-fp16", 1), row("tensorrt-fp16", 32)
    if t1:
        lines.append(f"tensorrt-fp16: batch-1 p50 {t1['p50_ms']:.3f} ms (target < 1 ms): "
                     f"{'met' if t1['p50_ms'] < 1 else 'NOT met'}")
    if t32 and t32["speedup"]:
        lines.append(f"tensorrt-fp16: batch-32 throughput {t32['speedup']:.2f}x torch-eager-cuda (target >= 3x): "
                     f"{'met' if t32['speedup'] >= 3 else 'NOT met'}")
    return lines


def print_table(rows: list[dict], env: dict, args) -> None:
    print(f"\nunet_256 generator, {args.size}x{args.size}, {args.mode} mode; {env['cpu']} ({env['cores']} cores)"
          + (f", {env['gpu']}" if "gpu" in env else ""))
    head = (f"{'backend':<18}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'ms/img':>9}{'img/s':>8}{'vs eager':>10}"
            f"{'max|err|':>10}{'calls':>7}{'setup s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["skipped"]:
            print(f"{r['backend']:<18}{r['batch']:>6}  skipped: {r['skipped']}")
            continue
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['backend']:<18}{r['batch']:>6}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}"
              f"{r['p50_ms'] / r['batch']:>9.1f}{r['img_per_s']:>8.2f}{sp:>10}{r['max_abs_err']:>10.1e}"
              f"{r['calls']:>7}{r['setup_s']:>9.1f}")
    for line in targets(rows):
        print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("eval", "paper"), default="eval")
    p.add_argument("--batch", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=float, default=2.0, help="seconds of baseline calls per round (>= 1 call)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--spin", action="store_true", help="add an ONNX Runtime rung with spinning worker threads")
    p.add_argument("--compile", action="store_true", help="add a torch.compile rung (minutes to compile on a CPU)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call, ~1 s of calls per round")
    p.add_argument("--json", default="bench-engines.json")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.quick:
        args.rounds, args.warmup, args.calls = 3, 1, 1.0
    env = environment()
    with tempfile.TemporaryDirectory(prefix="fastp2p-bench-") as work:
        rungs = build_rungs(args, Path(work))
        # calls per round: about args.calls seconds of the baseline at that batch size, at least 1
        per_round = {}
        for bs in args.batch:
            base = next((r for r in rungs if r.batch == bs and r.backend == "torch-eager"), None)
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                base.fn()
                ts.append(time.perf_counter() - t)
            per_round[bs] = max(1, int(args.calls / max(min(ts), 1e-4)))
        run_rounds(rungs, args.rounds, per_round)
    rows = summarize(rungs)
    result = {"env": env, "config": vars(args), "rows": rows, "targets": targets(rows),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {args.json}")
    print_table(rows, env, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
