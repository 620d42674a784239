"""Core speed benchmark: one training iteration (data included) and generator inference, each measured side by side
against a faithful eager fp32 implementation of the reference (``baseline``), in one run, on the same inputs.

    python -m fastp2p.bench.core [--quick] [--data DIR] [--json PATH] [--rounds N]

Rungs are interleaved round by round (baseline, then each fastp2p rung, repeated) so a noisy shared machine slows them
alike; the table reports medians. Timings exclude warm-up; compile time, where a rung compiles, is reported apart.
Achieved GFLOP/s counts FLOPs with ``torch.utils.flop_counter`` and is shown as a share of the matmul peak measured in
the same run for the rung's dtype (fp32 rungs: the fp32 peak; bf16 rungs: the bf16 peak, n/a without native bf16).
Peak RSS is the process high-water mark while the rung ran (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastp2p import __version__
from fastp2p.config import Config, DataConfig, ModelConfig, TrainConfig
from fastp2p.models import build_discriminator, build_generator, init_weights, keys
from fastp2p.models.reference import RefUnetGenerator

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "facades"


# -- environment --
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    env = {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": cpu_model(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "fastp2p": __version__,
           "python": platform.python_version(), "git_sha": git_sha()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(n: int = 1024, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """Measured GEMM rate in ``dtype`` (the roofline's compute ceiling on this machine), median of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def peak_for(dtype: str, peaks: dict) -> tuple[str, float | None]:
    """``(peak_key, GFLOP/s)`` a row computing in ``dtype`` (fp32 / bf16 / fp16) is measured against; the rate is
    None (n/a) where that dtype's peak was not measured (bf16 without native support): never another dtype's."""
    v = peaks.get(dtype)
    return dtype, (v if isinstance(v, float) else None)


def cpu_peaks() -> dict:
    """fp32 and (where native) bf16 matmul peaks of this CPU, keyed as ``harness.matmul_peaks`` keys them."""
    from fastp2p.perf import cpu_has_native_bf16

    peaks: dict = {"fp32": matmul_peak_gflops()}
    if cpu_has_native_bf16():
        peaks["bf16"] = matmul_peak_gflops(dtype=torch.bfloat16)
    else:
        peaks["bf16_note"] = "n/a: no native bf16 on this CPU"
    return peaks


# -- rungs --
@dataclass
class Rung:
    name: str
    label: str
    run: object  # callable() -> None: one timed unit of work
    items: int  # images per unit
    flops: float = 0.0
    times: list = field(default_factory=list)
    peak_rss_mb: float = 0.0
    setup_s: float = 0.0
    skipped: str | None = None
    dtype: str = "fp32"  # the dtype its matmuls run in: the peak it is a share of (harness.peak_for)


class BaselineTrain:
    """The reference's training iteration, eager fp32 NCHW: nested U-Net with in-place activations, torch's default
    (for-loop) Adam, the reference's loader (a DataLoader with 4 worker processes, as its ``--num_threads 4``)."""

    def __init__(self, cfg: Config, loader_iter):
        m = cfg.model
        self.G = init_weights(RefUnetGenerator(m.input_nc, m.output_nc, 8 if m.netG == "unet_256" else 7, m.ngf,
                                               m.norm, not m.no_dropout))
        self.D = build_discriminator(m.netD, m.input_nc + m.output_nc, m.ndf, m.n_layers_D, m.norm)
        t = cfg.train
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=t.lr, betas=(t.beta1, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=t.lr, betas=(t.beta1, 0.999))
        self.batches = loader_iter
        self.bce, self.l1 = nn.BCEWithLogitsLoss(), nn.L1Loss()

    def __call__(self):
        A, B = next(self.batches)
        fake = self.G(A)
        self.D.requires_grad_(True)
        self.opt_D.zero_grad()
        pf = self.D(torch.cat((A, fake), 1).detach())
        pr = self.D(torch.cat((A, B), 1))
        loss_D = 0.5 * (self.bce(pf, torch.zeros_like(pf)) + self.bce(pr, torch.ones_like(pr)))
        loss_D.backward()
        self.opt_D.step()
        self.D.requires_grad_(False)
        self.opt_G.zero_grad()
        pf = self.D(torch.cat((A, fake), 1))
        loss_gan, loss_l1 = self.bce(pf, torch.ones_like(pf)), self.l1(fake, B)
        (loss_gan + loss_l1 * 100.0).backward()
        self.opt_G.step()
        return loss_D.detach(), loss_gan.detach(), loss_l1.detach()


class FastTrain:
    def __init__(self, cfg: Config, loader_iter):
        from fastp2p.train import Trainer

        self.trainer = Trainer(cfg, cfg.train.device)
        self.batches = loader_iter

    def __call__(self):
        A, B = next(self.batches)
        self.trainer.train_step(A, B)


def endless(loader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def train_rungs(args) -> list[Rung]:
    from fastp2p import data as data_mod

    data_dir = args.data if args.data and Path(args.data).is_dir() else None
    base_cfg = Config(ModelConfig(), DataConfig(data=str(data_dir) if data_dir else None, direction="BtoA",
                                                num_workers=2), TrainConfig(batch_size=args.batch_size))
    ds = data_mod.build_dataset(base_cfg.data, 3, 3, seed=0)
    rungs = []

    def loader(workers):
        return endless(data_mod.make_loader(ds, args.batch_size, workers, 0))

    specs = [("baseline", "reference step, eager fp32 NCHW, for-loop Adam", BaselineTrain, base_cfg, 4)]
    import dataclasses

    for name, label, train_kw in [
        ("fastp2p-fp32", "fastp2p fp32: fused Adam + GEMM small-spatial convs", {}),
        ("fastp2p-amp", "fastp2p --amp (bf16 autocast where native)", {"amp": True}),
    ] + ([("fastp2p-compile", "fastp2p fp32 --compile", {"compile": True})] if args.compile else []):
        cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, **train_kw))
        specs.append((name, label, FastTrain, cfg, 2))
    for name, label, kls, cfg, workers in specs:
        t0 = time.perf_counter()
        if name == "fastp2p-amp":
            from fastp2p.train import amp_dtype

            if amp_dtype(torch.device("cpu")) is None and not torch.cuda.is_available():
                rungs.append(Rung(name, label, None, args.batch_size, skipped="CPU has no native bf16"))
                continue
        work = kls(cfg, loader(workers))
        for _ in range(args.warmup):
            work()
        r = Rung(name, label, work, args.batch_size, setup_s=time.perf_counter() - t0,
                 dtype="bf16" if cfg.train.amp else "fp32")
        r.flops = count_flops(work)
        rungs.append(r)
    return rungs


