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

import contextlib
import copy
import dataclasses
import itertools
import random
import subprocess
import sys
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
    neighbours: int = 0  # infer: busy-loop processes beside the timed calls
    teacher: str | None = None  # infer: a checkpoint replacing the random ngf 64 teacher
    students: tuple = ()  # infer: checkpoints replacing the random ngf 32 / 16 students

    @classmethod
    def make(cls, device: str, quick: bool, tiny: bool, large_batch: int | None = None, compile_cpu: bool = False,
             neighbours: int = 0, teacher: str | None = None, students=()):
        big = large_batch or (16 if device == "cuda" else 4)
        if tiny:
            big = large_batch or 2
        p = cls(device, quick, tiny, (1, big), compile_cpu=compile_cpu, neighbours=neighbours, teacher=teacher,
                students=tuple(students))
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
# Issue 16: the teacher (unet_256 ngf 64) and two students of the same topology at ngf 32 and 16 (OMGD distils an
# ngf 16 unet_256 student from ngf 64: ~16x fewer MACs). --tiny: ngf 8/4/2 (unet_256 needs 256x256 inputs).
INFER_NGF = (64, 32, 16)
TINY_NGF = (8, 4, 2)
INFER_SIZE = 256
REPS_CAP = 100  # back-to-back calls per round of a rung much cheaper than the baseline (ngf 16 int8: ~40x cheaper)
RUNTIME_ORDER = ("torch-eager", "fastp2p", "torch-compile", "onnxruntime", "openvino", "tensorrt")
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp16/fp32", "int8")


@dataclasses.dataclass
class InferModel:
    name: str  # "unet_256-ngf64"
    G: torch.nn.Module  # eval mode
    cfg: object  # its checkpoint's Config (None: random weights or a reference .pth)
    weights: str  # "random" or the checkpoint's path
    params: int
    gflop_per_image: float  # torch.utils.flop_counter, one forward at INFER_SIZE x INFER_SIZE


def infer_models(plan: Plan, log=print) -> list[InferModel]:
    """The teacher first, then the students: seeded random weights, or the checkpoints ``plan.teacher`` /
    ``plan.students`` (fastp2p ``.safetensors`` or reference ``.pth``: ``fastp2p.checkpoint.load_generator``)."""
    from fastp2p.checkpoint import load_generator
    from fastp2p.errors import UserError
    from fastp2p.inference import with_mode
    from fastp2p.models import build_generator

    ngfs = TINY_NGF if plan.tiny else INFER_NGF
    specs = [("--teacher", plan.teacher, ngfs[0])]
    specs += [("--students", p, None) for p in plan.students] if plan.students else \
        [("--students", None, n) for n in ngfs[1:]]
    out: list[InferModel] = []
    for i, (flag, path, ngf) in enumerate(specs):
        if path:
            log(f"[infer] loading {flag} {path}")
            G, cfg = load_generator(path)
            netG = cfg.model.netG if cfg is not None else "unet_256"
            if int(G.down[0].in_channels) != 3:
                raise UserError(f"{flag} {path}: the bench feeds 3-channel images; this generator takes "
                                f"{G.down[0].in_channels}")
            weights = str(path)
        else:
            torch.manual_seed(i)  # the teacher: seed 0, as bench/engines.py builds it
            G, cfg, netG, weights = build_generator("unet_256", 3, 3, ngf), None, "unet_256", "random"
        G = with_mode(G, "eval", inplace=True)
        name = f"{netG}-ngf{int(G.down[0].out_channels)}"
        while any(m.name == name for m in out):  # two checkpoints of one width: keep the rows apart
            name += "'"
        x = torch.zeros(1, 3, INFER_SIZE, INFER_SIZE)
        with torch.inference_mode():
            flops = harness.count_flops(lambda G=G, x=x: G(x))
        out.append(InferModel(name, G, cfg, weights, sum(p.numel() for p in G.parameters()), flops / 1e9))
    return out


def infer_inputs(batches, size: int, direction: str, log=print) -> tuple[dict, str]:
    """batch -> the input every rung of that batch takes: facades val source images (the model's preprocessing)
    when ``DEFAULT_DATA`` has them, else seeded uniform [-1, 1]; and a description of which."""
    val = DEFAULT_DATA / "val"
    n = max(batches)
    if val.is_dir():
        try:
            from fastp2p.engines.quantize import calibration_batches

            cs = calibration_batches(val, {"crop_size": size, "direction": direction}, n, batch_size=n)
            x = torch.from_numpy(next(iter(cs))).float()
            if x.shape[0] == n:
                return {bs: x[:bs].clone() for bs in batches}, f"facades val sources ({direction}, {n} images)"
        except Exception as e:  # unreadable data: random inputs time the same
            log(f"[infer] facades val unreadable ({type(e).__name__}: {e}); random inputs")
    return ({bs: torch.rand(bs, 3, size, size, generator=torch.Generator().manual_seed(bs)) * 2 - 1
             for bs in batches}, "random uniform [-1, 1]")


