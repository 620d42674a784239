"""The GPU plan behind ``bash bench/gpu.sh``: a budgeted, prioritized list of steps, each run in its own subprocess,
each streaming one JSON line per finished measurement, so a run that is killed at any point keeps what it measured.

    python -m fastp2p.bench.gpu_plan run OUTDIR [--budget SECONDS] [--dry-run]    # what gpu.sh calls
    python -m fastp2p.bench.gpu_plan --table OUTDIR                               # the table, from OUTDIR/results.jsonl

Steps, in priority order (``PLAN``): environment + versions + API and import checks; compiled Triton kernels vs an fp64
reference at the real norm sites (N=16, bf16 and fp32, channels-last, poisoned outputs); kernel timings vs cuDNN batch
norm + LeakyReLU; the eager train step at batch 1 / 16 / 64 (``--kernels torch|triton``, AMP, channels-last); the
CUDA-graph step; ``--compile`` at batch 16; inference; loaders; the fused U-Net skip path at batch 16 (relu_cat, norm
slice writes); ``pytest -m gpu``; ``--compile`` with the Triton ops.

Budget: before a step starts its estimate is compared with the budget left; a step that does not fit is recorded as
skipped (with the numbers) instead of started, and the plan goes on with the next one (a cheaper one may still fit).
A started step runs under ``min(its own timeout, budget left)``; on expiry its whole process group is killed (inductor's
compile workers included) and the step is recorded as ``timeout`` with the last lines of its log (``OUTDIR/logs/``).

Rows (``OUTDIR/results.jsonl``, appended with one ``write`` per line and closed at once, so each is on disk before the
next measurement starts): ``kind`` ``plan`` (the driver's start), ``step`` (a step's status: started, ok, skipped,
failed, timeout, killed) and ``measure`` (one measurement; ``label`` + ``summary`` for the table, every number in its
own field, backend flags where they matter).

``--dry-run``: the same plan on the CPU with tiny shapes (unet_128, ngf 4) and a few repeats, CUDA hidden and Triton in
interpreter mode, so CI tests the script itself (tests/test_gpu_script.py); estimates and timeouts are the dry ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

SCHEMA = "fastp2p.gpu/1"
RESULTS = "results.jsonl"
SKIP_RC = 3  # a step's exit status for "nothing to measure here" (reason on its last output line)
REPO = Path(__file__).resolve().parents[1]

# The real norm-kernel timing shapes (issue 17): G's outermost down/up levels at batch 16 and 64, D's last norm.
KERNEL_SHAPES = [(16, 64, 128, 128), (64, 64, 128, 128), (16, 512, 31, 31)]
DRY_KERNEL_SHAPES = [(2, 8, 16, 16), (4, 8, 16, 16), (2, 32, 7, 7)]
DRY_BATCH = {1: 1, 16: 2, 64: 4}  # dry-run stand-ins for the GPU batch sizes


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    title: str
    estimate_s: float  # GPU (H100/H200 class, cold caches): subprocess start + CUDA init + the work
    timeout_s: float
    dry_estimate_s: float  # --dry-run on 2 CPU cores
    dry_timeout_s: float
    env: tuple = ()  # extra environment variables for the step's process
    args: dict = dataclasses.field(default_factory=dict)


PLAN: list[Step] = [
    Step("env", "environment, versions, API + import checks", 25, 90, 10, 60),
    # (every norm site, both dtypes, for each Triton implementation: ~60 cases, mostly Triton's compile time)
    Step("kernels_exact", "compiled Triton kernels vs fp64 reference, real norm sites, N=16", 75, 180, 10, 90),
    Step("kernels_timing", "fused norm+LeakyReLU vs cuDNN BN + LeakyReLU", 45, 120, 10, 60),
    # (batch 1's first Triton step compiles new specializations: N == 1 is its own one)
    Step("train_b1", "eager train step, batch 1", 50, 150, 20, 90, args={"batch": 1}),
    Step("train_b16", "eager train step, batch 16 (+ the other Triton implementation)", 45, 120, 10, 60,
         args={"batch": 16}),
    Step("train_b64", "eager train step, batch 64", 45, 150, 12, 60, args={"batch": 64}),
    Step("cuda_graph", "CUDA-graph train step", 40, 150, 2, 30),
    Step("compile_b16", "--compile --kernels torch, batch 16", 150, 300, 30, 120,
         env=(("TORCH_LOGS", "recompiles,graph_breaks"),), args={"kernels": "torch"}),
    Step("infer", "generator inference, eval mode", 40, 120, 10, 60),
    Step("loaders", "loaders into the trainer's device", 45, 120, 8, 60),
    Step("train_skips", "eager train step, batch 16, fused U-Net skips (relu_cat, norm writes)", 35, 120, 10, 60),
    Step("pytest_gpu", "pytest -m gpu", 120, 240, 20, 120, args={"target": ["tests"], "marker": "gpu",
                                                                  "dry_target": ["tests/test_gpu.py"]}),
    Step("compile_b16_triton", "--compile --kernels triton, batch 16", 150, 300, 40, 120,
         env=(("TORCH_LOGS", "recompiles,graph_breaks"),), args={"kernels": "triton"}),
    # tests/test_kernels.py runs the compiled kernels where CUDA is (the interpreter elsewhere): its edge shapes
    Step("pytest_kernels", "pytest tests/test_kernels.py, compiled", 90, 180, 30, 120,
         args={"target": ["tests/test_kernels.py"], "dry_target": ["tests/test_kernels.py", "-k", "bottleneck"]}),
]
STEPS = {s.name: s for s in PLAN}


class StepSkip(Exception):
    """Raised inside a step: nothing to measure on this machine (the reason is recorded)."""


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------
def append_row(outdir: Path, row: dict) -> None:
    """One JSON line, written with one call and closed (flushed) before returning."""
    line = json.dumps({"schema": SCHEMA, "t": round(time.time(), 3), **row}, default=str) + "\n"
    with open(Path(outdir) / RESULTS, "a", encoding="utf-8") as f:
        f.write(line)


def read_rows(outdir: Path) -> tuple[list[dict], int]:
    """The rows of ``OUTDIR/results.jsonl`` and the number of unreadable lines (a write cut by a kill)."""
    path = Path(outdir) / RESULTS
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


class Recorder:
    """A step's measurement rows. ``sleep_after_first`` (tests): stall after the first row, to be killed there."""

    def __init__(self, outdir: Path, step: str, dry: bool, sleep_after_first: float = 0.0):
        self.outdir, self.step, self.dry = Path(outdir), step, dry
        self.sleep_after_first = sleep_after_first
        self.count = 0

    def row(self, what: str, label: str, summary: str = "", **fields) -> dict:
        row = {"kind": "measure", "step": self.step, "what": what, "label": label, "summary": summary,
               "dry_run": self.dry, **fields}
        append_row(self.outdir, row)
        self.count += 1
        print(f"[{self.step}] {label}: {summary}", flush=True)
        if self.count == 1 and self.sleep_after_first:
            time.sleep(self.sleep_after_first)
        return row


def _first_line(e: BaseException, n: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:n] if text else ''}"