def infer_rungs(args) -> list[Rung]:
    from fastp2p import perf
    from fastp2p.inference import with_mode

    G = with_mode(build_generator("unet_256"), "eval", inplace=True)
    ref = init_weights(RefUnetGenerator()).eval().requires_grad_(False)
    ref.load_state_dict(keys.to_reference(G.state_dict(), 8))
    rungs = []
    for bs in (1, 8):
        x = torch.rand(bs, 3, 256, 256) * 2 - 1

        def eager(x=x):
            with torch.inference_mode():
                ref(x)

        t0 = time.perf_counter()
        fast = perf.optimize_for_inference(G, (bs, 3, 256, 256))
        setup = time.perf_counter() - t0
        with torch.inference_mode():
            err = (fast(x) - ref(x)).abs().max().item()

        def opt(x=x, fast=fast):
            with torch.inference_mode():
                fast(x)

        for fn in (eager, opt):
            fn()
        rungs.append(Rung(f"infer-b{bs}-baseline", f"eager fp32 G (eval mode), batch {bs}", eager, bs,
                          flops=count_flops(eager)))
        r = Rung(f"infer-b{bs}-fastp2p", f"fastp2p fp32 {fast.method}, batch {bs} (max abs err {err:.1e})", opt, bs,
                 flops=count_flops(eager), setup_s=setup)
        rungs.append(r)
        name, label = f"infer-b{bs}-fastp2p-bf16", f"fastp2p bf16 inductor (opt-in), batch {bs}"
        if not perf.cpu_has_native_bf16() or torch.cuda.is_available():
            rungs.append(Rung(name, label, None, bs, skipped="CPU without native bf16 (or a CUDA run)"))
            continue
        t0 = time.perf_counter()
        fast16 = perf.optimize_for_inference(G, (bs, 3, 256, 256), precision="bf16")
        setup16 = time.perf_counter() - t0
        with torch.inference_mode():
            err16 = (fast16(x) - ref(x)).abs().max().item()

        def opt16(x=x, fast16=fast16):
            fast16(x)

        opt16()
        rungs.append(Rung(name, f"{label} (max abs err {err16:.1e})", opt16, bs, flops=count_flops(eager),
                          setup_s=setup16, dtype="bf16"))
    return rungs


