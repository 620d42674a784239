"""The bench sections behind ``fastp2p bench``: ``train`` (the ablation ladder), ``infer`` (generator backends),
``data`` (loaders) and ``kernels`` (fused Triton ops, GPU only). Each returns a list of ``harness.Rung`` (or rows);
``run_bench`` assembles the JSON result and prints the table last.

Train ladder, 256x256, paper recipe (unet_256 + 70x70 PatchGAN, batch norm, Adam 2e-4 / 0.5, lambda_L1 100), at batch 1
and a large batch, each rung cumulative over the one before it:

    baseline -> fastp2p -> channels-last -> amp -> triton -> compile -> cuda-graphs -> dali/gpu-cache  (+ data-included)

Every rung trains on the same random (not zero) in-memory batch, so input loading does not enter the step timing;
``data-included`` is the last measured rung's config fed by the real loader (facades, else the synthetic set).
FLOPs: one baseline step under ``torch.utils.flop_counter`` per batch size; every rung of that batch does the same
math, so its TFLOP/s = those FLOPs / its median step time, shown as a share of the matmul peak measured in this run
for the dtype the rung computes in (fp32 rungs against the fp32 peak, bf16 AMP rungs against the bf16 peak, measured
only where bf16 is native, else n/a).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastp2p.bench import harness
from fastp2p.bench.core import DEFAULT_DATA, BaselineTrain
from fastp2p.bench.harness import Rung

from fastp2p.config import Config, DataConfig, ModelConfig, TrainConfig

TRAIN_RUNGS = ("baseline", "fastp2p", "channels-last", "amp", "triton", "compile", "cuda-graphs", "dali-gpu-cache",
               "data-included")


@dataclasses.dataclass
class Plan:
    device: str = "cpu"
    quick: bool = False
    tiny: bool = False
    batches: tuple = (1, 4)
    rounds: dict = dataclasses.field(default_factory=dict)  # batch -> (rounds, per_round)
    warmup: int = 2
    compile_cpu: bool = False  # compile rung on a CPU (minutes to compile on 2 cores)

    @classmethod
    def make(cls, device: str, quick: bool, tiny: bool, large_batch: int | None = None, compile_cpu: bool = False):
        big = large_batch or (16 if device == "cuda" else 4)
        if tiny:
            big = large_batch or 2
        p = cls(device, quick, tiny, (1, big), compile_cpu=compile_cpu)
        if quick or tiny:
            p.rounds, p.warmup = {1: (3, 1), big: (2, 1)}, 1
        else:
            p.rounds, p.warmup = {1: (5, 2), big: (3, 1)}, 2
        if device == "cuda":  # steps are ms: many more repeats cost nothing
            p.rounds = {1: (10, 10), big: (10, 3)} if not quick else {1: (5, 5), big: (5, 2)}
            p.warmup = 5
        return p

    def config(self, batch: int, **train) -> Config:
        if self.tiny:
            m, d = ModelConfig(netG="unet_128", ngf=8, ndf=8), DataConfig(load_size=143, crop_size=128, num_workers=1)
        else:  # the paper's facades recipe
            m, d = ModelConfig(), DataConfig(direction="BtoA")
        return Config(m, d, TrainConfig(batch_size=batch, device=self.device, **train))


def _gpu_only(device: str) -> str | None:
    return None if device == "cuda" else "GPU only (no CUDA device in this run)"


def train_rungs(plan: Plan, batches, log=print) -> tuple[list[Rung], dict]:
    from fastp2p.train import Trainer, amp_dtype

    dev = torch.device(plan.device)
    rungs: list[Rung] = []
    config = {}
    for bs in batches:
        group = f"train:b{bs}"
        base_cfg = plan.config(bs)
        config[group] = base_cfg.to_dict() if hasattr(base_cfg, "to_dict") else dataclasses.asdict(base_cfg)
        size = base_cfg.data.crop_size
        g = torch.Generator().manual_seed(1234 + bs)
        A = (torch.rand(bs, 3, size, size, generator=g) * 2 - 1).to(dev)
        B = (torch.rand(bs, 3, size, size, generator=g) * 2 - 1).to(dev)
        same = itertools.repeat((A, B))

        def mk(name, label, bs=bs, group=group, **kw):
            return Rung(name, label, bs, group=group, baseline=f"{group}:baseline", **kw)

        # baseline: the reference step, eager fp32 NCHW, for-loop Adam
        log(f"[train b{bs}] baseline")
        t0 = time.perf_counter()
        torch.manual_seed(0)
        base = BaselineTrain(base_cfg, same)
        base.G.to(dev)
        base.D.to(dev)
        for _ in range(plan.warmup):
            base()
        harness.sync(plan.device)
        r = mk(f"{group}:baseline", "reference step, eager fp32 NCHW, for-loop Adam (bench/core.BaselineTrain)",
               run=base, setup_s=time.perf_counter() - t0)
        r.flops = harness.count_flops(base)
        flops = r.flops
        rungs.append(r)

        # cumulative fastp2p rungs
        kw: dict = {"channels_last": False, "kernels": "torch"}
        last_live_kw = dict(kw)
        steps = [
            ("fastp2p", "fastp2p Trainer fp32 NCHW: fused Adam" + (" + GEMM small-spatial convs" if
                                                                     plan.device == "cpu" else ""), {}, None),
            ("channels-last", "+ channels-last memory format", {"channels_last": True}, None),
            ("amp", "+ AMP autocast ({})", {"amp": True},
             None if amp_dtype(dev) is not None else "CPU without native bf16 (avx512_bf16/AMX): AMP would be fp32"),
            ("triton", "+ fused Triton norm+activation kernels", {"kernels": "triton"}, _triton_skip(plan.device)),
            ("compile", "+ torch.compile of G and both loss functions", {"compile": True}, _compile_skip(plan)),
        ]
        for name, label, add, skip in steps:
            kw.update(add)
            if "{}" in label:
                label = label.format(str(amp_dtype(dev)).replace("torch.", ""))
            if skip:
                rungs.append(mk(f"{group}:{name}", label, skipped=skip))
                for k in add:  # a skipped rung adds nothing to the ones after it
                    kw[k] = last_live_kw.get(k, TrainConfig.__dataclass_fields__[k].default)
                continue
            log(f"[train b{bs}] {name}")
            cfg = plan.config(bs, **kw)
            t0 = time.perf_counter()
            torch.manual_seed(0)
            tr = Trainer(cfg, plan.device)

            def step(tr=tr, A=A, B=B):
                tr.train_step(A, B)

            for _ in range(plan.warmup):
                step()
            harness.sync(plan.device)
            rungs.append(mk(f"{group}:{name}", label, run=step, setup_s=time.perf_counter() - t0, flops=flops,
                            amp=bool(kw.get("amp")), dtype=compute_dtype(bool(kw.get("amp")), dev),
                            extra={"train_config": dict(kw)}))
            last_live_kw = dict(kw)
        rungs.append(mk(f"{group}:cuda-graphs", "+ CUDA graph capture of the whole step",
                        skipped="not implemented: the trainer has no CUDA-graph capture yet"
                        + ("" if plan.device == "cuda" else "; GPU only")))
        # Real input: the last measured config fed by a loader. On CUDA first the GPU input path (DALI 'mixed' when
        # installed, else the GPU-resident cache), then the torch loader (data-included) for comparison.
        from fastp2p.bench.core import endless

        from fastp2p import data as data_mod

        root = DEFAULT_DATA / "train"
        fed = [("data-included", "torch")]
        if plan.device == "cuda":
            fed.insert(0, ("dali-gpu-cache", "dali" if data_mod.backends.dali_available() and root.is_dir()
                           else "gpu-cache"))
        else:
            rungs.append(mk(f"{group}:dali-gpu-cache", "+ DALI / GPU-resident dataset cache as input",
                            skipped="GPU only: DALI 'mixed' decoding and the device-resident cache feed a CUDA "
                            "trainer; on a CPU `fastp2p bench data` times dali-cpu and gpu-cache-cpu"))
        for name, kind in fed:
            log(f"[train b{bs}] {name} ({kind} loader)")
            cfg = plan.config(bs, **last_live_kw)
            dcfg = dataclasses.replace(cfg.data, data=str(root) if root.is_dir() else None, loader=kind,
                                       num_workers=2)
            cfg = dataclasses.replace(cfg, data=dcfg)
            ds = data_mod.build_dataset(dcfg, 3, 3, seed=0)
            t0 = time.perf_counter()
            loader = endless(data_mod.make_train_loader(cfg, ds, plan.device))
            torch.manual_seed(0)
            tr = Trainer(cfg, plan.device)

            def step_data(tr=tr, loader=loader):
                a, b = next(loader)
                tr.train_step(a.to(dev, non_blocking=True), b.to(dev, non_blocking=True))

            for _ in range(plan.warmup):
                step_data()
            harness.sync(plan.device)
            label = (f"last measured rung fed by the {kind} loader"
                     + (" (2 workers)" if kind != "gpu-cache" else "")
                     + f" from {'facades' if root.is_dir() else 'the synthetic set'}")
            rungs.append(mk(f"{group}:{name}", label, run=step_data, setup_s=time.perf_counter() - t0, flops=flops,
                            amp=bool(last_live_kw.get("amp")), dtype=compute_dtype(bool(last_live_kw.get("amp")), dev),
                            extra={"train_config": dict(last_live_kw), "loader": kind}))
    return rungs, config


def compute_dtype(amp: bool, device: torch.device) -> str:
    """The dtype a rung's matmuls run in, as ``matmul_peaks`` keys it: the AMP dtype under ``--amp``, else fp32."""
    from fastp2p.train import amp_dtype

    dt = amp_dtype(device) if amp else None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp32")