def calibration_set(onnx_path: Path, n: int) -> tuple[object, str]:
    """INT8 calibration batches for ``onnx_path`` (its own preprocessing): facades val sources when present, else
    ``n`` seeded random [-1, 1] images; and what the row label says about it."""
    from fastp2p.engines.onnx import read_onnx_meta
    from fastp2p.engines.quantize import calibration_batches

    meta = read_onnx_meta(onnx_path)
    val = DEFAULT_DATA / "val"
    if val.is_dir():
        cs = calibration_batches(val, meta, n)
        return cs, f"calibrated on {len(cs)} facades val sources"
    size = int(meta["preprocessing"]["crop_size"])
    g = torch.Generator().manual_seed(1)
    return ([torch.rand(1, 3, size, size, generator=g) * 2 - 1 for _ in range(n)],
            f"calibrated on {n} random [-1, 1] inputs (no facades at {val})")


@contextlib.contextmanager
def busy_neighbours(n: int):
    """``n`` CPU-bound processes (bench/contention.py's busy loop) for the duration of the block."""
    from fastp2p.bench.contention import BUSY

    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_infer(plan: Plan, peaks: dict, log=print) -> tuple[list[dict], dict]:
    """Every generator backend via bench/engines.py (torch eager, ONNX Runtime, TensorRT when present) plus the
    compiled torch path (``fastp2p.perf.optimize_for_inference`` on a CPU, ``torch.compile`` on CUDA) for the
    teacher at batch 1/8/32, and the deployment rungs (issue 16) for the teacher and the students at batch 1/8: fastp2p
    bf16, ONNX Runtime fp32/int8, OpenVINO fp32/bf16/int8; all interleaved call by call per batch, all against the
    teacher's eager fp32 (``torch-eager``) at the same batch."""
    import argparse

    from fastp2p.bench import engines

    # --quick leaves batch 32 out (the teacher's eager/ONNX Runtime/inductor rungs there cost ~3 min on 2 busy cores)
    batches = [1, 2] if plan.tiny else [1, 8] if plan.quick else [1, 8, 32]
    deploy = [1, 2] if plan.tiny else [1, 8]
    # --tiny (tests): 2 rounds of ~0.05 s of baseline calls; every rung still runs, but no bf16 compile (~40 s)
    args = argparse.Namespace(mode="eval", batch=batches, size=INFER_SIZE,
                              rounds=2 if plan.tiny else 3 if plan.quick else 5,
                              calls=(0.05 if plan.tiny else 1.0 if plan.quick else 2.0),
                              warmup=1 if plan.quick or plan.tiny else 2, spin=False, compile=False)
    models = infer_models(plan, log)
    teacher = models[0]
    direction = teacher.cfg.data.direction if teacher.cfg is not None else "BtoA"  # facades: labels -> photo
    inputs, inputs_desc = infer_inputs(batches, args.size, direction, log)
    n_calib = 2 if plan.tiny else 16 if plan.quick else 64
    info: dict = {"openvino_hints": {}, "calibration": {}}
    # Every optimize_for_inference compile adds entries to the guard cache of UnetGenerator.forward (one code object
    # for all models and shapes, ~2 entries per compile). optimize_for_inference raises dynamo's recompile_limit for
    # its own build and refuses a build that compiled no graph; the limit stays raised here as well, for any
    # recompile during the timed calls of this section's ~16 compiled models.
    import torch._dynamo

    limits = torch._dynamo.config.patch(recompile_limit=max(256, torch._dynamo.config.recompile_limit))
    with limits, tempfile.TemporaryDirectory(prefix="fastp2p-bench-") as work:
        work = Path(work)
        erungs: list = []
        for i, m in enumerate(models):
            prefix = "" if i == 0 else f"{m.name}:"  # the teacher's rung ids stay as they were (contract)
            bs_m = batches if i == 0 else deploy
            margs = argparse.Namespace(**{**vars(args), "batch": bs_m})
            log(f"[infer] {m.name}: building backends (ONNX export, ...)")
            files: dict = {}
            erungs += engines.build_rungs(margs, work, m.G, cfg=m.cfg, model=m.name, prefix=prefix, inputs=inputs,
                                          direction=direction, files=files)
            erungs += _compiled_rungs(plan, margs, m, engines, log, prefix, inputs)
            erungs += _deploy_rungs(plan, args, m, deploy, inputs, files.get("onnx"), work, n_calib, prefix, info, log)
        with busy_neighbours(plan.neighbours):
            per_round = {}
            for bs in batches:
                live = [r for r in erungs if r.batch == bs and not r.skipped]
                ts = {}
                for r in live:  # the faster of two calls (one where a call takes over 0.5 s: batch 32)
                    t = harness.time_call(r.fn, "cpu")
                    ts[id(r)] = t if t > 0.5 else min(t, harness.time_call(r.fn, "cpu"))
                b = next(r for r in live if r.backend == "torch-eager")
                per_round[bs] = max(1, int(args.calls / max(ts[id(b)], 1e-4)))
                for r in live:  # each rung gets about the baseline's wall time per round, not its call count
                    r.reps = max(1, min(REPS_CAP, int(ts[id(b)] / max(ts[id(r)], 1e-6))))
            log(f"[infer] timing: {args.rounds} rounds, baseline calls per round {per_round}"
                + (f", {plan.neighbours} busy neighbour(s)" if plan.neighbours else ""))
            engines.run_rounds(erungs, args.rounds, per_round)
    by_name = {m.name: m for m in models}
    order = {bs: i for i, bs in enumerate(batches)}
    morder = {m.name: i for i, m in enumerate(models)}

    def key(r):
        return (order[r.batch], morder.get(r.model, 99), RUNTIME_ORDER.index(r.runtime)
                if r.runtime in RUNTIME_ORDER else 99, PRECISION_ORDER.index(r.precision)
                if r.precision in PRECISION_ORDER else 99)

    erungs.sort(key=key)
    rows = []
    for e in engines.summarize(erungs):
        group = f"infer:b{e['batch']}"
        cuda = e["backend"].startswith("tensorrt") or e["backend"].endswith("cuda")
        m = by_name.get(e["model"])
        label = (f"{e['backend']}, {e['model']} {e['precision']}" + (f" ({e['note']})" if e["note"] else "")
                 + f", eval mode, {args.size}x{args.size}"
                 + (", random weights" if m and m.weights == "random" else "")
                 + (f", max |err| {e['max_abs_err']:.1e}" if e.get("max_abs_err") is not None else ""))
        row = {"section": "infer", "group": group, "rung": f"{group}:{e['backend']}", "label": label,
               "baseline": f"{group}:torch-eager{'-cuda' if cuda else ''}", "items": e["batch"],
               "skipped": e["skipped"], "batch": e["batch"], "backend": e["backend"], "model": e["model"],
               "runtime": e["runtime"], "precision": e["precision"], "note": e["note"],
               "params": m.params if m else None, "gflop_per_image": m.gflop_per_image if m else None,
               "weights": m.weights if m else None, "neighbours": plan.neighbours, "inputs": inputs_desc}
        if not e["skipped"]:
            row.update(ms_per_iter=e["p50_ms"], p50_ms=e["p50_ms"], p99_ms=e["p99_ms"], img_per_s=e["img_per_s"],
                       speedup=e["speedup"], speedup_own_eager=e["speedup_own_eager"], setup_s=e["setup_s"],
                       peak_mem_mb=harness.peak_memory_mb("cpu"), repeats_s=e["times_s"],
                       max_abs_err=e["max_abs_err"], calls=e["calls"], reps=e["reps"])
        rows.append(row)
    cfg = {"infer": dict(vars(args)), "ngf": int(teacher.G.down[0].out_channels), "deploy_batches": deploy,
           "neighbours": plan.neighbours, "inputs": inputs_desc, "calib_images": n_calib,
           "models": [{"name": m.name, "weights": m.weights, "params": m.params,
                       "gflop_per_image": m.gflop_per_image} for m in models],
           "targets": engines.targets(rows), **info}
    return rows, cfg