# ---------------------------------------------------------------------------------------------------------------------
# Measurement helpers (run inside a step's process)
# ---------------------------------------------------------------------------------------------------------------------
def backend_flags() -> dict:
    """TF32 / cuDNN flags as both torch APIs report them. Each read is guarded: once the new ``fp32_precision`` API
    has been written with a value the legacy flags do not express, reading a legacy flag raises (the "mix of the
    legacy and new APIs" RuntimeError); the row then says so instead of losing the step."""
    import warnings

    import torch

    b = torch.backends
    getters = {
        "cuda.matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
        "cuda.matmul.fp32_precision": lambda: b.cuda.matmul.fp32_precision,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cudnn.allow_tf32": lambda: b.cudnn.allow_tf32,
        "cudnn.conv.fp32_precision": lambda: b.cudnn.conv.fp32_precision,
        "cudnn.benchmark": lambda: b.cudnn.benchmark,
        "cudnn.deterministic": lambda: b.cudnn.deterministic,
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, get in getters.items():
            try:
                out[k] = get()
            except Exception as e:  # noqa: BLE001 - a flag that cannot be read is itself the finding
                out[k] = f"error: {_first_line(e, 120)}"
    return out


def set_legacy_tf32(on: bool) -> None:
    """TF32 through the legacy setters only, as ``fastp2p.train.Trainer`` does: they keep the new ``fp32_precision``
    state in step, while a write through the new API leaves the legacy state behind and makes every later legacy read
    raise (inductor's cache keys read it in torch 2.9-2.11). Never mix: this repo writes the legacy flags only."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, reps: int, device: str, warmup: int = 0) -> tuple[list[float], list[float]]:
    """(device ms, host ms) per call. CUDA: events around each call, synchronized per call (latency, not overlap);
    host ms is the time until ``fn`` returned (launch cost). CPU: wall time for both."""
    for _ in range(warmup):
        fn()
    _sync(device)
    dev, host = [], []
    if device == "cuda":
        import torch

        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t) * 1e3)
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end))
        return dev, host
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        dev.append((time.perf_counter() - t) * 1e3)
    return dev, list(dev)


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"median": round(statistics.median(s), 4), "min": round(s[0], 4),
            "p90": round(s[min(len(s) - 1, int(0.9 * len(s)))], 4), "n": len(s)}


def count_launches(fn, device: str) -> dict:
    """Device work per call of ``fn`` by torch.profiler: CUDA kernels and memcpy/memset ops on a GPU; on a CPU (dry
    run) the top-level aten ops, a stand-in that exercises the same code."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
            _sync(device)
        events = prof.events()
        if device == "cuda":
            dev = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
            # the host's view: kernel launch calls vs whole-graph launches (a replayed CUDA graph is one call)
            names = [e.name for e in events if e.device_type != torch.autograd.DeviceType.CUDA]
            return {"launches": len(kernels), "memops": len(dev) - len(kernels),
                    "host_launch_calls": sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for n in names),
                    "graph_launches": sum(n.startswith(("cudaGraphLaunch", "cuGraphLaunch")) for n in names),
                    "launches_by": "torch.profiler CUDA kernels"}
        top = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        return {"launches": len(top), "launches_by": "torch.profiler top-level aten ops (CPU stand-in)"}
    except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: the timing still counts
        return {"launches": None, "launches_error": _first_line(e)}


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    from fastp2p.bench.core import peak_rss_mb

    return round(peak_rss_mb(), 1)


def fp32_tolerance(n: int) -> float:
    """Max error over max(1, max |ref|) for fp32 against float64 when sums run over ``n`` values per channel:
    tests/test_kernels.py's 2e-5 for n <= 512, grown like a random walk of roundings (sqrt(n))."""
    return 2e-5 * max(1.0, math.sqrt(n / 512))


TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}  # storage rounding: 2^-7 / 2^-11 relative, with margin


def max_rel_err(actual, ref) -> float:
    """Max abs error over max(1, max |ref|); NaN (a poisoned element left unwritten) counts as infinite."""
    import torch

    d = (actual.double() - ref.double()).abs()
    d = torch.nan_to_num(d, nan=math.inf)
    return (d.max() / max(1.0, ref.abs().max().item())).item() if d.numel() else 0.0


def _need_gpu(ctx: Ctx) -> None:
    """A GPU step outside the dry run, on a machine without CUDA: nothing to measure (full sizes on a CPU would only
    run into the timeout)."""
    if not ctx.dry and ctx.device != "cuda":
        raise StepSkip("no CUDA device here: run with a GPU, or with --dry-run on a CPU")


@dataclasses.dataclass
class Ctx:
    rec: Recorder
    dry: bool
    device: str
    outdir: Path
    args: dict


# ---------------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 15) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Every torch API the GPU path calls (trainer, kernels, CUDA graphs, compile, bench); checked to exist on the machine.
TORCH_APIS = (
    "torch.library.custom_op", "torch.library.triton_op", "torch.library.wrap_triton", "torch.library.register_fake",
    "torch.cuda.CUDAGraph", "torch.cuda.graph", "torch.cuda.graph_pool_handle", "torch.cuda.make_graphed_callables",
    "torch.cuda.Event", "torch.cuda.is_bf16_supported", "torch.cuda.max_memory_allocated",
    "torch.cuda.reset_peak_memory_stats", "torch.amp.GradScaler", "torch.autocast", "torch.compile",
    "torch.compiler.reset", "torch._dynamo.utils.counters", "torch.profiler.profile",
    "torch.utils.flop_counter.FlopCounterMode", "torch.backends.cuda.matmul.fp32_precision",
    "torch.backends.cudnn.conv.fp32_precision", "torch.export.Dim", "torch.onnx.export",
)
# Subpackages whose modules the import check walks (a module starting with "_" or "test_" is not imported).
PACKAGES = ("fastp2p", "fastp2p.cli", "fastp2p.models", "fastp2p.data", "fastp2p.kernels", "fastp2p.engines",
            "fastp2p.bench")


def _resolve(path: str):
    import importlib

    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, p)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i + 1]))
    return obj


def api_check() -> dict:
    """{name: "ok" | "missing" | "error: ..."} for ``TORCH_APIS``, Adam's ``fused``/``capturable`` arguments and
    every ``tl.X`` / ``triton.X`` name the kernel sources use."""
    import inspect

    out = {}
    for name in TORCH_APIS:
        try:
            _resolve(name)
            out[name] = "ok"
        except (AttributeError, ImportError):
            out[name] = "missing"
        except Exception as e:  # noqa: BLE001 - present, but reading it raises (e.g. the TF32 API mix)
            out[name] = f"error: {_first_line(e, 120)}"
    import torch

    params = inspect.signature(torch.optim.Adam).parameters
    for arg in ("fused", "capturable"):
        out[f"torch.optim.Adam({arg}=)"] = "ok" if arg in params else "missing"
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        out["triton"] = f"missing: {_first_line(e)}"
        return out
    import importlib.util

    spec = importlib.util.find_spec("fastp2p.kernels")
    names: set[tuple[str, str]] = set()
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for src in Path(loc).glob("*.py"):
            text = src.read_text()
            names |= {("tl", m) for m in re.findall(r"\btl\.(\w+)", text)}
            names |= {("triton", m) for m in re.findall(r"\btriton\.(\w+)", text) if m != "language"}
    for mod_name, attr in sorted(names):
        out[f"{mod_name}.{attr}"] = "ok" if hasattr(tl if mod_name == "tl" else triton, attr) else "missing"
    return out


def module_names() -> list[str]:
    import importlib
    import pkgutil

    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        try:
            mod = importlib.import_module(pkg)
        except BaseException:  # noqa: BLE001 - reported by import_check
            continue
        for info in pkgutil.iter_modules(mod.__path__):
            if not info.ispkg and not info.name.startswith(("_", "test_")):
                names.append(f"{pkg}.{info.name}")
    return list(dict.fromkeys(names))