def _triton_skip(device: str) -> str | None:
    if device != "cuda":
        return "GPU only: the Triton kernels run compiled on CUDA (on a CPU only the test interpreter runs them)"
    try:
        from fastp2p.kernels import norm_act

        return None if norm_act.triton_usable("cuda") else "Triton not installed or not usable on this GPU"
    except Exception as e:  # pragma: no cover
        return f"fastp2p.kernels unavailable: {type(e).__name__}: {e}"


def _compile_skip(plan: Plan) -> str | None:
    if plan.device == "cpu" and not plan.compile_cpu:
        return ("CPU: compiling the train step takes minutes on 2 cores and the default run stays short; "
                "pass --compile-cpu to measure it")
    return None


def run_train(plan: Plan, peaks: dict, log=print) -> tuple[list[dict], dict]:
    """One batch size at a time (its models freed before the next is built), rungs interleaved round by round."""
    import gc

    rows, config = [], {}
    for bs in plan.batches:
        rungs, cfg = train_rungs(plan, [bs], log)
        config.update(cfg)
        rounds, per = plan.rounds[bs]
        log(f"[train b{bs}] timing: {rounds} rounds x {per} steps per rung, interleaved")
        harness.run_rounds(rungs, rounds, per, plan.device)
        rows += harness.summarize(rungs, peaks)
        for r in rungs:
            r.run = None
        del rungs
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    return rows, config