def run_rounds(rungs: list[Rung], rounds: int, per_round: int) -> None:
    live = [r for r in rungs if r.skipped is None]
    for _ in range(rounds):
        for r in live:
            reset_peak_rss()
            for _ in range(per_round):
                t = time.perf_counter()
                r.run()
                r.times.append(time.perf_counter() - t)
            r.peak_rss_mb = max(r.peak_rss_mb, peak_rss_mb())


def summarize(rungs: list[Rung], peaks: dict, baseline_of) -> list[dict]:
    """Rows with medians; GFLOP/s as a share of the matmul peak of the rung's own dtype (bf16 rungs: the bf16 peak,
    None where bf16 has no measured peak)."""
    rows = []
    by_name = {r.name: r for r in rungs}
    for r in rungs:
        row = {"rung": r.name, "label": r.label, "skipped": r.skipped}
        if r.skipped is None:
            med = statistics.median(r.times)
            base = by_name[baseline_of(r.name)]
            key, peak = peak_for(r.dtype, peaks)
            row.update(ms_per_iter=med * 1e3, img_per_s=r.items / med, speedup=statistics.median(base.times) / med,
                       gflops=r.flops / med / 1e9, peak_key=key,
                       pct_matmul_peak=100 * r.flops / med / 1e9 / peak if peak else None,
                       peak_rss_mb=r.peak_rss_mb, setup_s=r.setup_s, repeats_s=r.times)
        rows.append(row)
    return rows


def print_table(rows: list[dict], peaks: dict) -> None:
    print("\nmatmul peak (1024^3, measured, GFLOP/s): " + ", ".join(
        [f"{k} {v:.1f}" for k, v in peaks.items() if isinstance(v, float)]
        + ([f"bf16 {peaks['bf16_note']}"] if "bf16_note" in peaks else [])))
    head = f"{'rung':<24}{'ms/iter':>10}{'img/s':>9}{'speedup':>9}{'GFLOP/s':>9}{'% peak':>8}{'RSS MB':>9}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["skipped"]:
            print(f"{r['rung']:<24}{'skipped':>10}  {r['skipped']}")
            continue
        pct = f"{r['pct_matmul_peak']:>7.0f}%" if r["pct_matmul_peak"] is not None else f"{'n/a':>8}"
        print(f"{r['rung']:<24}{r['ms_per_iter']:>10.1f}{r['img_per_s']:>9.2f}{r['speedup']:>8.2f}x"
              f"{r['gflops']:>9.1f}{pct}{r['peak_rss_mb']:>9.0f}  {r['label']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA / "train"), help="paired images (default: shared facades)")
    p.add_argument("--json", default="bench-core.json")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per_round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="fewer repeats (same models)")
    p.add_argument("--compile", action="store_true", help="add a --compile rung (slow to compile on CPU)")
    p.add_argument("--only", choices=("train", "infer"), default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round, args.warmup = 2, 1, 1
    peaks = cpu_peaks()  # fp32, and bf16 where native: each row against its own dtype's peak
    rows: list[dict] = []
    if args.only in (None, "train"):
        rungs = train_rungs(args)
        run_rounds(rungs, args.rounds, args.per_round)
        rows += summarize(rungs, peaks, lambda n: "baseline")
    if args.only in (None, "infer"):
        rungs = infer_rungs(args)
        run_rounds(rungs, args.rounds, args.per_round * 2)
        rows += summarize(rungs, peaks, lambda n: "-".join(n.split("-")[:2]) + "-baseline")
    result = {"env": environment(), "matmul_peak_gflops": peaks["fp32"], "matmul_peaks": peaks, "config": vars(args),
              "rows": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, peaks)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