def _compiled_rungs(plan, args, m: InferModel, engines, log, prefix: str = "", inputs: dict | None = None):
    """``m``'s fastp2p fp32 path at each batch of ``args.batch``: ``perf.optimize_for_inference`` on a CPU (method
    auto: inductor with frozen weights; --tiny: packed, no compile), ``torch.compile`` on CUDA."""
    from fastp2p import perf
    from fastp2p.inference import with_mode

    out = []
    G = m.G
    for bs in args.batch:
        x = (inputs or {}).get(bs)
        if x is None:
            x = torch.rand(bs, 3, args.size, args.size, generator=torch.Generator().manual_seed(bs)) * 2 - 1
        with torch.inference_mode():
            ref = G(x)
        t0 = time.perf_counter()
        try:
            if torch.cuda.is_available():
                log(f"[infer b{bs}] {m.name}: torch.compile on CUDA")
                Gc = torch.compile(with_mode(copy.deepcopy(G), "eval", inplace=True).cuda())
                xd = x.cuda()

                def call(Gc=Gc, xd=xd):
                    with torch.inference_mode():
                        Gc(xd)
                    torch.cuda.synchronize()

                with torch.inference_mode():
                    y = Gc(xd).float().cpu()
                name, runtime, note = "torch-compile-cuda", "torch-compile", "torch.compile, CUDA"
            else:
                log(f"[infer b{bs}] {m.name}: optimize_for_inference")
                fast = perf.optimize_for_inference(G, (bs, 3, args.size, args.size),
                                                   method="packed" if plan.tiny else "auto")

                def call(fast=fast, x=x):
                    with torch.inference_mode():
                        fast(x)

                with torch.inference_mode():
                    y = fast(x)
                name, runtime, note = f"torch-optimized-{fast.method}", "fastp2p", fast.method
        except Exception as e:  # a failed compile is a skipped row, not a crash of the whole bench
            out.append(engines.Rung(prefix + "torch-optimized", bs, skipped=f"failed: {_skip_reason(e)}",
                                    model=m.name, runtime="fastp2p", precision="fp32"))
            continue
        setup = time.perf_counter() - t0
        for _ in range(args.warmup):
            call()
        out.append(engines.Rung(prefix + name, bs, call, sync=torch.cuda.is_available(), setup_s=setup,
                                max_abs_err=(y - ref).abs().max().item(), model=m.name, runtime=runtime,
                                precision="fp32", note=note))
    return out