def import_check() -> dict:
    import importlib

    out = {}
    for name in module_names():
        try:
            importlib.import_module(name)
            out[name] = "ok"
        except BaseException as e:  # noqa: BLE001 - SystemExit or a missing library is a finding, not a crash
            out[name] = _first_line(e, 200)
    return out


def tf32_check(device: str) -> dict:
    """What the Trainer's flag setting leaves (legacy API, fastp2p/train.py), whether every flag still reads, a
    matmul + conv on the device, and whether this torch raises on a legacy read after a new-API write."""
    import warnings

    import torch

    out: dict = {"before": backend_flags()}
    set_legacy_tf32(True)  # as fastp2p.train.SPEED_FLAGS sets them around a step
    out["after_legacy_tf32"] = backend_flags()
    out["consistent"] = not any(str(v).startswith("error") for v in out["after_legacy_tf32"].values())
    if device == "cuda":
        try:
            a = torch.randn(256, 256, device="cuda")
            w = torch.randn(8, 8, 3, 3, device="cuda")
            (a @ a).sum().item()
            torch.nn.functional.conv2d(torch.randn(1, 8, 16, 16, device="cuda"), w).sum().item()
            out["matmul_conv"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["matmul_conv"] = _first_line(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.backends.cuda.matmul.fp32_precision = "ieee"  # new-API write that the legacy state does not follow
            _ = torch.backends.cuda.matmul.allow_tf32
            out["legacy_read_after_new_write"] = "no error"
        except RuntimeError as e:
            out["legacy_read_after_new_write"] = f"raises ({_first_line(e, 100)})"
        except Exception as e:  # noqa: BLE001 - e.g. an older torch without fp32_precision
            out["legacy_read_after_new_write"] = f"n/a ({_first_line(e, 100)})"
        finally:
            with contextlib.suppress(Exception):
                set_legacy_tf32(False)  # the legacy setters rewrite both states: consistent again
                torch.backends.cudnn.allow_tf32 = True  # torch's default
    out["restored"] = backend_flags()
    return out


def step_env(ctx: Ctx) -> None:
    rec = ctx.rec
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    nvcc = _run(["nvcc", "--version"])
    ncu = _run(["ncu", "--version"])
    git = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if smi and shutil.which("nvidia-smi"):
        (ctx.outdir / "nvidia-smi.txt").write_text((_run(["nvidia-smi"]) or "") + "\n")
    rec.row("host", "host", f"{platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}"
            + (f"; {smi.splitlines()[0]}" if smi else "; no nvidia-smi"),
            python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
            cores=os.cpu_count(), nvidia_smi=smi, nvcc=nvcc.splitlines()[-1] if nvcc else None,
            ncu=ncu.splitlines()[-1] if ncu else None, git_sha=git if git and len(git) == 40 else None,
            env={k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "TORCH_LOGS",
                                                "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR")})
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    ctx.device = "cuda" if cuda else "cpu"
    gpu = {}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1),
               "sms": p.multi_processor_count, "bf16": torch.cuda.is_bf16_supported(),
               "device_count": torch.cuda.device_count()}
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "triton": triton_v, **{d: version(d) for d in ("numpy", "pillow", "safetensors", "onnx",
                                                                 "onnxruntime", "onnxscript", "tensorrt",
                                                                 "nvidia-dali-cuda130", "av", "scipy")}}
    rec.row("versions", "versions", f"torch {versions['torch']} (CUDA {versions['cuda']}, cuDNN {versions['cudnn']}), "
            f"triton {triton_v}; " + (f"{gpu['gpu']} cc {gpu['capability']}, {gpu['memory_gb']} GiB" if cuda
                                      else "no CUDA device"),
            device=ctx.device, **versions, **gpu, backend_flags=backend_flags())
    apis = api_check()
    bad = {k: v for k, v in apis.items() if v != "ok"}
    rec.row("api", "APIs the GPU path uses", f"{len(apis) - len(bad)}/{len(apis)} present"
            + (f"; not: {', '.join(f'{k} ({v})' for k, v in bad.items())}" if bad else ""), apis=apis, missing=bad)
    tf = tf32_check(ctx.device)
    rec.row("tf32", "TF32 flags (legacy setters, as the Trainer)",
            f"flags readable after the Trainer's setting: {tf['consistent']}; legacy read after a new-API write: "
            f"{tf['legacy_read_after_new_write']}" + (f"; matmul+conv {tf['matmul_conv']}" if "matmul_conv" in tf
                                                      else ""), **tf)
    imports = import_check()
    failed = {k: v for k, v in imports.items() if v != "ok"}
    rec.row("imports", "import every fastp2p module", f"{len(imports) - len(failed)}/{len(imports)} ok"
            + (f"; failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else ""),
            modules=imports, failed=failed)


def _norm_sites(ctx: Ctx) -> list[dict]:
    """The distinct (shape, act) norm sites of unet_256 + the basic PatchGAN (bench/kernels.norm_sites), batch 16;
    dry run: the same sites shrunk to <= 16 channels and <= 8x8, batch 2."""
    from fastp2p.bench.kernels import norm_sites

    seen, sites = set(), []
    for s in norm_sites(256, "batch"):
        C, H, W = s["shape"]
        shape = (2, min(C, 16), min(H, 8), min(W, 8)) if ctx.dry else (16, C, H, W)
        if (shape, s["act"]) not in seen:
            seen.add((shape, s["act"]))
            sites.append({**s, "shape": shape})
    return sites


def variants() -> list:
    """The Triton implementations FusedNormAct offers (``kernels.norm_act.VARIANTS``, default first); ``[None]`` for a
    kernels module without variants."""
    from fastp2p.kernels import norm_act as na

    vs = list(getattr(na, "VARIANTS", ()))
    if not vs:
        return [None]
    default = na.default_variant() if hasattr(na, "default_variant") else vs[0]
    return [default] + [v for v in vs if v != default]


def check_site(shape, dtype, stats: str, act: str, device: str, variant: str | None = None) -> dict:
    """One fwd + bwd of ``FusedNormAct`` (the Triton kernels, outputs poisoned with NaN) against ``norm_act_reference``
    in float64 on the same rounded inputs: y, dx, dweight, dbias and, for batch statistics, the updated running
    mean / variance (momentum 0.1, unbiased variance, as nn.BatchNorm2d). Channels-last in, channels-last out."""
    import inspect

    import torch
    from fastp2p.kernels import FusedNormAct
    from fastp2p.kernels import norm_act as na
    from torch import nn

    N, C, H, W = shape
    g = torch.Generator(device=device).manual_seed(zlib.crc32(repr((shape, stats, act)).encode()))
    cl = torch.channels_last
    x = (torch.randn(shape, device=device, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=cl)
    dy = torch.randn(shape, device=device, generator=g).to(dtype).contiguous(memory_format=cl)
    w = torch.randn(C, device=device, generator=g) * 0.5 + 1
    b = torch.randn(C, device=device, generator=g) * 0.5
    rm, rv = torch.randn(C, device=device, generator=g), torch.rand(C, device=device, generator=g) + 0.5
    norm = (nn.InstanceNorm2d(C, affine=True) if stats == "instance" else nn.BatchNorm2d(C)).to(device)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
        if stats != "instance":
            norm.running_mean.copy_(rm)
            norm.running_var.copy_(rv)
    norm.train(stats != "running")
    kw = {"variant": variant} if variant and "variant" in inspect.signature(FusedNormAct).parameters else {}
    m = FusedNormAct(norm, act, 0.2, "triton", **kw)
    xk = x.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    with na.poisoned_outputs():
        y = m(xk)
        y.backward(dy)
    _sync(device)
    first_s = time.perf_counter() - t0
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    yr, mr, vr = na.norm_act_reference(xr, wr, br, rm.double(), rv.double(), stats, act, 1e-5, 0.2)
    yr.backward(dy.double())
    errs = {"y": max_rel_err(y, yr), "dx": max_rel_err(xk.grad, xr.grad), "dw": max_rel_err(m.weight.grad, wr.grad),
            "db": max_rel_err(m.bias.grad, br.grad)}
    n = H * W * (1 if stats == "instance" else N)
    if stats == "batch":
        errs["running_mean"] = max_rel_err(m.running_mean, rm.double() * 0.9 + 0.1 * mr)
        errs["running_var"] = max_rel_err(m.running_var, rv.double() * 0.9 + 0.1 * vr * n / (n - 1))
    dt = str(dtype).replace("torch.", "")
    tol = fp32_tolerance(n) if dtype == torch.float32 else TOLERANCE[dt]
    tols = {k: (fp32_tolerance(n) if k.startswith("running") else tol) for k in errs}  # fp32 buffers either way
    cl_kept = y.is_contiguous(memory_format=cl) and xk.grad.is_contiguous(memory_format=cl)
    ok = all(errs[k] <= tols[k] for k in errs)
    worst = max(errs.values())
    return {"shape": list(shape), "dtype": dt, "stats": stats, "act": act, "variant": getattr(m, "variant", None),
            "n_per_channel": n, "errors": {k: float(f"{v:.3g}") for k, v in errs.items()},
            "max_err": float(f"{worst:.3g}"), "tolerance": float(f"{tol:.3g}"), "channels_last_kept": cl_kept,
            "pass": bool(ok and cl_kept), "first_call_s": round(first_s, 3)}


def step_kernels_exact(ctx: Ctx) -> None:
    import torch
    from fastp2p.kernels import norm_act as na

    if not na.triton_usable(ctx.device):
        raise StepSkip(f"the Triton kernels cannot run on {ctx.device} here (Triton missing, or no CUDA and no "
                       "TRITON_INTERPRET=1)")
    sites = _norm_sites(ctx)
    if ctx.dry:  # one site per activation is enough to exercise the step
        sites = list({s["act"]: s for s in reversed(sites)}.values())
    # training statistics at every site; per-sample (paper-mode inference) and running (eval) at one or two of them.
    # The default implementation first (all cases), then the others on the training-statistics cases: a timeout
    # keeps the rows that matter most.
    cases = [(s, "batch") for s in sites] + [(s, st) for s in sites[:1 if ctx.dry else 2]
                                             for st in ("instance", "running")]
    results = []
    for k, variant in enumerate(variants()):
        for dtype in (torch.float32, torch.bfloat16):
            for site, stats in cases if k == 0 else [c for c in cases if c[1] == "batch"]:
                label = (f"{site['site']} {'x'.join(map(str, site['shape']))} {str(dtype)[6:]} {stats}"
                         + (f" {variant}" if variant else ""))
                try:
                    r = check_site(site["shape"], dtype, stats, site["act"], ctx.device, variant)
                except Exception as e:  # noqa: BLE001 - a failing case is a row
                    r = {"shape": list(site["shape"]), "dtype": str(dtype)[6:], "stats": stats, "variant": variant,
                         "pass": False, "error": _first_line(e)}
                results.append(r)
                summary = (f"FAILED {r['error']}" if "error" in r else
                           f"{'pass' if r['pass'] else 'FAIL'}: max err {r['max_err']:.2g} (tol "
                           f"{r['tolerance']:.2g}), first call {r['first_call_s']:.2f} s")
                ctx.rec.row("kernel_check", label, summary, site=site["site"], interpreter=na._interpreting(), **r)
    bad = [r for r in results if not r["pass"]]
    ctx.rec.row("kernel_check_summary", "all kernel checks", f"{len(results) - len(bad)}/{len(results)} pass"
                + (f"; failed: {', '.join(str(r['shape']) + ' ' + r['dtype'] for r in bad)}" if bad else ""),
                passed=len(results) - len(bad), total=len(results))


def _copy_gbs(device: str, nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), 10 if device == "cuda" else 3, device, warmup=2)
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9


def step_kernels_timing(ctx: Ctx) -> None:
    import copy

    import torch
    from fastp2p.kernels import FusedNormAct
    from fastp2p.kernels import norm_act as na
    from torch import nn

    dev = ctx.device
    copy_gbs = _copy_gbs(dev, (1 << 30) if dev == "cuda" else (1 << 24))
    ctx.rec.row("copy_bandwidth", "copy bandwidth (dst.copy_(src), read + write)", f"{copy_gbs:.0f} GB/s",
                copy_gbs=round(copy_gbs, 1))
    reps, warm = (30, 5) if dev == "cuda" else (2, 0)
    triton_ok = na.triton_usable(dev)
    for k, shape in enumerate(DRY_KERNEL_SHAPES if ctx.dry else KERNEL_SHAPES):
        for dtype in (torch.float32, torch.bfloat16) if not (ctx.dry and k) else (torch.float32,):
            C = shape[1]
            bn = nn.BatchNorm2d(C).to(dev)
            cands = {"cudnn bn+lrelu NCHW": (nn.Sequential(copy.deepcopy(bn), nn.LeakyReLU(0.2)), False),
                     "cudnn bn+lrelu CL": (nn.Sequential(copy.deepcopy(bn), nn.LeakyReLU(0.2)), True)}
            for j, variant in enumerate(variants() if triton_ok else []):
                kw = {"variant": variant} if variant else {}
                tag = f"triton{' ' + variant if variant else ''}"
                cands[f"{tag} CL"] = (FusedNormAct(copy.deepcopy(bn), "leaky_relu", 0.2, "triton", **kw), True)
                if not ctx.dry and j == 0:  # NCHW for the default one (the dry run: one Triton candidate is enough)
                    cands[f"{tag} NCHW"] = (FusedNormAct(copy.deepcopy(bn), "leaky_relu", 0.2, "triton", **kw), False)
                if ctx.dry:
                    break
            x0 = torch.randn(shape, device=dev).to(dtype)
            rows = []
            for name, (mod, cl) in cands.items():
                fmt = torch.channels_last if cl else torch.contiguous_format
                x = x0.contiguous(memory_format=fmt).requires_grad_(True)
                dy = torch.randn_like(x)
                mod.train()

                def fwd(mod=mod, x=x):
                    with torch.no_grad():
                        mod(x)

                def fwd_bwd(mod=mod, x=x, dy=dy):
                    mod(x).backward(dy)
                    x.grad = None

                label = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {name}"
                try:
                    t0 = time.perf_counter()
                    fwd_bwd()
                    _sync(dev)
                    first_s = time.perf_counter() - t0
                    f_ms, _ = timed(fwd, reps, dev, warm)
                    fb_ms, _ = timed(fwd_bwd, reps, dev, warm)
                    lf, lfb = count_launches(fwd, dev), count_launches(fwd_bwd, dev)
                except Exception as e:  # noqa: BLE001
                    ctx.rec.row("kernel_time", label, f"FAILED {_first_line(e)}", shape=list(shape),
                                dtype=str(dtype)[6:], candidate=name, error=_first_line(e))
                    continue
                nb = x.numel() * x.element_size()
                fwd_med, fb_med = statistics.median(f_ms), statistics.median(fb_ms)
                gbs = 5 * nb / (fb_med * 1e-3) / 1e9  # fused minimum traffic fwd+bwd: x, y | x, dy, dx
                rows.append({"shape": list(shape), "dtype": str(dtype)[6:], "candidate": name, "label": label,
                             "fwd_ms": _stats(f_ms), "fwd_bwd_ms": _stats(fb_ms),
                             "fwd_gbs": round(2 * nb / (fwd_med * 1e-3) / 1e9, 1), "fwd_bwd_gbs": round(gbs, 1),
                             "copy_frac": round(gbs / copy_gbs, 3), "first_call_s": round(first_s, 3),
                             "launches_fwd": lf.get("launches"), "launches_fwd_bwd": lfb.get("launches"),
                             "launches_by": lf.get("launches_by")})
            base = min((r["fwd_bwd_ms"]["median"] for r in rows if r["candidate"].startswith("cudnn")), default=None)
            for r in rows:
                r["speedup_vs_best_cudnn"] = round(base / r["fwd_bwd_ms"]["median"], 2) if base else None
                label = r.pop("label")
                ctx.rec.row("kernel_time", label,
                            f"fwd {r['fwd_ms']['median']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']['median']:.3f} ms "
                            f"({r['fwd_bwd_gbs']:.0f} GB/s, {100 * r['copy_frac']:.0f}% copy), "
                            f"{r['speedup_vs_best_cudnn']}x best cuDNN, launches {r['launches_fwd']}/"
                            f"{r['launches_fwd_bwd']}", backend_flags=backend_flags(), **r)


def _train_config(ctx: Ctx, batch: int, **train):
    from fastp2p.config import Config, DataConfig, ModelConfig, TrainConfig

    if ctx.dry:
        m, d = ModelConfig(netG="unet_128", ngf=4, ndf=4), DataConfig(load_size=143, crop_size=128, num_workers=0)
    else:  # the paper's recipe: unet_256 + 70x70 PatchGAN, batch norm, 256x256
        m, d = ModelConfig(), DataConfig()
    return Config(m, d, TrainConfig(batch_size=batch, device=ctx.device, **train))


def _train_kw(**train) -> dict:
    """TrainConfig overrides, with ``cuda_graphs`` pinned (False unless asked) where fastp2p has the option: its
    default (on with CUDA) would otherwise turn every "eager" row into a graphed one."""
    from fastp2p.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if "cuda_graphs" in names:
        train.setdefault("cuda_graphs", False)
    return {k: v for k, v in train.items() if k in names}


def _measure_train(ctx: Ctx, label: str, batch: int, reps: int, warmup: int, profile_step: bool = True,
                   **train) -> dict | None:
    """Build a Trainer, warm it up, time ``reps`` steps on one random batch; one row (or an error row)."""
    import gc

    import torch

    from fastp2p.train import Trainer

    train = _train_kw(**train)
    cfg = _train_config(ctx, batch, **train)
    size = cfg.data.crop_size
    g = torch.Generator().manual_seed(batch)
    cl = torch.channels_last if train.get("channels_last") else torch.contiguous_format
    A = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(ctx.device).contiguous(memory_format=cl)
    B = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(ctx.device).contiguous(memory_format=cl)
    fields = {"batch": batch, "train_config": dict(train), "model": dataclasses.asdict(cfg.model),
              "crop_size": size}
    tr = None
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        tr = Trainer(cfg, ctx.device)
        step_flags = dict(getattr(tr, "backend_flags", {}))  # set around the trainer's step only (SPEED_FLAGS)
        tr.train_step(A, B)
        _sync(ctx.device)
        first_s = time.perf_counter() - t0
        reset_peak(ctx.device)
        last = {}

        def step():
            last["losses"] = tr.train_step(A, B)

        ms, host = timed(step, reps, ctx.device, warmup)
        mem = peak_mb(ctx.device)
        launches = count_launches(step, ctx.device) if profile_step else {"launches": None}
        loss = {k: float(getattr(last["losses"], k)) for k in ("loss_D", "loss_G_GAN", "loss_G_L1")}
    except Exception as e:  # noqa: BLE001 - one failing configuration is a row, the others still run
        ctx.rec.row("train", label, f"FAILED {_first_line(e)}", error=_first_line(e), **fields)
        return None
    finally:
        tr = None  # free the models before the next configuration is built
        gc.collect()
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    med = statistics.median(ms)
    from fastp2p.train import amp_dtype

    amp = str(amp_dtype(torch.device(ctx.device))).replace("torch.", "") if train.get("amp") else None
    row = ctx.rec.row("train", label, f"{med:.2f} ms/step ({batch / med * 1e3:.1f} img/s), host "
                      f"{statistics.median(host):.2f} ms, launches {launches.get('launches')}, peak {mem:.0f} MB, "
                      f"first step {first_s:.1f} s", step_ms=_stats(ms), host_ms=_stats(host),
                      img_per_s=round(batch / med * 1e3, 2), peak_mem_mb=mem, first_step_s=round(first_s, 2),
                      amp_dtype=amp, losses=loss, backend_flags=backend_flags(),
                      step_backend_flags=step_flags, **launches, **fields)
    return row


def step_train(ctx: Ctx) -> None:
    _need_gpu(ctx)
    gpu_batch = ctx.args["batch"]
    batch = DRY_BATCH[gpu_batch] if ctx.dry else gpu_batch
    from fastp2p.kernels import norm_act as na

    for kernels in ("torch", "triton"):
        label = f"b{batch} --kernels {kernels} --amp channels-last"
        if kernels == "triton" and not na.triton_usable(ctx.device):
            ctx.rec.row("train", label, "skipped: Triton not usable here", skipped="Triton not usable", batch=batch)
            continue
        if ctx.dry and kernels == "triton" and gpu_batch != 1:
            # the interpreter takes ~3-10 s per tiny step on 2 cores: the b1 step exercises this path
            ctx.rec.row("train", label, "skipped in the dry run (Triton interpreter; train_b1 runs it)",
                        skipped="dry run", batch=batch)
            continue
        if ctx.dry:
            reps, warm = 1, 0
        else:
            reps, warm = (20, 5) if batch <= 16 else (10, 3)
        _measure_train(ctx, label, batch, reps, warm, profile_step=not (ctx.dry and kernels == "triton"),
                       kernels=kernels, amp=True, channels_last=True)
    if not ctx.dry and gpu_batch == 16 and na.triton_usable(ctx.device):
        # the other Triton implementations (v1 while v2 awaits a GPU's verdict), selected the way users do:
        # FASTP2P_NORM_ACT_IMPL, read when the fused modules are built
        for variant in variants()[1:]:
            os.environ["FASTP2P_NORM_ACT_IMPL"] = variant
            try:
                _measure_train(ctx, f"b{batch} --kernels triton ({variant}) --amp channels-last", batch, 20, 5,
                               kernels="triton", amp=True, channels_last=True)
            finally:
                os.environ.pop("FASTP2P_NORM_ACT_IMPL", None)


def step_train_skips(ctx: Ctx) -> None:
    """The U-Net skip path (kernels/unet_skip.py) at batch 16, to set beside train_b16's plain rows: relu_cat
    (``FASTP2P_FUSED_SKIPS=1``) and the up norms writing their slice of the join buffer (``=norm``, Triton only)."""
    _need_gpu(ctx)
    batch = DRY_BATCH[16] if ctx.dry else 16
    from fastp2p.kernels import norm_act as na

    for mode, kernels in (("1", "torch"), ("1", "triton"), ("norm", "triton")):
        label = f"b{batch} --kernels {kernels} --amp channels-last FASTP2P_FUSED_SKIPS={mode}"
        if kernels == "triton" and (ctx.dry or not na.triton_usable(ctx.device)):
            why = "dry run (Triton interpreter; train_b1 runs it)" if ctx.dry else "Triton not usable here"
            ctx.rec.row("train", label, f"skipped: {why}", skipped=why, batch=batch)
            continue
        os.environ["FASTP2P_FUSED_SKIPS"] = mode
        try:
            _measure_train(ctx, label, batch, *((1, 0) if ctx.dry else (20, 5)), kernels=kernels, amp=True,
                           channels_last=True)
        finally:
            os.environ.pop("FASTP2P_FUSED_SKIPS", None)


def _has_cuda_graphs() -> bool:
    try:
        from fastp2p.config import TrainConfig
    except Exception:  # noqa: BLE001
        return False
    return "cuda_graphs" in {f.name for f in dataclasses.fields(TrainConfig)}


def _graph_parity(ctx: Ctx, batch: int, kernels: str, steps: int = 3) -> dict:
    """The same 3 steps (same seed, same batch) eagerly and with --cuda_graphs: max |difference| of G's parameters
    and of the last losses. Exact equality is not expected (dropout draws from another generator state once
    captured; cuDNN may pick other algorithms), but a wrong capture shows up as O(1) differences."""
    import torch

    from fastp2p.train import Trainer

    out = {}
    for graphs in (False, True):
        cfg = _train_config(ctx, batch, **_train_kw(kernels=kernels, amp=True, channels_last=True,
                                                    cuda_graphs=graphs))
        g = torch.Generator().manual_seed(7)
        size = cfg.data.crop_size
        A = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(ctx.device)
        B = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(ctx.device)
        A, B = (t.contiguous(memory_format=torch.channels_last) for t in (A, B))
        torch.manual_seed(0)
        tr = Trainer(cfg, ctx.device)
        for _ in range(steps):
            losses = tr.train_step(A, B)
        out[graphs] = ([p.detach().float().clone() for p in tr.G.parameters()], float(losses.loss_G_L1))
        del tr
    pd = max((a - b).abs().max().item() for a, b in zip(out[False][0], out[True][0], strict=True))
    return {"param_max_abs_diff": pd, "loss_G_L1_eager": out[False][1], "loss_G_L1_graphs": out[True][1]}


def step_cuda_graph(ctx: Ctx) -> None:
    if not _has_cuda_graphs():
        ctx.rec.row("cuda_graph", "CUDA-graph train step", "not implemented yet: fastp2p has no cuda_graphs option "
                    "(TrainConfig.cuda_graphs; issue 17 section 2)", status="not implemented yet")
        return
    _need_gpu(ctx)
    if ctx.device != "cuda":
        ctx.rec.row("cuda_graph", "CUDA-graph train step", "skipped: CUDA graphs need a GPU (dry run on a CPU)",
                    skipped="GPU only", status="implemented")
        return
    for batch in (1, 16):
        for kernels in ("torch", "triton"):
            row = _measure_train(ctx, f"b{batch} --kernels {kernels} --amp channels-last --cuda_graphs", batch, 20,
                                 5, kernels=kernels, amp=True, channels_last=True, cuda_graphs=True)
            if row is not None and not row.get("graph_launches"):
                ctx.rec.row("cuda_graph_check", f"b{batch} --kernels {kernels}", "no cudaGraphLaunch seen in the "
                            "profiled step: the step ran eagerly (see the step log for the capture warning)",
                            graph_launches=row.get("graph_launches"))
    try:
        par = _graph_parity(ctx, 1, "torch")
        ctx.rec.row("cuda_graph_parity", "b1 --kernels torch: 3 steps eager vs --cuda_graphs",
                    f"max |param diff| {par['param_max_abs_diff']:.2e}, loss_G_L1 {par['loss_G_L1_eager']:.5f} vs "
                    f"{par['loss_G_L1_graphs']:.5f}", **par)
    except Exception as e:  # noqa: BLE001
        ctx.rec.row("cuda_graph_parity", "b1 eager vs --cuda_graphs", f"FAILED {_first_line(e)}",
                    error=_first_line(e))


def _dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: {str(kk): vv for kk, vv in v.items()} for k, v in counters.items() if v}


def step_compile(ctx: Ctx) -> None:
    import torch

    _need_gpu(ctx)
    kernels = ctx.args["kernels"]
    batch = DRY_BATCH[16] if ctx.dry else 16
    if ctx.dry:
        # The dry run exercises dynamo (graph breaks, recompiles, counters), not inductor's minutes of C++ compiles
        # on 2 cores: torch.compile gets backend="eager" in this process only.
        import functools

        torch.compile = functools.partial(torch.compile, backend="eager")
    from fastp2p.kernels import norm_act as na

    if kernels == "triton" and not na.triton_usable(ctx.device):
        raise StepSkip("Triton not usable here")
    row = _measure_train(ctx, f"b{batch} --compile --kernels {kernels} --amp channels-last", batch,
                         1 if ctx.dry else 20, 0 if ctx.dry else 5, profile_step=not ctx.dry, kernels=kernels,
                         amp=True, channels_last=True, compile=True)
    counters = _dynamo_counters()
    breaks = sum(counters.get("graph_break", {}).values())
    recompiles = counters.get("stats", {}).get("unique_graphs")
    ctx.rec.row("compile_stats", f"dynamo counters (--kernels {kernels})",
                f"graph breaks {breaks}, unique graphs {recompiles}, frames {counters.get('frames', {})}; "
                f"first step (compile) {row['first_step_s'] if row else '?'} s; recompile/graph-break log lines in "
                "logs/ (TORCH_LOGS=recompiles,graph_breaks)", graph_breaks=breaks, counters=counters,
                backend="eager (dry run)" if ctx.dry else "inductor")


def step_infer(ctx: Ctx) -> None:
    import contextlib as cl_
    import copy

    import torch

    from fastp2p import kernels as K
    from fastp2p.inference import with_mode
    from fastp2p.models import build_generator
    from fastp2p.train import amp_dtype

    _need_gpu(ctx)
    dev = ctx.device
    netG, ngf, size = ("unet_128", 4, 128) if ctx.dry else ("unet_256", 64, 256)
    torch.manual_seed(0)
    G = with_mode(build_generator(netG, 3, 3, ngf), "eval", inplace=True).to(dev)
    amp = amp_dtype(torch.device(dev))
    variants = {"fp32 NCHW eager": (G, None, torch.contiguous_format)}
    if amp is not None:
        variants["amp CL eager"] = (copy.deepcopy(G).to(memory_format=torch.channels_last), amp, torch.channels_last)
        if K.norm_act.triton_usable(dev):
            Gt = K.apply_fused_kernels(copy.deepcopy(G).to(memory_format=torch.channels_last), "triton")
            variants["amp CL triton"] = (Gt, amp, torch.channels_last)
    else:
        ctx.rec.row("infer", "amp variants", "skipped: no native bf16 here (AMP would be fp32)", skipped="no bf16")
    reps, warm = (20, 3) if dev == "cuda" else (1, 1)
    for batch in (1,) if ctx.dry else (1, 8, 32):
        x0 = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
        for name, (net, dt, fmt) in variants.items():
            x = x0.contiguous(memory_format=fmt)

            def call(net=net, x=x, dt=dt):
                ac = torch.autocast(dev, dtype=dt) if dt else cl_.nullcontext()
                with torch.inference_mode(), ac:
                    net(x)

            label = f"b{batch} {name}"
            try:
                ms, host = timed(call, reps, dev, warm)
            except Exception as e:  # noqa: BLE001
                ctx.rec.row("infer", label, f"FAILED {_first_line(e)}", error=_first_line(e), batch=batch)
                continue
            med = statistics.median(ms)
            ctx.rec.row("infer", label, f"{med:.2f} ms ({batch / med * 1e3:.1f} img/s), host "
                        f"{statistics.median(host):.2f} ms", batch=batch, variant=name, ms=_stats(ms),
                        host_ms=_stats(host), img_per_s=round(batch / med * 1e3, 2), netG=netG, ngf=ngf, size=size,
                        backend_flags=backend_flags())


def step_loaders(ctx: Ctx) -> None:

    from fastp2p.bench.core import endless

    from fastp2p import data as data_mod
    from fastp2p.data import backends

    _need_gpu(ctx)
    dev = ctx.device
    workers = 1 if ctx.dry else min(8, os.cpu_count() or 1)
    batch = 4 if ctx.dry else 16
    n_batches = 3 if ctx.dry else 20
    base = _train_config(ctx, batch)
    dcfg = dataclasses.replace(base.data, synthetic_size=16 if ctx.dry else 128, num_workers=workers)
    t0 = time.perf_counter()
    ds = data_mod.build_dataset(dcfg, 3, 3, seed=0)
    ctx.rec.row("dataset", "synthetic dataset", f"{len(ds)} pairs, crop {dcfg.crop_size}, built in "
                f"{time.perf_counter() - t0:.1f} s", pairs=len(ds), crop=dcfg.crop_size, load=dcfg.load_size)
    kinds = ["torch", "gpu-cache", "dali"]
    for kind in kinds:
        label = f"{kind} loader, batch {batch}" + (f", {workers} workers" if kind == "torch" else "")
        if kind == "dali" and not backends.dali_available():
            ctx.rec.row("loader", label, f"skipped: DALI not installed ({backends.DALI_INSTALL})",
                        skipped="DALI not installed", loader=kind)
            continue
        if kind == "dali" and dcfg.data is None:
            ctx.rec.row("loader", label, "skipped: DALI decodes image files and the built-in synthetic set has none",
                        skipped="synthetic data", loader=kind)
            continue
        cfg = dataclasses.replace(base, data=dataclasses.replace(dcfg, loader=kind))
        try:
            t0 = time.perf_counter()
            loader = data_mod.make_train_loader(cfg, ds, dev)
            it = endless(loader)
            setup = time.perf_counter() - t0

            def pull(it=it):
                for _ in range(n_batches):
                    a, b = next(it)
                    a.to(dev, non_blocking=True)
                    b.to(dev, non_blocking=True)
                _sync(dev)

            pull()  # warm-up: workers start, first batches
            ms, _ = timed(pull, 3 if not ctx.dry else 1, dev)
            loader.close()
        except Exception as e:  # noqa: BLE001
            ctx.rec.row("loader", label, f"FAILED {_first_line(e)}", error=_first_line(e), loader=kind)
            continue
        med = statistics.median(ms)
        pps = n_batches * batch / (med * 1e-3)
        ctx.rec.row("loader", label, f"{pps:.0f} pairs/s onto {dev} (setup {setup:.1f} s)", loader=kind,
                    batch=batch, workers=workers, pairs_per_s=round(pps, 1), setup_s=round(setup, 2),
                    ms_per_unit=_stats(ms), batches_per_unit=n_batches)


