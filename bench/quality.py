"""The recorded quality run of docs/quality.md: facades labels->photo, fastp2p with its speed features vs the faithful
eager fp32 baseline (two seeds, to measure run-to-run noise), same step budget, evaluated on the val split.

    python -m fastp2p.bench.quality                     # train what is missing, evaluate, write docs/quality.md
    python -m fastp2p.bench.quality --stage report      # rewrite the doc from the runs already there

Runs (under --out, default runs/quality; a finished run is kept and not retrained):

- ``fastp2p-s0``: ``fastp2p.train.fit`` on the facades preset with ``--amp`` (bf16 autocast where the CPU has it) and
  the trainer's CPU defaults (GEMM convolutions for the U-Net's inner levels, fused Adam); seed 0.
- ``baseline-s0``, ``baseline-s1``: the reference's training iteration in eager fp32 (the nested reference U-Net with
  in-place activations, torch's for-loop Adam, BCE-with-logits + 100 L1), the paper's linear lr schedule; seeds 0, 1.

Both read the same loader (fastp2p.data, the reference's preprocessing: resize 286, random crop 256, flip), whose
order and jitter depend on the seed only, so ``fastp2p-s0`` and ``baseline-s0`` see identical batches. The paper's
recipe (batch 1, lr 2e-4, beta1 0.5, constant lr for half the epochs then linear decay to zero) is kept; only the
number of epochs is cut to a CPU budget (--epochs, default 4 = 1,600 steps on the 400 training pairs).

Every run is evaluated with ``fastp2p eval`` in paper mode (the reference's default test behaviour: per-image
statistics, dropout on, seed 0) on the val split, and the doc compares fastp2p with the baseline against the noise
|baseline-s0 - baseline-s1|.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastp2p.config import override, preset
from fastp2p.losses import lr_factor

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "facades"
METRICS = ("L1", "PSNR", "SSIM")
HIGHER_IS_BETTER = {"L1": False, "PSNR": True, "SSIM": True}


def quality_config(data: Path, epochs: int, seed: int, out: Path, name: str, amp: bool):
    half = epochs // 2
    return override(preset("facades"), data=str(data), n_epochs=epochs - half, n_epochs_decay=half, seed=seed,
                    out=str(out), name=name, amp=amp or None, log_every=50, sample_every=400, save_every=400)


# -- training ---------------------------------------------------------------------------------------------------------
def train_fastp2p(cfg) -> dict:
    from fastp2p.train import fit

    ckpt = Path(cfg.train.out) / cfg.train.name / "checkpoints" / "latest.safetensors"
    if ckpt.is_file():
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))  # finishes, or no-op
    t0 = time.perf_counter()
    summary = fit(cfg, progress=False)
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def train_baseline(cfg) -> dict:
    """The reference's iteration (bench.core.BaselineTrain) with its per-epoch linear lr schedule; G is saved as a
    reference-format ``latest_net_G.pth``, which ``fastp2p eval --checkpoint`` loads like any reference checkpoint."""
    from fastp2p import data as data_mod

    from .core import BaselineTrain

    m, t = cfg.model, cfg.train
    run_dir = Path(t.out) / t.name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    dataset = data_mod.build_dataset(cfg.data, m.input_nc, m.output_nc, seed=t.seed)
    loader = data_mod.make_loader(dataset, t.batch_size, cfg.data.num_workers, t.seed)
    epochs = t.n_epochs + t.n_epochs_decay
    total = min(t.max_steps or math.inf, epochs * len(loader))
    batches = (batch for epoch in range(epochs) for batch in loader.epoch(epoch))
    base = BaselineTrain(cfg, batches)
    step, t0, log = 0, time.perf_counter(), []
    sums = np.zeros(3)
    try:
        while step < total:
            epoch = step // len(loader)
            lr = t.lr * lr_factor(t.lr_policy, epoch, t.n_epochs, t.n_epochs_decay, t.lr_decay_iters)
            for opt in (base.opt_G, base.opt_D):
                for g in opt.param_groups:
                    g["lr"] = lr
            loss_D, loss_gan, loss_l1 = (x.item() for x in base())
            sums += [loss_D, loss_gan, t.lambda_L1 * loss_l1]  # G_L1 logged with lambda, as the reference logs it
            step += 1
            if step % t.log_every == 0:
                rec = {"step": step, "epoch": epoch, "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 1),
                       **dict(zip(("loss_D", "loss_G_GAN", "loss_G_L1"), (sums / t.log_every).round(5).tolist(),
                                  strict=True))}
                log.append(rec)
                sums[:] = 0
                print(f"[{t.name}] {json.dumps(rec)}", flush=True)
    finally:
        loader.close()
    wall = time.perf_counter() - t0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    torch.save(base.G.state_dict(), run_dir / "latest_net_G.tmp")
    (run_dir / "latest_net_G.tmp").replace(run_dir / "latest_net_G.pth")
    summary = {"steps": step, "wall_s": wall, "s_per_step": wall / max(step, 1),
               "loss_G_L1": log[-1]["loss_G_L1"] if log else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- evaluation and the doc -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    name: str
    kind: str  # fastp2p | baseline
    seed: int

    def checkpoint(self, out: Path) -> Path:
        d = out / self.name
        return d / "checkpoints" / "latest.safetensors" if self.kind == "fastp2p" else d / "latest_net_G.pth"


RUNS = (Run("fastp2p-s0", "fastp2p", 0), Run("baseline-s0", "baseline", 0), Run("baseline-s1", "baseline", 1))


def evaluate(run: Run, out: Path, val: Path) -> dict:
    from fastp2p.cli import main as cli

    dst = out / run.name / "eval"
    rc = cli(["eval", "--checkpoint", str(run.checkpoint(out)), "--data", str(val), "--direction", "BtoA",
              "--mode", "paper", "--seed", "0", "-o", str(dst)])
    if rc != 0:
        raise SystemExit(f"fastp2p eval failed for {run.name} (exit {rc})")
    return json.loads((dst / "metrics.json").read_text())


def sample_grid(out: Path, val: Path, dst: Path, n: int = 4) -> None:
    """input | baseline-s0 | fastp2p-s0 | target for the first n val pairs (paper mode, dropout seed 0)."""
    from fastp2p.translate import load_source, translate_paths

    files = sorted(val.glob("*.jpg"))[:n]
    cols = {}
    for run in (RUNS[1], RUNS[0]):
        pngs = translate_paths([str(f) for f in files], str(run.checkpoint(out)), out / run.name / "grid",
                               mode="paper", direction="BtoA", seed=0)
        cols[run.name] = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    rows = []
    for i, f in enumerate(files):
        src, tgt = load_source(f, "BtoA", "aligned", 256, 3), load_source(f, "AtoB", "aligned", 256, 3)
        rows.append(np.concatenate([src, cols["baseline-s0"][i], cols["fastp2p-s0"][i], tgt], axis=1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(dst, quality=92)


def _fmt(v: float | None, nd: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def verdicts(res: dict[str, dict]) -> dict[str, dict]:
    """Per metric: noise = |baseline-s0 - baseline-s1|, diff = fastp2p-s0 - mean(baselines); agree when |diff| is
    within the noise (or fastp2p is better than both baselines)."""
    out = {}
    for k in METRICS:
        b0, b1, f = res["baseline-s0"][k], res["baseline-s1"][k], res["fastp2p-s0"][k]
        noise, diff = abs(b0 - b1), f - (b0 + b1) / 2
        better = f >= max(b0, b1) if HIGHER_IS_BETTER[k] else f <= min(b0, b1)
        out[k] = {"noise": noise, "diff": diff, "agree": abs(diff) <= noise or better, "better_than_both": better}
    return out


def write_doc(out: Path, doc: Path, res: dict, train: dict, args, grid: Path) -> None:
    v = verdicts(res)
    cmd = "python -m fastp2p.bench.quality" + ("" if args.epochs == 4 else f" --epochs {args.epochs}")
    lines = [
        "# Quality: fastp2p trains the same pix2pix as the reference",
        "",
        "Facades labels->photo (`--direction BtoA`), the paper's recipe (unet_256, batch norm, dropout, batch 1, "
        "lr 2e-4, beta1 0.5, resize 286 + random crop 256 + flip, cGAN + 100 L1, constant lr then linear decay to "
        f"zero) cut to a CPU budget of **{args.epochs} epochs = {res['fastp2p-s0']['steps']} steps** (2 constant, 2 "
        "decaying for the default 4), trained on the 400 pairs of `facades/train` and evaluated on the 100 pairs of "
        "`facades/val` with `fastp2p eval --mode paper` (the reference's default test behaviour: per-image "
        "statistics, dropout on, seed 0). Lower L1 is better; higher PSNR and SSIM are better.",
        "",
        "Regenerate everything (trains what is missing under `runs/quality/`, evaluates, rewrites this file and the "
        "grid):",
        "",
        f"    {cmd}",
        "",
        "| run | trainer | seed | steps | threads | s/step | L1 [0,1] | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"fastp2p-s0": "fastp2p `--amp` (bf16 autocast, GEMM convs, fused Adam)",
              "baseline-s0": "reference iteration, eager fp32", "baseline-s1": "reference iteration, eager fp32"}
    for run in RUNS:
        r, t = res[run.name], train.get(run.name, {})
        sps = t.get("s_per_step")
        lines.append(f"| {run.name} | {labels[run.name]} | {run.seed} | {r['steps']} | {t.get('threads', '-')} | "
                     f"{_fmt(sps, 3)} | "
                     f"{_fmt(r['L1'])} | {_fmt(r['PSNR'], 2)} | {_fmt(r['SSIM'])} |")
    lines += ["", "Agreement (noise = |baseline-s0 - baseline-s1|, diff = fastp2p-s0 - mean of the baselines):", "",
              "| metric | noise | diff | within noise |", "|---|---|---|---|"]
    for k in METRICS:
        x = v[k]
        word = "yes" if abs(x["diff"]) <= x["noise"] else ("better than both baselines" if x["better_than_both"]
                                                             else "**no**")
        lines.append(f"| {k} | {_fmt(x['noise'])} | {x['diff']:+.4f} | {word} |")
    ok = all(x["agree"] for x in v.values())
    lines += ["", f"**Verdict: {'agree' if ok else 'DO NOT agree'} within run-to-run noise.**", "",
              f"![input, baseline-s0, fastp2p-s0, target]({grid.relative_to(doc.parent).as_posix()})", "",
              "Columns: label map (input) | baseline-s0 | fastp2p-s0 | photo (target), the first four val pairs.", "",
              "The commands behind each row (what the script runs in-process):", "",
              f"    fastp2p train --preset facades --data {args.data} --amp "
              f"--n_epochs {args.epochs - args.epochs // 2} --n_epochs_decay {args.epochs // 2} "
              f"--seed 0 --out {out} --name fastp2p-s0",
              "    # baseline-s<k>: bench/quality.py train_baseline (the reference's iteration, eager fp32), seed k",
              f"    fastp2p eval --checkpoint <run checkpoint> --data {args.data / 'val'} --direction BtoA "
              "--mode paper --seed 0 -o <run>/eval",
              "",
              f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, no GPU; s/step is wall time over the run, on a shared machine (other jobs ran "
              "beside it), so compare speed in bench/README.md, not here.",
              "",
              "Caveats: the noise is measured from two seeds only, and the eval's own dropout draw (seed 0) is part "
              "of it; the budget is 2% of the paper's 200 epochs, so these are early-training scores (the facades "
              "paper figures are not the target here, agreement with the baseline is). Runs with 1 thread in the table "
              "trained side by side (`--only`, `OMP_NUM_THREADS=1`), one per core.",
              "",
              "Not on here: `--compile` (no training gain on this CPU, minutes of compile) and channels-last "
              "(slower on this CPU); Triton kernels and DALI need a GPU.", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    (out / "quality.json").write_text(json.dumps({"results": res, "train": train, "verdicts": v,
                                                  "epochs": args.epochs}, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastp2p.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="facades root (train/ and val/)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run: half constant lr, half linear decay")
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--doc", type=Path, default=Path("docs/quality.md"))
    p.add_argument("--stage", choices=("train", "report", "all"), default="all")
    p.add_argument("--only", nargs="*", help="train only these runs (names as in the doc); e.g. two processes with "
                   "OMP_NUM_THREADS=1, one per run, use a 2-core machine better than one after the other")
    p.add_argument("--max_steps", type=int, default=None, help="cap every run (smoke tests)")
    args = p.parse_args(argv)
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        raise SystemExit(f"--data {args.data}: expected train/ and val/ folders of facades pairs")
    args.out.mkdir(parents=True, exist_ok=True)
    train_path = args.out / "train.json"
    train = json.loads(train_path.read_text()) if train_path.is_file() else {}
    if args.stage in ("train", "all"):
        for run in RUNS:
            if args.only and run.name not in args.only:
                continue
            if run.checkpoint(args.out).is_file() and run.name in train:
                continue
            cfg = quality_config(args.data, args.epochs, run.seed, args.out, run.name, amp=run.kind == "fastp2p")
            if args.max_steps:
                cfg = override(cfg, max_steps=args.max_steps)
            print(f"[quality] training {run.name}", flush=True)
            summary = train_fastp2p(cfg) if run.kind == "fastp2p" else train_baseline(cfg)
            steps = summary.get("steps") or summary.get("step")
            train[run.name] = {"steps": steps, "wall_s": summary["wall_s"],
                               "s_per_step": summary["wall_s"] / max(1, steps or 1),
                               "threads": torch.get_num_threads()}
            # merged with what is on disk: runs may train in parallel processes (--only, one thread each)
            on_disk = json.loads(train_path.read_text()) if train_path.is_file() else {}
            train = on_disk | {run.name: train[run.name]}
            train_path.write_text(json.dumps(train, indent=2) + "\n")
    if args.stage in ("report", "all"):
        res = {}
        for run in RUNS:
            m = evaluate(run, args.out, args.data / "val")
            res[run.name] = {k: m[k] for k in METRICS} | {"steps": train.get(run.name, {}).get("steps")}
        grid = args.doc.parent / "quality_samples.jpg"  # JPEG: a quarter of the PNG in the repo
        sample_grid(args.out, args.data / "val", grid)
        write_doc(args.out, args.doc, res, train, args, grid)
        print(args.doc.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