def _skip_reason(e: BaseException) -> str:
    from fastp2p.errors import UserError, first_line

    return first_line(e, 200) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e, 200)}"


def _deploy_rungs(plan, args, m: InferModel, batches, inputs: dict, onnx_fp32, work: Path, n_calib: int,
                  prefix: str, info: dict, log) -> list:
    """Issue 16's rungs for model ``m`` at each of ``batches``: fastp2p bf16 (inductor under bf16 autocast), ONNX
    Runtime int8, OpenVINO fp32/bf16/int8 (the fp32 export, and its int8 QDQ from ``engines.quantize``). A rung that
    cannot run here (no package, no native bf16, a failed build) is a skipped rung with the reason."""
    from fastp2p.bench.engines import Rung

    from fastp2p import perf

    rungs: list = []
    refs = {}
    with torch.inference_mode():
        for bs in batches:
            refs[bs] = m.G(inputs[bs])

    def add(rid, bs, runtime, precision, fn, setup_s=0.0, note="", skip=None):
        """A measured rung from ``fn`` (x -> y; its first call checks it), or a skipped one."""
        base = dict(model=m.name, runtime=runtime, precision=precision, note=note)
        if skip:
            rungs.append(Rung(prefix + rid, bs, skipped=skip, **base))
            return
        x = inputs[bs]
        try:
            with torch.inference_mode():
                y = fn(x).float()
        except Exception as e:  # a backend that builds but cannot run: skipped, with the reason
            rungs.append(Rung(prefix + rid, bs, skipped=_skip_reason(e), **base))
            return

        def call(fn=fn, x=x):
            with torch.inference_mode():
                fn(x)

        for _ in range(args.warmup):
            call()
        rungs.append(Rung(prefix + rid, bs, call, setup_s=setup_s, max_abs_err=(y - refs[bs]).abs().max().item(),
                          **base))

    def build(fn):
        """(engine, setup s, None) or (None, 0, the reason it cannot be built)."""
        t0 = time.perf_counter()
        try:
            return fn(), time.perf_counter() - t0, None
        except Exception as e:
            return None, 0.0, _skip_reason(e)

    # fastp2p bf16: one inductor compile per input shape
    no_bf16 = None if perf.cpu_has_native_bf16() else \
        "CPU without native bf16 (avx512_bf16/AMX): bf16 would be emulated, slower than fp32"
    for bs in batches:
        skip = no_bf16
        if plan.tiny and not skip:
            skip = "--tiny: no bf16 inductor compile (~40 s each on 2 busy cores), to keep the test short"
        if not skip:
            log(f"[infer b{bs}] {m.name}: optimize_for_inference bf16")
        eng, t, why = (None, 0.0, skip) if skip else build(
            lambda bs=bs: perf.optimize_for_inference(m.G, (bs, 3, args.size, args.size), precision="bf16"))
        add("torch-optimized-inductor-bf16", bs, "fastp2p", "bf16", eng, t, "inductor, bf16 autocast", why)

    # the int8 QDQ file: static per-channel quantization of the fp32 export (engines/quantize.py)
    int8_path, int8_note, no_int8 = None, "", None
    if onnx_fp32 is None:
        no_int8 = "no fp32 ONNX export (see the onnxruntime rung's reason)"
    else:
        t0 = time.perf_counter()
        try:
            from fastp2p.engines.quantize import quantize_onnx

            calib, int8_note = calibration_set(onnx_fp32, n_calib)
            log(f"[infer] {m.name}: int8 quantization, {int8_note}")
            with _quiet_root_log():  # onnxruntime.quantization's "consider pre-processing" lines, twice per model
                int8_path = quantize_onnx(onnx_fp32, work / f"{m.name}.int8.onnx", calib, method="minmax",
                                          per_channel=True)
            info["calibration"][m.name] = {"note": int8_note, "quantize_s": time.perf_counter() - t0}
            int8_note = f"QDQ minmax per-channel, {int8_note}"
        except Exception as e:
            no_int8 = f"int8 quantization failed: {_skip_reason(e)}"
    quant_s = info["calibration"].get(m.name, {}).get("quantize_s", 0.0)

    # ONNX Runtime int8 (CPU provider)
    eng, t, why = (None, 0.0, no_int8) if no_int8 else build(lambda: _ort(int8_path))
    for bs in batches:
        add("onnxruntime-int8", bs, "onnxruntime", "int8", eng, t + quant_s, int8_note, why)

    # OpenVINO fp32 / bf16 / int8: the latency hint (one stream) at batch 1; at larger batches latency and throughput
    # (several streams, the batch split across infer requests) are both measured and the faster is kept
    no_ov = _openvino_problem()
    variants = [("openvino", "fp32", onnx_fp32, "fp32", None if onnx_fp32 else "no fp32 ONNX export"),
                ("openvino-bf16", "bf16", onnx_fp32, "bf16", None if onnx_fp32 else "no fp32 ONNX export"),
                ("openvino-int8", "int8", int8_path, "fp32", no_int8)]
    for rid, precision, path, hint_prec, missing in variants:
        skip = no_ov or missing
        if not skip and precision == "bf16":
            skip = _openvino_bf16_problem()
        extra_s = quant_s if precision == "int8" else 0.0
        note0 = int8_note if precision == "int8" else ""
        lat, t_lat, why = (None, 0.0, skip) if skip else build(lambda p=path, hp=hint_prec: _ov(p, hp, "latency",
                                                                                                   work))
        tput, t_tput = None, 0.0
        for bs in batches:
            if why or bs == 1:
                add(rid, bs, "openvino", precision, lat, t_lat + extra_s,
                    ", ".join(x for x in ("hint latency", note0) if x), why)
                continue
            if tput is None:
                log(f"[infer] {m.name}: OpenVINO {precision}, throughput hint")
                tput, t_tput, why_t = build(lambda p=path, hp=hint_prec: _ov(p, hp, "throughput", work))
            fn, hint, cmp = lat, "latency", ""
            if tput is not None:
                ms = _compare_hints(lat, tput, inputs[bs], 2 if plan.tiny or plan.quick else 4)
                info["openvino_hints"][f"{m.name}:{rid}:b{bs}"] = ms
                if ms["throughput"] < ms["latency"]:
                    fn, hint = tput, "throughput"
                cmp = f"latency {ms['latency']:.1f} ms vs throughput {ms['throughput']:.1f} ms"
            else:
                cmp = f"throughput hint failed: {why_t}"
            add(rid, bs, "openvino", precision, fn, (t_lat + t_tput) + extra_s,
                ", ".join(x for x in (f"hint {hint} ({cmp})", note0) if x))
    return rungs