# -- infer --------------------------------------------------------------------------------------------------------
def run_infer(plan: Plan, peaks: dict, log=print) -> tuple[list[dict], dict]:
    """Every generator backend via bench/engines.py (torch eager, ONNX Runtime, TensorRT when present) plus the
    compiled torch path: ``fastp2p.perf.optimize_for_inference`` on a CPU, ``torch.compile`` on CUDA."""
    import argparse

    from fastp2p.bench import engines

    from fastp2p.models import build_generator

    batches = [1, 2] if plan.tiny else [1, 8, 32]
    args = argparse.Namespace(mode="eval", batch=batches, size=256, rounds=3 if plan.quick or plan.tiny else 5,
                              calls=(0.2 if plan.tiny else 1.0 if plan.quick else 2.0), warmup=1 if plan.quick else 2,
                              spin=False, compile=False)
    ngf = 8 if plan.tiny else 64
    orig = engines.build_generator
    engines.build_generator = lambda name="unet_256": orig(name, 3, 3, ngf)
    try:
        with tempfile.TemporaryDirectory(prefix="fastp2p-bench-") as work:
            log("[infer] building backends (ONNX export, ...)")
            erungs = engines.build_rungs(args, Path(work))
            erungs += _compiled_rungs(plan, args, ngf, build_generator, engines, log)
            per_round = {}
            for bs in batches:
                b = next(r for r in erungs if r.batch == bs and r.backend == "torch-eager")
                ts = [harness.time_call(b.fn, "cpu") for _ in range(2)]
                per_round[bs] = max(1, int(args.calls / max(min(ts), 1e-4)))
            log(f"[infer] timing: {args.rounds} rounds, calls per round {per_round}")
            engines.run_rounds(erungs, args.rounds, per_round)
    finally:
        engines.build_generator = orig
    order = {bs: i for i, bs in enumerate(batches)}
    erungs.sort(key=lambda r: order[r.batch])
    rows = []
    for e in engines.summarize(erungs):
        group = f"infer:b{e['batch']}"
        cuda = e["backend"].startswith("tensorrt") or e["backend"].endswith("cuda")
        row = {"section": "infer", "group": group, "rung": f"{group}:{e['backend']}",
               "label": f"{e['backend']}, eval mode, 256x256" + (f", max |err| {e['max_abs_err']:.1e}"
                                                                 if e.get("max_abs_err") is not None else ""),
               "baseline": f"{group}:torch-eager{'-cuda' if cuda else ''}", "items": e["batch"],
               "skipped": e["skipped"]}
        if not e["skipped"]:
            row.update(ms_per_iter=e["p50_ms"], p50_ms=e["p50_ms"], p99_ms=e["p99_ms"], img_per_s=e["img_per_s"],
                       speedup=e["speedup"], setup_s=e["setup_s"], peak_mem_mb=harness.peak_memory_mb("cpu"),
                       repeats_s=e["times_s"], max_abs_err=e["max_abs_err"])
        rows.append(row)
    return rows, {"infer": {k: v for k, v in vars(args).items()}, "ngf": ngf}


