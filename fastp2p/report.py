"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, sample grids, the loss-curve PNG, a progress bar.

Losses stay on the device between log points; they are read (one host sync) every ``log_every`` steps only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .inference import to_uint8

LOSS_KEYS = ("loss_D", "loss_G_GAN", "loss_G_L1")


def grid_image(rows: list[torch.Tensor]) -> Image.Image:
    """A | G(A) | B per row, from NCHW tensors in [-1, 1] (grayscale shown as RGB)."""
    tiles = []
    for t in rows:
        t = t.detach().float().cpu()
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        tiles.append(to_uint8(t).numpy())  # N, H, W, 3
    strip = np.concatenate(tiles, axis=2)  # side by side
    return Image.fromarray(np.concatenate(list(strip), axis=0))


def save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` past ``step`` (atomically); returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = [s for s in path.read_text().splitlines() if s.strip()]
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a line cut short by a kill mid-write
        if row_step <= step:
            keep.append(line)
    if len(keep) < len(lines):
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text("".join(s + "\n" for s in keep))
        tmp.replace(path)
    return len(lines) - len(keep)


class RunReporter:
    def __init__(self, run_dir: Path, cfg, total_steps: int, progress: bool = True, start_step: int = 0,
                 world_size: int = 1):
        self.run_dir, self.cfg = Path(run_dir), cfg
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True,
                        desc=cfg.train.name)
        self._sum = {k: None for k in LOSS_KEYS}
        self._n = 0
        self._wait = 0.0
        self._t = time.perf_counter()
        self._steps0 = start_step
        self.images_per_step = cfg.train.batch_size * world_size  # img/s counts every rank's images (torchrun)
        self.last: dict = {}
        self.t_start = time.perf_counter()

    def step(self, trainer, losses, A, B, lr: float, wait_s: float) -> None:
        for k in LOSS_KEYS:
            v = getattr(losses, k)
            self._sum[k] = v if self._sum[k] is None else self._sum[k] + v
        self._n += 1
        self._wait += wait_s
        self.bar.update(1)
        t = self.cfg.train
        if trainer.step % t.sample_every == 0 or trainer.step == self.bar.total:
            self.sample(trainer.step, A, trainer._last_fake, B)
        if trainer.step % t.log_every == 0 or trainer.step == self.bar.total:
            self.log(trainer, lr)

    def log(self, trainer, lr: float) -> None:
        if self._n == 0:
            return
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        now = time.perf_counter()
        dt = now - self._t
        row = {"step": trainer.step, "epoch": trainer.epoch + 1}
        row.update({k: float(self._sum[k]) / self._n for k in LOSS_KEYS})
        row.update(lr=lr, img_per_s=self._n * self.images_per_step / dt, data_wait_frac=min(1.0, self._wait / dt),
                   time_s=now - self.t_start)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(epoch=row["epoch"], img_s=f"{row['img_per_s']:.2f}", D=f"{row['loss_D']:.3f}",
                             G_GAN=f"{row['loss_G_GAN']:.3f}", G_L1=f"{row['loss_G_L1']:.3f}", refresh=False)
        self.last = row
        self._sum = {k: None for k in LOSS_KEYS}
        self._n, self._wait, self._t = 0, 0.0, time.perf_counter()

    def log_eval(self, step: int, scores: dict) -> None:
        """A validation record (``--eval_every``): ``{"step": N, "eval": {"images", "L1", "PSNR", "SSIM", "mode",
        "data", "time_s"}}``, in the same metrics.jsonl as the loss rows (which have no "eval" key)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "eval": scores}) + "\n")
        self.last_eval = scores
        self._t += float(scores.get("time_s", 0.0))  # keep the evaluation out of the next row's img_per_s

    def sample(self, step: int, A, fake, B, n: int = 4) -> Path:
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        save_png(grid_image([A[:n], fake[:n], B[:n]]), path)
        return path

    def loss_curve(self) -> Path | None:
        if not self.metrics_path.is_file():
            return None
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "eval" not in r]  # --eval_every records carry no losses
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        steps = [r["step"] for r in rows]
        for ax, k in zip(axes, LOSS_KEYS, strict=False):
            ax.plot(steps, [r[k] for r in rows])
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "loss_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self, trainer, bad_files=(), interrupted: str | None = None) -> dict:
        self.log(trainer, self.last.get("lr", trainer.opt_G.param_groups[0]["lr"]))
        self.bar.close()
        curve = self.loss_curve()
        elapsed = time.perf_counter() - self.t_start
        steps = trainer.step - self._steps0
        summary = {"steps": trainer.step, "epoch": trainer.epoch + 1, "elapsed_s": round(elapsed, 2),
                   "img_per_s": steps * self.images_per_step / elapsed if elapsed > 0 else 0.0,
                   "bad_files_skipped": len(bad_files), "interrupted": interrupted,
                   "loss_curve": str(curve) if curve else None, "run_dir": str(self.run_dir)}
        summary.update({k: self.last[k] for k in LOSS_KEYS if k in self.last})
        with open(self.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary
