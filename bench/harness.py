"""Shared measurement machinery for ``fastp2p bench``: environment record, synchronized timers, matmul peaks, peak
memory, medians over interleaved rounds, the table (printed last) and the ladder plot.

Timing rules (every section): warm-up calls are excluded; setup / compile time is kept apart (``setup_s``); rungs are
interleaved round by round so load from elsewhere hits them alike; medians over repeats; on CUDA each timed call is
bracketed by CUDA events and synchronized before it is read.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastp2p.bench.core import cpu_model, git_sha, peak_rss_mb, reset_peak_rss

from fastp2p import __version__


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "present")
    except Exception:
        return None


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    cuda = device == "cuda"
    return {
        "device": device, "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if cuda else None, "driver": gpu_driver() if cuda else None,
        "cuda": torch.version.cuda if cuda else None, "torch": torch.__version__, "triton": _version("triton"),
        "dali": _version("nvidia.dali"), "tensorrt": _version("tensorrt"), "onnxruntime": _version("onnxruntime"),
        "fastp2p": __version__, "python": platform.python_version(), "git_sha": git_sha(),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str) -> float:
    """Seconds for one ``fn()``; CUDA: event-timed and synchronized."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_peaks(device: str, n: int | None = None, repeats: int = 7) -> dict:
    """Measured GEMM rates in GFLOP/s (the roofline's compute ceiling), fp32 and the AMP dtype where native."""
    from fastp2p.train import amp_dtype

    dev = torch.device(device)
    if device == "cuda":  # the trainer's fp32 setting (fastp2p.train.Trainer): TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n = n or (8192 if device == "cuda" else 1024)
    out = {}
    dtypes = [("fp32", torch.float32)]
    amp = amp_dtype(dev)
    if amp is not None:
        dtypes.append(("amp", amp))
    for name, dt in dtypes:
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        for _ in range(3):
            a @ b
        ts = [time_call(lambda a=a, b=b: a @ b, device) for _ in range(repeats)]
        out[name] = 2 * n**3 / min(ts) / 1e9  # a ceiling: the best repeat, not the median (shared machines)
        out[name + "_dtype"] = str(dt).replace("torch.", "")
    if device == "cuda":
        out["fp32_note"] = "TF32 allowed (as the trainer sets it)" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return out


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


@dataclass
class Rung:
    """One row: ``run()`` is one timed unit of work of ``items`` images (or pairs)."""

    name: str
    label: str
    items: int
    run: object = None
    group: str = ""  # rows with the same group share a baseline
    baseline: str = ""  # name of this group's baseline rung
    flops: float = 0.0
    amp: bool = False
    setup_s: float = 0.0
    skipped: str | None = None
    times: list = field(default_factory=list)
    peak_mem_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def run_rounds(rungs: list[Rung], rounds: int, per_round: int, device: str, warm_rounds: int = 1) -> None:
    """``warm_rounds`` untimed interleaved rounds first (caches, allocator, page faults of every rung), then
    ``rounds`` timed rounds of ``per_round`` calls per rung."""
    live = [r for r in rungs if r.skipped is None]
    for _ in range(warm_rounds):
        for r in live:
            r.run()
    sync(device)
    for _ in range(rounds):
        for r in live:
            reset_peak_memory(device)
            for _ in range(per_round):
                r.times.append(time_call(r.run, device))
            r.peak_mem_mb = max(r.peak_mem_mb, peak_memory_mb(device))


def summarize(rungs: list[Rung], peaks: dict | None) -> list[dict]:
    by = {r.name: r for r in rungs}
    rows = []
    for r in rungs:
        row = {"section": r.group.split(":")[0], "group": r.group, "rung": r.name, "label": r.label,
               "baseline": r.baseline, "items": r.items, "skipped": r.skipped, **r.extra}
        if r.skipped is None:
            med = statistics.median(r.times)
            base = by.get(r.baseline)
            bmed = statistics.median(base.times) if base and base.skipped is None and base.times else None
            row.update(ms_per_iter=med * 1e3, img_per_s=r.items / med, speedup=(bmed / med) if bmed else None,
                       setup_s=r.setup_s, peak_mem_mb=r.peak_mem_mb, flops_per_iter=r.flops or None,
                       repeats_s=list(r.times))
            if r.flops and peaks:
                key = "amp" if r.amp and "amp" in peaks else "fp32"
                tf = r.flops / med / 1e12
                row.update(tflops=tf, peak_key=key, pct_matmul_peak=100 * tf * 1e3 / peaks[key])
        rows.append(row)
    return rows


def merge_peaks(result: dict, peaks: dict) -> None:
    """Keep the best matmul rate seen (start and end of the run) and recompute every row's share of it."""
    mp = result["matmul_peaks"]
    for k, v in peaks.items():
        if isinstance(v, float) and v > mp.get(k, 0.0):
            mp[k] = v
    for r in result["rows"]:
        if r.get("tflops") is not None and r.get("peak_key") in mp:
            r["pct_matmul_peak"] = 100 * r["tflops"] * 1e3 / mp[r["peak_key"]]


def print_table(result: dict) -> None:
    env, peaks = result["env"], result.get("matmul_peaks") or {}
    print(f"\nfastp2p bench on {env['device']}: {env['gpu'] or env['cpu']} ({env['cores']} cores), torch {env['torch']}"
          f", git {(env['git_sha'] or '?')[:10]}")
    if peaks:
        print("matmul peak (measured, GFLOP/s): " + ", ".join(f"{k} {v:.0f} ({peaks[k + '_dtype']})" for k, v in
                                                              peaks.items() if not k.endswith(("_dtype", "_note"))))
    head = (f"{'group':<10}{'rung':<24}{'ms/iter':>10}{'img/s':>9}{'speedup':>9}{'TFLOP/s':>9}{'% peak':>8}"
            f"{'mem MB':>9}{'setup s':>9}  note")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if r["skipped"]:
            print(f"{r['group']:<10}{_short(r):<24}{'skipped':>10}  {r['skipped']}")
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        pk = f"{r['pct_matmul_peak']:.0f}%" if r.get("pct_matmul_peak") is not None else "-"
        print(f"{r['group']:<10}{_short(r):<24}{r['ms_per_iter']:>10.1f}{r['img_per_s']:>9.2f}{sp:>9}{tf:>9}{pk:>8}"
              f"{r['peak_mem_mb']:>9.0f}{r['setup_s']:>9.1f}  {r['label']}")


def _short(row: dict) -> str:
    return row["rung"][len(row["group"]) + 1:] if row["rung"].startswith(row["group"] + ":") else row["rung"]


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["section"] == "train"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.5), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=False):
        rs = [r for r in rows if r["group"] == g]
        names = [_short(r) for r in rs]
        vals = [r.get("img_per_s") or 0.0 for r in rs]
        bars = ax.bar(range(len(rs)), vals, color=["#999" if r["skipped"] else "#3a7" for r in rs])
        for b, r in zip(bars, rs, strict=True):
            txt = "skipped" if r["skipped"] else f"{r['speedup']:.2f}x" if r.get("speedup") else ""
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), txt, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rs)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("img/s")
        ax.set_title(g)
    env = result["env"]
    fig.suptitle(f"fastp2p train ladder, {env['gpu'] or env['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict, path: str) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