def _compiled_rungs(plan, args, ngf, build_generator, engines, log):
    from fastp2p import perf
    from fastp2p.inference import with_mode

    out = []
    torch.manual_seed(0)
    G = with_mode(build_generator("unet_256", 3, 3, ngf), "eval", inplace=True)
    for bs in args.batch:
        x = torch.rand(bs, 3, 256, 256, generator=torch.Generator().manual_seed(bs)) * 2 - 1
        with torch.inference_mode():
            ref = G(x)
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            log(f"[infer b{bs}] torch.compile on CUDA")
            Gc = torch.compile(with_mode(build_generator("unet_256", 3, 3, ngf), "eval", inplace=True).cuda())
            Gc._orig_mod.load_state_dict(G.state_dict())
            xd = x.cuda()

            def call(Gc=Gc, xd=xd):
                with torch.inference_mode():
                    Gc(xd)
                torch.cuda.synchronize()

            with torch.inference_mode():
                y = Gc(xd).float().cpu()
            name = "torch-compile-cuda"
        else:
            log(f"[infer b{bs}] optimize_for_inference")
            fast = perf.optimize_for_inference(G, (bs, 3, 256, 256), method="packed" if plan.tiny else "auto")

            def call(fast=fast, x=x):
                with torch.inference_mode():
                    fast(x)

            with torch.inference_mode():
                y = fast(x)
            name = f"torch-optimized-{fast.method}"
        setup = time.perf_counter() - t0
        for _ in range(args.warmup):
            call()
        out.append(engines.Rung(name, bs, call, sync=torch.cuda.is_available(), setup_s=setup,
                                max_abs_err=(y - ref).abs().max().item()))
    return out


