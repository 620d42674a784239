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
    backend: str  # the rung's id within its batch size ("torch-eager", "unet_256-ngf16:openvino-int8")
    batch: int
    fn: object = None  # callable() -> None, one timed call
    sync: bool = False
    setup_s: float = 0.0
    skipped: str | None = None
    max_abs_err: float | None = None  # vs the same model's eager fp32 output on the same input
    times: list = field(default_factory=list)
    model: str = ""  # "unet_256-ngf64"
    runtime: str = ""  # what runs it: torch-eager, fastp2p, onnxruntime, openvino, tensorrt, torch-compile
    precision: str = "fp32"
    note: str = ""  # how it was built (inductor, OpenVINO hint, calibration set)
    reps: int = 1  # back-to-back calls per round (run_rounds): cheap rungs get about the baseline's wall time


def _pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def build_rungs(args, work: Path, G=None, *, cfg=None, model: str = "", prefix: str = "", inputs: dict | None = None,
                direction: str | None = None, files: dict | None = None) -> list[Rung]:
    """Rungs of every backend for generator ``G`` (default: unet_256 ngf 64, seeded random weights) at each batch of
    ``args.batch``: ``torch-eager`` (the baseline), ONNX Runtime fp32, TensorRT where present. ``cfg``: G's checkpoint
    config (its preprocessing goes into the export); ``model``: the rows' model label; ``prefix``: put before every
    rung id (students: ``"unet_256-ngf16:"``); ``inputs``: batch size -> the input tensor every rung of that batch
    takes (default: seeded uniform [-1, 1]); ``files``: receives ``{"onnx": path}`` of the fp32 export."""
    from fastp2p.engines.onnx import export_onnx, source_from_generator
    from fastp2p.engines.runtime import OnnxRuntimeGenerator, TensorRTGenerator, TorchGenerator, _flat_meta

    if G is None:
        torch.manual_seed(0)
        G = build_generator("unet_256")
    src = source_from_generator(G, cfg, crop_size=args.size, direction=direction)
    meta = _flat_meta(backend="torch", mode=args.mode, dropout=False, precision="fp32",
                      preprocessing=src.preprocessing, arch=src.arch, dynamic_hw=True)
    eager = TorchGenerator(copy.deepcopy(G), meta=dict(meta))
    # name -> (engine or the reason it is skipped, setup s, runtime, precision)
    engines: dict[str, tuple[object, float, str, str]] = {"torch-eager": (eager, 0.0, "torch-eager", "fp32")}

    if args.compile:
        compiled = TorchGenerator(copy.deepcopy(G), meta=dict(meta), compile=True)
        # compile time: measured at the first call per batch size
        engines["torch-compile"] = (compiled, 0.0, "torch-compile", "fp32")

    t0 = time.perf_counter()
    stem = prefix.rstrip(":").replace(":", "_") or "G"
    try:
        onnx_path = export_onnx(src, work / f"{stem}.onnx", mode=args.mode, dropout=False)
        if files is not None:
            files["onnx"] = onnx_path
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engines["onnxruntime"] = (OnnxRuntimeGenerator(onnx_path, device=device), export_s + time.perf_counter() - t0,
                                  "onnxruntime", "fp32")
        if device == "cpu" and args.spin:
            engines["onnxruntime-spin"] = (OnnxRuntimeGenerator(onnx_path, spin=True), 0.0, "onnxruntime", "fp32")
    except Exception as e:  # a missing optional dependency must not stop the other rungs
        engines["onnxruntime"] = (f"{type(e).__name__}: {e}", 0.0, "onnxruntime", "fp32")

    if torch.cuda.is_available():
        cuda_meta = dict(meta)
        cuda_eager = TorchGenerator(copy.deepcopy(G), meta=cuda_meta, device="cuda")
        engines["torch-eager-cuda"] = (cuda_eager, 0.0, "torch-eager", "fp32")
        from fastp2p.engines import tensorrt as engine_trt

        ok, why = engine_trt.tensorrt_available()
        for precision in ("fp16", "fp32"):
            name = f"tensorrt-{precision}"
            if not ok:
                engines[name] = (why, 0.0, "tensorrt", precision)
                continue
            t0 = time.perf_counter()
            p = export_onnx(src, work / f"{stem}_{precision}.onnx", mode=args.mode, precision=precision)
            plan = engine_trt.build_engine(p, work / f"{stem}_{precision}.plan", batch=(1, 8, max(args.batch)),
                                           timing_cache=work / "timing.cache")
            engines[name] = (TensorRTGenerator(plan, cuda_graph=True), time.perf_counter() - t0, "tensorrt",
                             precision)
    elif not prefix:  # one row says it for every model
        engines["tensorrt"] = ("no CUDA GPU here", 0.0, "tensorrt", "-")  # fp16 and fp32 rungs

    rungs = []
    for bs in args.batch:
        x = (inputs or {}).get(bs)
        if x is None:
            x = torch.rand(bs, 3, args.size, args.size, generator=torch.Generator().manual_seed(bs)) * 2 - 1
        ref = None
        for name, (engine, setup_s, runtime, precision) in engines.items():
            info = {"model": model, "runtime": runtime, "precision": precision}
            if isinstance(engine, str):
                rungs.append(Rung(prefix + name, bs, skipped=engine, **info))
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
            r = Rung(prefix + name, bs, call, sync, setup_s=setup_s + (first_s if name == "torch-compile" else 0.0),
                     max_abs_err=(y - ref).abs().max().item(), **info)
            for _ in range(args.warmup):
                call()
            rungs.append(r)
    return rungs