@contextlib.contextmanager
def _quiet_root_log():
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ort(path):
    from fastp2p.engines.runtime import OnnxRuntimeGenerator

    return OnnxRuntimeGenerator(path, device="cpu")


def _ov(path, precision: str, hint: str, work: Path):
    from fastp2p.engines.runtime import OpenVINOGenerator

    # the compiled-model cache stays in the bench's temporary folder: setup_s is a cold compile, ~/.cache untouched
    return OpenVINOGenerator(path, precision=precision, hint=hint, cache_dir=work / "openvino-cache")


def _openvino_problem() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino not installed (pip install 'fastp2p[openvino]')"
    return None


def _openvino_bf16_problem() -> str | None:
    try:
        import openvino as ov
        from fastp2p.engines.openvino import cpu_has_bf16

        return None if cpu_has_bf16(ov.Core()) else "this CPU has no bf16 in OpenVINO's CPU plugin (AVX512-BF16/AMX)"
    except Exception as e:
        return _skip_reason(e)


def _compare_hints(lat, tput, x, n: int) -> dict:
    """Median ms of ``n`` interleaved calls of each OpenVINO hint on ``x`` (after one untimed call each)."""
    import statistics

    ts: dict = {"latency": [], "throughput": []}
    with torch.inference_mode():
        lat(x)
        tput(x)
        for _ in range(n):
            for k, g in (("latency", lat), ("throughput", tput)):
                t = time.perf_counter()
                g(x)
                ts[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in ts.items()}


