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
from fastp2p.bench.core import cpu_model, git_sha, peak_for, peak_rss_mb, reset_peak_rss

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


def native_bf16(device: str) -> bool:
    """True where ``device`` computes bf16 matmuls in hardware (CUDA sm80+, a CPU with avx512_bf16 / AMX)."""
    if device == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no including_emulation
            return torch.cuda.is_bf16_supported()
    from fastp2p.perf import cpu_has_native_bf16

    return cpu_has_native_bf16()


def matmul_peaks(device: str, n: int | None = None, repeats: int = 7) -> dict:
    """Measured GEMM rates in GFLOP/s (the roofline's compute ceiling), keyed by dtype: ``fp32`` always, ``bf16``
    where it is native (else ``bf16_note`` says why it is absent: emulated bf16 has no meaningful peak), ``fp16`` on
    CUDA. Rows are divided by the peak of the dtype they compute in (``peak_key``)."""
    dev = torch.device(device)
    if device == "cuda":  # the trainer's fp32 setting (fastp2p.train.Trainer): TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n = n or (8192 if device == "cuda" else 1024)
    out: dict = {}
    dtypes = [("fp32", torch.float32)]
    if native_bf16(device):
        dtypes.append(("bf16", torch.bfloat16))
    else:
        out["bf16_note"] = "n/a: no native bf16 on this device"
    if device == "cuda":
        dtypes.append(("fp16", torch.float16))
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
    dtype: str = "fp32"  # the compute dtype of the row's matmuls (the AMP dtype under autocast): picks its peak
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
            if r.flops:
                tf = r.flops / med / 1e12
                key, peak = peak_for(r.dtype, peaks or {})
                row.update(tflops=tf, peak_key=key, pct_matmul_peak=100 * tf * 1e3 / peak if peak else None)
        rows.append(row)
    return rows


def merge_peaks(result: dict, peaks: dict) -> None:
    """Keep the best matmul rate seen (start and end of the run) and recompute every row's share of it."""
    mp = result["matmul_peaks"]
    for k, v in peaks.items():
        if isinstance(v, float) and v > mp.get(k, 0.0):
            mp[k] = v
    for r in result["rows"]:
        if r.get("tflops") is not None and r.get("peak_key"):
            _, peak = peak_for(r["peak_key"], mp)
            r["pct_matmul_peak"] = 100 * r["tflops"] * 1e3 / peak if peak else None


def print_table(result: dict) -> None:
    env, peaks = result["env"], result.get("matmul_peaks") or {}
    print(f"\nfastp2p bench on {env['device']}: {env['gpu'] or env['cpu']} ({env['cores']} cores), torch {env['torch']}"
          f", git {(env['git_sha'] or '?')[:10]}")
    if peaks:
        print("matmul peak (measured, GFLOP/s): " + ", ".join(
            [f"{k} {v:.0f} ({peaks[k + '_dtype']})" for k, v in peaks.items() if isinstance(v, float)]
            + ([f"bf16 {peaks['bf16_note']}"] if "bf16_note" in peaks else [])))
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
        pk = (f"{r['pct_matmul_peak']:.0f}%" if r.get("pct_matmul_peak") is not None
              else "n/a" if r.get("peak_key") else "-")
        print(f"{r['group']:<10}{_short(r):<24}{r['ms_per_iter']:>10.1f}{r['img_per_s']:>9.2f}{sp:>9}{tf:>9}{pk:>8}"
              f"{r['peak_mem_mb']:>9.0f}{r['setup_s']:>9.1f}  {r['label']}")


def _short(row: dict) -> str:
    return row["rung"][len(row["group"]) + 1:] if row["rung"].startswith(row["group"] + ":") else row["rung"]


def plot_rows(result: dict) -> tuple[list[dict], list[dict]]:
    """The train rows a ladder chart draws (measured ones) and the skipped ones it lists as text under it instead
    (a skipped rung has no bar: a zero-height bar would read as "0 img/s")."""
    rows = [r for r in result["rows"] if r["section"] == "train"]
    return [r for r in rows if not r["skipped"]], [r for r in rows if r["skipped"]]


def skipped_lines(skipped: list[dict]) -> list[str]:
    """One line per skipped rung and reason, naming the groups it was skipped in (``triton (b1, b4): GPU only``)."""
    by: dict[tuple[str, str], list[str]] = {}
    for r in skipped:
        by.setdefault((_short(r), r["skipped"]), []).append(r["group"].split(":")[-1])
    return [f"{name} ({', '.join(groups)}): {why}" for (name, why), groups in by.items()]


def bar_label(row: dict) -> str:
    """Speedup and share of the peak of the row's own dtype (``n/a`` where that dtype has no measured peak)."""
    parts = [f"{row['speedup']:.2f}x"] if row.get("speedup") else []
    if row.get("peak_key"):
        pct = row.get("pct_matmul_peak")
        parts.append(f"{pct:.0f}% {row['peak_key']} peak" if pct is not None else f"{row['peak_key']} peak n/a")
    return "\n".join(parts)


def plot(result: dict, path: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, skipped = plot_rows(result)
    groups = list(dict.fromkeys(r["group"] for r in rows))
    notes = [w for line in skipped_lines(skipped) for w in textwrap.wrap(line, 150, subsequent_indent="    ")]
    note_h = 0.16 * (len(notes) + 1) if notes else 0.0
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5 + note_h), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=False):
        rs = [r for r in rows if r["group"] == g]
        bars = ax.bar(range(len(rs)), [r["img_per_s"] for r in rs], color="#3a7")
        for b, r in zip(bars, rs, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), bar_label(r), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(rs)), [_short(r) for r in rs], rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("img/s")
        ax.set_title(g)
        ax.margins(y=0.15)  # room for the two-line labels above the tallest bar
    env = result["env"]
    fig.suptitle(f"fastp2p train ladder, {env['gpu'] or env['cpu']}", fontsize=9)
    fig.tight_layout(rect=(0, note_h / (4.5 + note_h), 1, 1))
    if notes:
        fig.text(0.01, 0.01, "skipped (not drawn):\n" + "\n".join(notes), fontsize=7, va="bottom", ha="left",
                 family="monospace")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict, path: str) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