def run_rounds(rungs: list[Rung], rounds: int, per_round: dict) -> None:
    """Call by call interleaving: for each batch size, ``rounds * per_round`` rounds of ``r.reps`` back-to-back calls
    per rung (1 unless set: a rung many times cheaper than the baseline gets about the baseline's wall time per round
    instead of one call), so a burst of load from elsewhere on the machine hits every rung alike."""
    for bs in sorted(per_round):
        live = [r for r in rungs if r.batch == bs and not r.skipped]
        for _ in range(rounds * per_round[bs]):
            for r in live:
                for _ in range(r.reps):
                    t = time.perf_counter()
                    r.fn()
                    r.times.append(time.perf_counter() - t)


def summarize(rungs: list[Rung]) -> list[dict]:
    """One row per rung; ``speedup`` is against ``torch-eager`` (the teacher's eager fp32, no prefix) at the same
    batch, ``torch-eager-cuda`` for GPU rungs; ``speedup_own_eager`` against the rung's own model's eager rung."""
    base = {r.batch: r for r in rungs if r.backend == "torch-eager" and not r.skipped}
    base_cuda = {r.batch: r for r in rungs if r.backend == "torch-eager-cuda" and not r.skipped}
    own = {(r.model, r.batch): r for r in rungs if r.backend.endswith("torch-eager") and not r.skipped}
    rows = []
    for r in rungs:
        row = {"backend": r.backend, "batch": r.batch, "skipped": r.skipped, "model": r.model, "runtime": r.runtime,
               "precision": r.precision, "note": r.note}
        if not r.skipped:
            p50 = statistics.median(r.times)
            b = (base_cuda if r.backend.startswith("tensorrt") or r.backend.endswith("cuda") else base).get(r.batch)
            b50 = statistics.median(b.times) if b else None
            o = own.get((r.model, r.batch))
            o50 = statistics.median(o.times) if o and o.times and not r.backend.endswith("cuda") else None
            row.update(p50_ms=p50 * 1e3, p99_ms=_pct(r.times, 99) * 1e3, img_per_s=r.batch / p50,
                       speedup=(b50 / p50) if b50 else None, speedup_own_eager=(o50 / p50) if o50 else None,
                       calls=len(r.times), reps=r.reps, setup_s=r.setup_s, max_abs_err=r.max_abs_err, times_s=r.times)
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
    return lines + deploy_targets(rows)