def step_pytest(ctx: Ctx) -> None:
    target = ctx.args["dry_target" if ctx.dry else "target"]
    marker = ["-m", ctx.args["marker"]] if ctx.args.get("marker") else []
    cmd = [sys.executable, "-m", "pytest", "-q", *marker, *target, "-p", "no:cacheprovider", "-rfEs"]
    log = f"{ctx.rec.step.replace('_', '-')}.log"
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (ctx.outdir / log).write_text(p.stdout + p.stderr)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    last = lines[-1] if lines else f"(no output, rc {p.returncode})"
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    ctx.rec.row("pytest", "pytest " + " ".join(marker + target), last.strip("= "), rc=p.returncode,
                failed=failed[:30], wall_s=round(time.perf_counter() - t0, 1), log=log)


STEP_FUNCS = {"env": step_env, "kernels_exact": step_kernels_exact, "kernels_timing": step_kernels_timing,
              "train_b1": step_train, "train_b16": step_train, "train_b64": step_train,
              "cuda_graph": step_cuda_graph, "compile_b16": step_compile, "compile_b16_triton": step_compile,
              "infer": step_infer, "loaders": step_loaders, "train_skips": step_train_skips, "pytest_gpu": step_pytest,
              "pytest_kernels": step_pytest}


def run_step(name: str, outdir: Path, dry: bool, sleep_after_first: float = 0.0) -> int:
    """A step's process: run it, record its rows; exit status 0 ok, ``SKIP_RC`` skipped, 1 failed."""
    step = STEPS[name]
    rec = Recorder(outdir, name, dry, sleep_after_first)
    if name == "env" or dry:  # dry: CUDA is hidden. env: set by the step once torch is imported (its first row
        device = "cpu"  # is written before that import)
    else:
        import torch

        device = "cuda" if (not dry and torch.cuda.is_available()) else "cpu"
    ctx = Ctx(rec, dry, device, Path(outdir), step.args)
    try:
        STEP_FUNCS[name](ctx)
    except StepSkip as e:
        print(f"skipped: {e}", flush=True)
        return SKIP_RC
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _tail(path: Path, n: int = 15) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln[:300] for ln in lines if ln.strip()][-n:]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _parse_overrides(items: list[str] | None, what: str) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, _, val = item.partition("=")
        if name not in STEPS or not val:
            raise SystemExit(f"gpu_plan: {what} {item!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        out[name] = float(val)
    return out


def run_plan(outdir: Path, budget: float, dry: bool, sleep: dict | None = None, timeouts: dict | None = None,
             estimates: dict | None = None, only: list[str] | None = None) -> int:
    """Run ``PLAN`` within ``budget`` seconds, one subprocess per step; prints the table at the end (also when the
    driver itself is stopped by SIGTERM / SIGINT: the step in flight is killed and recorded first)."""
    sleep, timeouts, estimates = sleep or {}, timeouts or {}, estimates or {}
    outdir = Path(outdir)
    (outdir / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:  # the CPU rehearsal: no GPU even where one exists, Triton in interpreter mode
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    # The steps import fastp2p from this checkout (its source-tree mapping covers kernels/, engines/, bench/).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    plan = [s for s in PLAN if not only or s.name in only]
    append_row(outdir, {"kind": "plan", "budget_s": budget, "dry_run": dry, "argv": sys.argv[1:],
                        "steps": [{"name": s.name, "title": s.title, "estimate_s": _estimate(s, dry, estimates),
                                   "timeout_s": timeouts.get(s.name, s.dry_timeout_s if dry else s.timeout_s)}
                                  for s in plan], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    proc = None
    current = None
    try:
        for i, step in enumerate(plan):
            current = step
            left = budget - (time.monotonic() - t_start)
            est = _estimate(step, dry, estimates)
            base = {"kind": "step", "step": step.name, "priority": i, "title": step.title, "estimate_s": est}
            if est > left:
                append_row(outdir, {**base, "status": "skipped", "reason": f"budget: estimate {est:.0f} s > "
                                    f"{max(left, 0):.0f} s left of --budget {budget:.0f} s"})
                print(f"[gpu_plan] {step.name}: skipped (estimate {est:.0f} s > {max(left, 0):.0f} s left)",
                      flush=True)
                continue
            limit = min(timeouts.get(step.name, step.dry_timeout_s if dry else step.timeout_s), left)
            log = outdir / "logs" / f"{i:02d}-{step.name}.log"
            cmd = [sys.executable, "-m", "fastp2p.bench.gpu_plan", "step", step.name, str(outdir)]
            cmd += ["--dry-run"] if dry else []
            cmd += ["--sleep-after-first-row", str(sleep[step.name])] if step.name in sleep else []
            append_row(outdir, {**base, "status": "started", "timeout_s": round(limit, 1)})
            print(f"[gpu_plan +{time.monotonic() - t_start:.0f}s] {step.name}: {step.title} (estimate {est:.0f} s, "
                  f"limit {limit:.0f} s)", flush=True)
            t0 = time.monotonic()
            with open(log, "w") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                        env=dict(env, **dict(step.env)), start_new_session=True)
                try:
                    rc = proc.wait(timeout=limit)
                    status = "ok" if rc == 0 else "skipped" if rc == SKIP_RC else "failed"
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    rc, status = None, "timeout"
                proc = None
            wall = time.monotonic() - t0
            tail = _tail(log)
            row = {**base, "status": status, "rc": rc, "wall_s": round(wall, 1), "timeout_s": round(limit, 1),
                   "log": str(log.relative_to(outdir))}
            if status == "skipped":
                row["reason"] = (tail[-1] if tail else "").removeprefix("skipped: ")
            elif status == "failed":
                row.update(reason=tail[-1] if tail else f"exit status {rc}", tail=tail)
            elif status == "timeout":
                row.update(reason=f"killed after {wall:.0f} s (limit {limit:.0f} s: the step's timeout or the "
                           "budget left); its rows so far are kept", tail=tail)
            append_row(outdir, row)
            print(f"[gpu_plan] {step.name}: {status} in {wall:.1f} s" + (f" ({row['reason']})" if "reason" in row
                                                                          else ""), flush=True)
    except _Stop as e:
        if proc is not None:
            _kill_group(proc)
        if current is not None:
            append_row(outdir, {"kind": "step", "step": current.name, "status": "killed",
                                "reason": f"gpu_plan stopped by {e} while this step ran"})
        print(f"[gpu_plan] stopped by {e}", flush=True)
        stopped = 128 + getattr(signal, str(e)).value
    except Exception as e:  # noqa: BLE001 - a driver bug must not cost the table of what was measured
        import traceback

        traceback.print_exc()
        append_row(outdir, {"kind": "step", "step": current.name if current else "?", "status": "failed",
                            "reason": f"gpu_plan driver error: {_first_line(e)}"})
        stopped = 1
    else:
        stopped = 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print_table(outdir)
    return stopped


def _estimate(step: Step, dry: bool, estimates: dict) -> float:
    if step.name in estimates:
        return estimates[step.name]
    if step.name == "cuda_graph" and not _has_cuda_graphs():
        return 4 if dry else 10  # the placeholder only records "not implemented yet"
    return step.dry_estimate_s if dry else step.estimate_s


# ---------------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------------
def table(outdir: Path) -> str:
    rows, bad = read_rows(outdir)
    plans = [r for r in rows if r.get("kind") == "plan"]
    plan = plans[-1] if plans else {}
    start = plan.get("t", 0)
    rows = [r for r in rows if r.get("t", 0) >= start]  # the last run in this folder
    status: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "step":
            status[r["step"]] = r
    measures = [r for r in rows if r.get("kind") == "measure"]
    by_what = {r.get("what"): r for r in measures if r.get("step") == "env"}
    out = [f"fastp2p GPU plan, {Path(outdir) / RESULTS}: " + (
        f"{'dry run (CPU)' if plan.get('dry_run') else 'GPU run'}, budget {plan.get('budget_s')} s, started "
        f"{plan.get('time', '?')}" if plan else "no plan row (an older or foreign file)")]
    for what in ("host", "versions", "api", "tf32", "imports"):
        if what in by_what:
            out.append(f"  {what:<9}{by_what[what]['summary']}")
    if bad:
        out.append(f"  ({bad} unreadable line(s): a write cut short by a kill)")
    names = [s["name"] for s in plan.get("steps", [])] or list(dict.fromkeys(r["step"] for r in rows if "step" in r))
    head = f"{'step':<20}{'status':<10}{'wall s':>8}{'est s':>7}  note"
    out += ["", head, "-" * len(head)]
    for name in names:
        st = status.get(name)
        if st is None:
            out.append(f"{name:<20}{'not run':<10}")
            continue
        wall = f"{st['wall_s']:.1f}" if st.get("wall_s") is not None else "-"
        est = f"{st['estimate_s']:.0f}" if st.get("estimate_s") is not None else "-"
        note = st.get("reason") or ""
        if st["status"] == "started":
            note = "in flight when the run ended (the driver was killed)"
        out.append(f"{name:<20}{st['status']:<10}{wall:>8}{est:>7}  {note}"[:220])
    for name in names:
        ms = [r for r in measures if r.get("step") == name and r.get("step") != "env"]
        if not ms:
            continue
        out += ["", f"[{name}]"]
        width = min(56, max(len(r.get("label", "")) for r in ms) + 1)
        out += [f"  {r.get('label', ''):<{width}} {r.get('summary', '')}"[:240] for r in ms]
    return "\n".join(out)


def print_table(outdir: Path) -> None:
    print("\n" + table(outdir), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastp2p.bench.gpu_plan", description=__doc__.split("\n")[0])
    p.add_argument("--table", metavar="OUTDIR", help="print the table of OUTDIR/results.jsonl and exit")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run the plan (what bench/gpu.sh calls)")
    r.add_argument("outdir")
    r.add_argument("--budget", type=float, default=480.0, help="seconds for the whole plan (default 480)")
    r.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny shapes, Triton interpreter")
    r.add_argument("--only", nargs="+", choices=list(STEPS), help=argparse.SUPPRESS)
    # tests: stall a step after its first row, override a step's timeout / estimate (STEP=SECONDS)
    r.add_argument("--sleep", action="append", help=argparse.SUPPRESS)
    r.add_argument("--timeout", action="append", help=argparse.SUPPRESS)
    r.add_argument("--estimate", action="append", help=argparse.SUPPRESS)
    s = sub.add_parser("step", help=argparse.SUPPRESS)
    s.add_argument("name", choices=list(STEPS))
    s.add_argument("outdir")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--sleep-after-first-row", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.table:
        if not (Path(args.table) / RESULTS).is_file():
            print(f"gpu_plan: --table: no {RESULTS} in {args.table}", file=sys.stderr)
            return 2
        print(table(Path(args.table)))
        return 0
    if args.cmd == "run":
        if args.budget <= 0:
            p.error("--budget must be > 0 seconds")
        Path(args.outdir).mkdir(parents=True, exist_ok=True)
        return run_plan(Path(args.outdir), args.budget, args.dry_run, _parse_overrides(args.sleep, "--sleep"),
                        _parse_overrides(args.timeout, "--timeout"), _parse_overrides(args.estimate, "--estimate"),
                        args.only)
    if args.cmd == "step":
        return run_step(args.name, Path(args.outdir), args.dry_run, args.sleep_after_first_row)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
