"""Data-parallel scaling: training img/s with N processes (torchrun, DDP) against N x the img/s of one process.

    python -m fastp2p.bench.scaling [--nprocs 1,2] [--device cpu|cuda] [--model paper|debug] [--json PATH]

Method. Each measurement is a fresh job: N = 1 is one plain process (no process group, the trainer as a single-GPU
user runs it), N > 1 is ``torch.distributed.run --standalone --nproc_per_node N`` (gloo on CPU, NCCL on CUDA). Every
rank trains on fixed random batches already on its device (no data loading: this measures compute + gradient
all-reduce, the part DDP adds), ``--batch`` images per rank, the paper's step (D step, G step, fused Adam, per-step
loss all-reduce for the logs). After ``--warmup`` steps, ``--steps`` steps are timed between two barriers (CUDA:
synchronized). img/s = N x batch x steps / time; scaling efficiency = img/s(N) / (N x img/s(1)). The N values are
interleaved round by round (``--rounds``) and the table shows medians, since the machine is shared.

CPU threads: with N processes on C cores each rank gets C / N threads (``OMP_NUM_THREADS``, what ``fastp2p train
--nproc`` sets), so N = 2 on 2 cores is two 1-thread ranks against one 2-thread process: on a CPU this measures the
cost of the all-reduce and of splitting the cores, not extra compute. ``--threads 1`` gives every rank (and the
baseline) one thread: the efficiency then isolates what DDP's communication costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # the paper's nets at 256x256 (54M + 2.8M parameters: the all-reduce volume a real run has)
    "paper": dict(netG="unet_256", ngf=64, ndf=64, crop_size=256, load_size=286),
    # the debug preset's nets at 128x128 (quick)
    "debug": dict(netG="unet_128", ngf=16, ndf=16, crop_size=128, load_size=143),
}


def worker(args) -> int:
    """One rank: train ``warmup + steps`` steps on fixed batches, rank 0 writes its timing to ``args.result``."""
    import torch
    import torch.distributed as dist

    from fastp2p import distributed
    from fastp2p.config import Config, DataConfig, ModelConfig, TrainConfig
    from fastp2p.train import Trainer

    m = MODELS[args.model]
    cfg = Config(ModelConfig(netG=m["netG"], ngf=m["ngf"], ndf=m["ndf"]),
                 DataConfig(crop_size=m["crop_size"], load_size=m["load_size"]),
                 TrainConfig(device=args.device, batch_size=args.batch, amp=args.amp))
    d = distributed.setup(args.device)
    device = d.device(args.device)
    tr = Trainer(cfg, device, dist=d)
    g = torch.Generator().manual_seed(1 + d.rank)
    shape = (args.batch, 3, m["crop_size"], m["crop_size"])
    A, B = (torch.rand(shape, generator=g).mul(2).sub(1).to(device) for _ in range(2))

    def barrier():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if d.enabled:
            dist.barrier(group=d.cpu_group)

    t_setup = time.perf_counter()
    for _ in range(args.warmup):
        d.mean_losses(tr.train_step(A, B))
    barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        d.mean_losses(tr.train_step(A, B))  # the per-step loss all-reduce fit() does for the logs
    barrier()
    dt = time.perf_counter() - t0
    if d.is_main:
        Path(args.result).write_text(json.dumps({
            "nproc": d.world_size, "seconds": dt, "steps": args.steps, "warmup_s": t0 - t_setup,
            "img_per_s": d.world_size * args.batch * args.steps / dt, "torch_threads": torch.get_num_threads()}))
    tr.release_ddp()
    d.close()
    return 0


def run_one(n: int, args, tmp: Path) -> dict:
    result = tmp / f"n{n}-{time.monotonic_ns()}.json"
    inner = ["-m", "fastp2p.bench.scaling", "--worker", "--result", str(result), "--model", args.model, "--device",
             args.device, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.amp:
        inner.append("--amp")
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    if args.device == "cpu":  # cores / N threads per rank, or --threads for every N
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, cores // n))
    cmd = [sys.executable, *inner] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *inner]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0 or not result.is_file():
        raise RuntimeError(f"N={n} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", default="1,2", help="process counts to measure, comma separated (1 is the baseline)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=tuple(MODELS), default="paper")
    p.add_argument("--batch", type=int, default=1, help="images per rank per step (the paper: 1)")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="measurements per N, interleaved; medians reported")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per rank for every N (default: cores / N); 1 isolates the all-reduce's cost")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    from fastp2p.bench.harness import environment

    nprocs = sorted({int(x) for x in args.nprocs.split(",")} | {1})
    runs: dict[int, list[dict]] = {n: [] for n in nprocs}
    with tempfile.TemporaryDirectory(prefix="fastp2p-scaling-") as tmp:
        for r in range(args.rounds):
            for n in nprocs:
                res = run_one(n, args, Path(tmp))
                runs[n].append(res)
                print(f"round {r + 1}/{args.rounds} N={n}: {res['img_per_s']:.3f} img/s", file=sys.stderr, flush=True)
    base = statistics.median(x["img_per_s"] for x in runs[1])
    rows = []
    for n in nprocs:
        ips = statistics.median(x["img_per_s"] for x in runs[n])
        rows.append({"nproc": n, "img_per_s": ips, "ms_per_step": 1e3 * n * args.batch / ips,
                     "speedup": ips / base, "efficiency": ips / (n * base),
                     "threads_per_rank": runs[n][0]["torch_threads"], "repeats": runs[n]})
    env = environment(args.device)
    result = {"bench": "scaling", "env": env, "config": {**vars(args), **MODELS[args.model]}, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"JSON: {args.json}", file=sys.stderr)
    print(f"\nfastp2p data-parallel scaling on {args.device}: {env['gpu'] or env['cpu']} ({env['cores']} cores), "
          f"torch {env['torch']}, git {(env['git_sha'] or '?')[:10]}")
    print(f"model {args.model} ({MODELS[args.model]['netG']}, ngf {MODELS[args.model]['ngf']}, "
          f"{MODELS[args.model]['crop_size']}px), batch {args.batch} per rank, {args.steps} timed steps, "
          f"median of {args.rounds}")
    head = f"{'N':>3}{'threads/rank':>14}{'ms/step':>10}{'img/s':>9}{'speedup':>9}{'efficiency':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['nproc']:>3}{r['threads_per_rank']:>14}{r['ms_per_step']:>10.1f}{r['img_per_s']:>9.3f}"
              f"{r['speedup']:>8.2f}x{100 * r['efficiency']:>11.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