def print_infer_table(result: dict) -> None:
    """The infer rows grouped by batch: model, backend, precision, params, GFLOP/img, p50, p99, img/s, speedup over
    the teacher's eager fp32 at that batch, max |err| vs the model's own eager fp32; then the targets. <= 120 cols."""
    rows = [r for r in result["rows"] if r["section"] == "infer"]
    if not rows:
        return
    env, cfg = result["env"], result["config"].get("infer", {})
    nb = cfg.get("neighbours", 0)
    print(f"\nfastp2p bench infer on {env['device']}: {env['gpu'] or env['cpu']} ({env['cores']} cores), torch "
          f"{env['torch']}, git {(env['git_sha'] or '?')[:10]}; eval mode, {INFER_SIZE}x{INFER_SIZE}; inputs: "
          f"{cfg.get('inputs', '?')}; {nb} busy neighbour(s)")
    weights = {m["name"]: m["weights"] for m in cfg.get("models", [])}
    if "random" in weights.values():
        print("weights: random (seeded) for " + ", ".join(k for k, v in weights.items() if v == "random")
              + ": speed is that of trained ones; max|err| and int8 error mean little (--teacher/--students CKPT)")
    head = (f"{'model':<16}{'backend':<22}{'prec':<6}{'params M':>9}{'GFLOP':>7}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'img/s':>9}{'vs eager':>9}{'max|err|':>9}")
    for bs in sorted({r["batch"] for r in rows}):
        print(f"\nbatch {bs}" + (f" (neighbours: {nb})" if nb else ""))
        print(head)
        print("-" * len(head))
        for r in (r for r in rows if r["batch"] == bs):
            be = _backend_cell(r)
            lead = f"{r.get('model') or '-':<16}{be:<22}{r.get('precision', ''):<6}"
            if r["skipped"]:
                print((lead + f"skipped: {r['skipped']}")[:120])
                continue
            pm = f"{r['params'] / 1e6:.2f}" if r.get("params") else "-"
            gf = f"{r['gflop_per_image']:.2f}" if r.get("gflop_per_image") else "-"
            sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
            err = f"{r['max_abs_err']:.1e}" if r.get("max_abs_err") is not None else "-"
            print(f"{lead}{pm:>9}{gf:>7}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['img_per_s']:>9.1f}{sp:>9}{err:>9}")
    notes = {r["model"]: r["note"][r["note"].index("QDQ"):] for r in rows if "QDQ" in (r.get("note") or "")}
    for model, n in notes.items():
        print(f"int8 {model}: {n}"[:120])
    for k, ms in cfg.get("openvino_hints", {}).items():
        print(f"openvino hint {k}: latency {ms['latency']:.1f} ms, throughput {ms['throughput']:.1f} ms "
              f"-> kept {'throughput' if ms['throughput'] < ms['latency'] else 'latency'}")
    for line in cfg.get("targets", []):
        print(line)


def _backend_cell(r: dict) -> str:
    rt, note = r.get("runtime") or r["backend"], r.get("note") or ""
    if rt == "fastp2p":
        return f"fastp2p {note.split(',')[0]}"
    if rt == "openvino" and "hint" in note:
        return "openvino " + ("tput" if note.startswith("hint throughput") else "latency")
    return rt


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
