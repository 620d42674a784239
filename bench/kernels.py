"""Kernel benchmark: fused norm + activation (``fastp2p.kernels.norm_act``) forward + backward at the pix2pix nets' real
norm sites, against eager PyTorch (cuDNN batch norm / instance norm + activation module) and torch.compile's own fusion.

    python -m fastp2p.bench.kernels [--batch 1 32] [--size 256] [--dtype float32 bfloat16] [--norm batch]
                                    [--reps 50] [--variant v1 v2] [--json PATH]

CUDA only: on a CPU-only machine it says that timing needs a GPU and exits 0 (the Triton interpreter measures Python,
not kernels). Per site and candidate: median fwd+bwd time over ``--reps`` iterations timed with CUDA events (after
warm-up; compile time excluded and reported apart), and achieved bandwidth counting the minimum traffic of a fused op,
read x + write y forward and read x, dy + write dx backward (5 tensors' worth), as GB/s and as a share of the device's
copy bandwidth measured in the same run (``dst.copy_(src)`` on 1 GiB, read + write). Rows go to JSON with the device,
versions, git sha and config; the table is printed last.

Candidates: ``eager`` (nn norm + nn activation, channels-last), ``compile`` (the same, torch.compile default mode),
``triton-v1`` / ``triton-v2`` (FusedNormAct, opaque custom_op, kernel implementation v1 (3-launch forward, serial
merge, host-side running-statistics update) or v2 (the default: <= 2 launches each way, no host sync); ``--variant``
picks which), ``triton_op+compile`` (FusedNormAct v2 through the triton_op registration, under torch.compile:
inductor sees the kernels). Each row also counts, per fwd+bwd, the Triton launches (eager candidates) and every CUDA
kernel / memset / memcpy the profiler sees (``cuda_kernels``, ``cuda_memops``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

NO_GPU = "fastp2p.bench.kernels: timing the Triton kernels needs a GPU (CUDA); none here, nothing measured."


def norm_sites(size: int = 256, norm: str = "batch", ngf: int = 64, ndf: int = 64) -> list[dict]:
    """Input shapes (batch 1) and fused activation of every norm in unet_256 (G) and the basic PatchGAN (D), found by
    running both on the meta device with forward hooks. G's down-path norms are followed by LeakyReLU(0.2) (fused once
    the U-Net keeps it as a module), its up-path norms by nothing fusable (dropout / cat come next)."""
    from fastp2p import kernels
    from fastp2p.models import build_discriminator, build_generator

    sites: list[dict] = []
    with torch.device("meta"):
        g = build_generator("unet_256", ngf=ngf, norm=norm, init=False)
        d = build_discriminator("basic", 6, ndf=ndf, norm=norm, init=False)
    kernels.apply_fused_kernels(g, "torch")
    kernels.apply_fused_kernels(d, "torch")
    for net, model, inp in (("G", g, (1, 3, size, size)), ("D", d, (1, 6, size, size))):
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, kernels.FusedNormAct):
                act = m.act
                if net == "G" and name.startswith("down_norm"):
                    act = "leaky_relu"
                hooks.append(m.register_forward_hook(
                    lambda mod, args, out, name=name, act=act, net=net: sites.append(
                        {"site": f"{net}.{name}", "shape": tuple(args[0].shape[1:]), "act": act, "kind": mod.kind})))
        with torch.no_grad():
            model(torch.empty(inp, device="meta"))
        for h in hooks:
            h.remove()
    return sites


def _eager_module(kind: str, C: int, act: str) -> nn.Module:
    norm = nn.BatchNorm2d(C) if kind == "batch" else nn.InstanceNorm2d(C)
    acts = {"leaky_relu": nn.LeakyReLU(0.2), "relu": nn.ReLU(), "none": nn.Identity()}
    return nn.Sequential(norm, acts[act])


def _time_cuda(fn, reps: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 20) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _candidates(kind: str, C: int, act: str, variants: tuple[str, ...] = ("v1", "v2")) -> dict[str, nn.Module]:
    from fastp2p.kernels import FusedNormAct

    eager = _eager_module(kind, C, act).cuda()
    cands = {"eager": eager, "compile": torch.compile(copy.deepcopy(eager))}
    for v in variants:
        cands[f"triton-{v}"] = FusedNormAct(copy.deepcopy(eager[0]), act, 0.2, "triton", variant=v)
    cands["triton_op+compile"] = torch.compile(FusedNormAct(copy.deepcopy(eager[0]), act, 0.2, "triton",
                                                            registration="triton_op", variant="v2"))
    return cands


def count_device_work(fn) -> dict:
    """Per call of ``fn``: Triton launches (``norm_act.counted_launches``: eager launchers only) and the CUDA kernels
    and memsets/memcpys torch.profiler sees (everything, torch's own small ops included)."""
    from fastp2p.kernels import norm_act
    from torch.profiler import ProfilerActivity, profile

    out: dict = {}
    with norm_act.counted_launches() as names:
        fn()
    torch.cuda.synchronize()
    out["triton_launches"] = len(names)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        dev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        mem = [e for e in dev if e.name.startswith(("Memcpy", "Memset"))]
        out.update(cuda_kernels=len(dev) - len(mem), cuda_memops=len(mem))
    except Exception as e:  # noqa: BLE001 - no CUPTI: the timing still counts
        out["profiler_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return out


def bench_site(site: dict, batch: int, dtype: torch.dtype, reps: int, copy_gbs: float,
               variants: tuple[str, ...] = ("v1", "v2")) -> list[dict]:
    C, H, W = site["shape"]
    shape = (batch, C, H, W)
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    xg = x.detach().requires_grad_(True)
    nbytes = 5 * x.numel() * x.element_size()
    rows = []
    for name, module in _candidates(site["kind"], C, site["act"], variants).items():
        module.train()

        def step(module=module):
            y = module(xg)
            y.backward(dy)
            xg.grad = None

        row = {**site, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "candidate": name}
        try:
            t0 = time.perf_counter()
            step()  # first call: compile / Triton JIT
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            ms = _time_cuda(step, reps)
            row.update(count_device_work(step))
            if "compile" in name:  # compiled: the launchers ran at trace time, not per call; the profiler counts
                row["triton_launches"] = None
        except Exception as e:  # noqa: BLE001 - a failing candidate is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
            continue
        gbs = nbytes / (ms * 1e-3) / 1e9
        row.update(ms=round(ms, 4), gbs=round(gbs, 1), copy_frac=round(gbs / copy_gbs, 3))
        rows.append(row)
    eager_ms = next((r["ms"] for r in rows if r["candidate"] == "eager" and "ms" in r), None)
    for r in rows:
        if eager_ms and "ms" in r:
            r["speedup_vs_eager"] = round(eager_ms / r["ms"], 2)
    return rows


def _cell(v) -> str:
    return "-" if v is None else str(v)


def _table(rows: list[dict], copy_gbs: float) -> str:
    head = f"{'site':<16}{'N,C,H,W':<20}{'act':<11}{'dtype':<10}{'candidate':<19}{'ms':>9}{'GB/s':>9}{'%copy':>7}" \
           f"{'x eager':>9}{'triton':>7}{'cuda':>6}"
    lines = [f"copy bandwidth (measured): {copy_gbs:.0f} GB/s; traffic counted: 5 x tensor bytes per fwd+bwd; "
             "launches per fwd+bwd: triton = Triton kernels, cuda = every CUDA kernel (profiler)", head,
             "-" * len(head)]
    for r in rows:
        shape = ",".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"{r['site']:<16}{shape:<20}{r['act']:<11}{r['dtype']:<10}{r['candidate']:<19}  "
                         f"FAILED {r['error']}")
            continue
        speedup = r.get("speedup_vs_eager", 0)
        lines.append(f"{r['site']:<16}{shape:<20}{r['act']:<11}{r['dtype']:<10}{r['candidate']:<19}"
                     f"{r['ms']:>9.4f}{r['gbs']:>9.1f}{100 * r['copy_frac']:>6.0f}%{speedup:>8.2f}x"
                     f"{_cell(r.get('triton_launches')):>7}{_cell(r.get('cuda_kernels')):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastp2p.bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--norm", default="batch", choices=["batch", "instance"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--variant", nargs="+", default=["v1", "v2"], choices=["v1", "v2"],
                   help="fused-kernel implementations to time side by side")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    from fastp2p.bench.core import environment
    from fastp2p.kernels import norm_act

    if not norm_act.triton_usable("cuda"):
        print("fastp2p.bench.kernels: Triton is not installed (pip install 'fastp2p[kernels]'); nothing measured.")
        return 0
    copy_gbs = copy_bandwidth_gbs()
    sites = norm_sites(args.size, args.norm)
    # one row per distinct (shape, act): several sites share a shape
    seen, unique = set(), []
    for s in sites:
        key = (s["shape"], s["act"], s["kind"])
        if key not in seen:
            seen.add(key)
            unique.append(s)
    rows = []
    for batch in args.batch:
        for dt in args.dtype:
            for s in unique:
                rows.extend(bench_site(s, batch, getattr(torch, dt), args.reps, copy_gbs, tuple(args.variant)))
    env = {**environment(), "triton": getattr(norm_act.triton, "__version__", None), "copy_gbs": round(copy_gbs, 1),
           "config": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(json.dumps(env))
    print(_table(rows, copy_gbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