OTHER_RUNTIMES = ("onnxruntime", "openvino")  # the runtimes fastp2p's own torch paths are held against


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def deploy_targets(rows: list[dict]) -> list[str]:
    """The deployment issue's targets (issue 16), from rows carrying ``model``/``runtime``/``precision``: the best
    fastp2p torch path of the teacher vs the best of ONNX Runtime and OpenVINO per precision at batch 1 and 8; INT8
    teacher >= 5x at batch 1 and >= 5.5x at batch 8; the smallest student in its fastest precision >= 30x and
    >= 250 img/s at batch 1. Ratios are against the teacher's eager fp32 at the same batch, in the same run."""
    live = [r for r in rows if not r["skipped"] and r.get("runtime") and r.get("speedup")]
    base = next((r for r in rows if r["backend"] == "torch-eager" and r.get("model")), None)
    if base is None or not any(r["runtime"] in OTHER_RUNTIMES + ("fastp2p",) for r in live):
        return []
    teacher = base["model"]
    students = sorted({r["model"] for r in rows if r.get("model") and r["model"] != teacher},
                      key=lambda m: min((r.get("params") or 0) for r in rows if r.get("model") == m))
    weights = {r.get("weights") for r in rows if r.get("model")}
    why = "random weights" if "random" in weights else "checkpoint weights"
    nb = max((r.get("neighbours") or 0) for r in rows)
    lines = [f"targets (issue 16; {why}; {nb} busy neighbour(s); its ratios are for a quiet machine):"]

    def best(model, bs, pred):
        rs = [r for r in live if r["model"] == model and r["batch"] == bs and pred(r)]
        return min(rs, key=lambda r: r["p50_ms"]) if rs else None

    def name(r):
        return r["backend"].split(":")[-1]

    for bs in sorted({r["batch"] for r in live if r["model"] == teacher and r["batch"] <= 8}):
        for prec in ("fp32", "bf16", "int8", "any"):
            def ours(r, prec=prec):
                return r["runtime"] == "fastp2p" and (prec in ("any", "int8") or r["precision"] == prec)

            def theirs(r, prec=prec):
                return r["runtime"] in OTHER_RUNTIMES and (prec == "any" or r["precision"] == prec)

            f, o = best(teacher, bs, ours), best(teacher, bs, theirs)
            if not f or not o:
                continue
            ratio = o["p50_ms"] / f["p50_ms"]
            what = "*" if prec == "int8" else ""
            lines.append(f"  {teacher} b{bs} {prec}{what}: {name(f)} {f['p50_ms']:.1f} ms vs {name(o)} "
                         f"{o['p50_ms']:.1f} ms: {ratio:.2f}x (>= 1): {_met(ratio >= 1)}")
    if any("int8*" in line for line in lines):
        lines.append("  * fastp2p has no int8 torch path: its fastest rung of any precision against the best int8")
    for bs, goal in ((1, 5.0), (8, 5.5)):
        r = best(teacher, bs, lambda r: r["precision"] == "int8")
        if r:
            lines.append(f"  INT8 {teacher} b{bs}: {name(r)} {r['speedup']:.2f}x eager fp32 (>= {goal}x): "
                         f"{_met(r['speedup'] >= goal)}")
    if students:
        small = students[0]
        r = best(small, 1, lambda r: True)
        if r:
            lines.append(f"  student {small} b1, fastest ({name(r)}): {r['speedup']:.1f}x (>= 30x): "
                         f"{_met(r['speedup'] >= 30)}; {r['img_per_s']:.0f} img/s (>= 250): "
                         f"{_met(r['img_per_s'] >= 250)}")
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