# -- data ---------------------------------------------------------------------------------------------------------
class RefStyleAligned(torch.utils.data.Dataset):
    """The reference's AlignedDataset, per item with PIL: open AB, split, resize to load_size (bicubic), random crop,
    random flip, to [-1, 1] float tensors."""

    def __init__(self, root: Path, load: int, crop: int):
        self.files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in (".jpg", ".png", ".jpeg"))
        self.load, self.crop = load, crop

    def __len__(self):
        return len(self.files)

    def _t(self, im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()

    def __getitem__(self, i):
        from PIL import Image

        ab = Image.open(self.files[i]).convert("RGB")
        w, h = ab.size
        a, b = ab.crop((0, 0, w // 2, h)), ab.crop((w // 2, 0, w, h))
        x, y = random.randint(0, self.load - self.crop), random.randint(0, self.load - self.crop)
        flip = random.random() > 0.5
        out = []
        for im in (a, b):
            im = im.resize((self.load, self.load), Image.BICUBIC).crop((x, y, x + self.crop, y + self.crop))
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(self._t(im))
        return out[1], out[0]  # BtoA


def run_data(plan: Plan, log=print) -> tuple[list[dict], dict]:
    from fastp2p.bench.core import endless

    from fastp2p import data as data_mod

    root = DEFAULT_DATA / "train"
    group = "data:b1"
    n = 8 if plan.tiny else 32 if plan.quick else 100
    workers = 2
    base_name = f"{group}:reference-pil"
    if not root.is_dir():
        return harness.summarize([Rung(base_name, "", n, group=group, baseline=base_name,
                                       skipped=f"facades not found at {root}")], None), {}
    d = plan.config(1).data
    log(f"[data] loaders over {root}, {n} pairs per timed unit, {workers} workers")
    ref_loader = torch.utils.data.DataLoader(RefStyleAligned(root, d.load_size, d.crop_size), batch_size=1,
                                             shuffle=True, num_workers=workers, persistent_workers=True)

    def ref_endless():
        while True:
            yield from ref_loader

    ds = data_mod.build_dataset(dataclasses.replace(d, data=str(root)), 3, 3, seed=0)
    its = {"ref": ref_endless(), "fast": endless(data_mod.make_loader(ds, 1, workers, 0))}

    def pull(it, per=1):
        def run():
            got = 0
            while got < n:
                a, _ = next(it)
                got += a.shape[0] if per > 1 else 1
        return run

    rungs = [Rung(base_name, f"reference-style per-item PIL AlignedDataset, DataLoader({workers} workers)", n,
                  run=pull(its["ref"]), group=group, baseline=base_name),
             Rung(f"{group}:fastp2p-loader", f"fastp2p.data.make_loader ({workers} workers), facades BtoA", n,
                  run=pull(its["fast"]), group=group, baseline=base_name)]
    # DALI and gpu-cache at batch 4 (they work per batch; the two above per pair): pairs/s is what the trainer gets.
    fast_bs = 4
    rungs += _fast_data_rungs(ds, group, base_name, n, workers, fast_bs, pull, log)
    for r in rungs:
        if r.run is None:
            continue
        t0 = time.perf_counter()
        r.run()  # warm-up: worker start-up, pipeline build and cache decode excluded (setup s also holds the build)
        r.setup_s = (r.setup_s or 0.0) + time.perf_counter() - t0
    harness.run_rounds(rungs, 3, 1, "cpu")
    rows = harness.summarize(rungs, None)
    for r in rows:
        r["unit"] = "pairs"
    return rows, {"data": {"root": str(root), "pairs_per_unit": n, "workers": workers, "fast_batch": fast_bs}}


def _fast_data_rungs(ds, group, base_name, n, workers, bs, pull, log) -> list[Rung]:
    """DALI (CPU threads; mixed GPU decode on CUDA) and gpu-cache (host tensors; device memory on CUDA) over the
    same dataset, ``workers`` threads for DALI. GPU rungs synchronize per batch so the time covers the device work."""
    from fastp2p.bench.core import endless

    from fastp2p.data import backends

    def mk(name, label, factory, skip=None):
        if skip:
            return Rung(f"{group}:{name}", label, n, group=group, baseline=base_name, skipped=skip)
        t0 = time.perf_counter()
        try:
            loader = factory()
        except Exception as e:  # reported as a skipped row, not a crash of the whole bench
            return Rung(f"{group}:{name}", label, n, group=group, baseline=base_name,
                        skipped=f"failed: {type(e).__name__}: {e}"[:200])
        it = endless(loader)
        if "cuda" in name:
            def synced(it=it):
                while True:
                    a, b = next(it)
                    torch.cuda.synchronize()
                    yield a, b
            it = synced()
        log(f"[data] {name}")
        return Rung(f"{group}:{name}", label, n, run=pull(it, bs), group=group, baseline=base_name,
                    setup_s=time.perf_counter() - t0)

    no_dali = None if backends.dali_available() else f"DALI not installed ({backends.DALI_INSTALL})"
    no_gpu = None if torch.cuda.is_available() else "GPU only (no CUDA device in this run)"

    def dali(device):
        from fastp2p.data.dali import DaliLoader

        return lambda: DaliLoader(ds, bs, 0, device=device, num_threads=workers, drop_last=True,
                                  channels_last=device == "cuda")

    def cache(device):
        from fastp2p.data.gpu_cache import GpuCacheLoader

        return lambda: GpuCacheLoader(ds, bs, 0, device=device, drop_last=True, channels_last=device == "cuda")

    return [mk("dali-cpu", f"DALI, CPU decode + ops on {workers} threads, batch {bs}", dali("cpu"), no_dali),
            mk("gpu-cache-cpu", f"gpu-cache path on host tensors (decoded once), batch {bs}", cache("cpu")),
            mk("dali-cuda", f"DALI, mixed (nvJPEG) decode + GPU ops, {workers} threads, batch {bs}", dali("cuda"),
               no_dali or no_gpu),
            mk("gpu-cache-cuda", f"gpu-cache, uint8 dataset in GPU memory, batch {bs}", cache("cuda"), no_gpu)]


# -- kernels ------------------------------------------------------------------------------------------------------
def run_kernels(plan: Plan, log=print) -> tuple[list[dict], dict]:
    skip = None if plan.device == "cuda" else "GPU only (no CUDA device in this run): bench/kernels.py needs CUDA"
    if skip is None:
        skip = _triton_skip("cuda")
    if skip:
        return [{"section": "kernels", "group": "kernels", "rung": "kernels:fused-norm-act", "label": "",
                 "baseline": "", "items": 0, "skipped": skip}], {}
    import json

    from fastp2p.bench import kernels

    with tempfile.TemporaryDirectory() as t:
        path = str(Path(t) / "k.json")
        kernels.main(["--json", path] + (["--reps", "20", "--batch", "1", "16"] if plan.quick else []))
        data = json.loads(Path(path).read_text())
    return [], {"kernels": data}


SECTIONS = ("train", "infer", "data", "kernels")


def run_bench(section: str, plan: Plan, log=print) -> dict:
    sections = SECTIONS if section == "all" else (section,)
    t_start = time.perf_counter()
    log(f"[bench] measuring matmul peaks on {plan.device}")
    peaks = harness.matmul_peaks(plan.device)
    result = {"schema": "fastp2p.bench/1", "env": harness.environment(plan.device), "matmul_peaks": peaks,
              "config": {"section": section, "plan": dataclasses.asdict(plan)}, "rows": [],
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for s in sections:
        t0 = time.perf_counter()
        if s == "train":
            rows, cfg = run_train(plan, peaks, log)
        elif s == "infer":
            rows, cfg = run_infer(plan, peaks, log)
        elif s == "data":
            rows, cfg = run_data(plan, log)
        else:
            rows, cfg = run_kernels(plan, log)
        result["rows"] += rows
        if s == "kernels":
            result["kernels"] = cfg.get("kernels")
        else:
            result["config"][s] = cfg
        result.setdefault("section_s", {})[s] = time.perf_counter() - t0
    harness.merge_peaks(result, harness.matmul_peaks(plan.device))
    result["total_s"] = time.perf_counter() - t_start
    return result
