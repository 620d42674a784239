"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, sample grids, the loss-curve PNG, a progress bar,
TensorBoard events (``<run>/tensorboard/``) and, with ``--wandb``, a Weights & Biases run.

Losses stay on the device between log points; they are read (one host sync) every ``log_every`` steps only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .errors import UserError
from .inference import to_uint8

LOSS_KEYS = ("loss_D", "loss_G_GAN", "loss_G_L1")
ROW_SCALARS = (*LOSS_KEYS, "lr", "img_per_s", "data_wait_frac")  # each log row's numbers, as TensorBoard scalars
EVAL_KEYS = ("L1", "PSNR", "SSIM")  # the --eval_every scores plotted and logged
# The sample grid's columns: (short name, what it is), left to right.
SAMPLE_LABELS = (("A", "real source"), ("G(A)", "generated"), ("B", "real target"))

def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img") -> tqdm:
    """The progress bar of ``translate`` / ``eval`` over image folders: tqdm on stderr (count, img/s, ETA), as video's
    (``fastp2p.video``), so stdout keeps only the result line. Only when stderr is a terminal (tqdm's
    ``disable=None``): in a log file or a pipe its carriage-return redraws are noise, and a failing run's error stays
    the one line there."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True)


def _caption_band(width: int, lines: list[tuple[str, list[tuple[int, int, str]]]]) -> Image.Image:
    """A white band of text lines: each line is (left text, [(x0, x1, centred text), ...])."""
    font = ImageFont.load_default()  # Pillow's built-in font: no font file to ship or find
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(probe.textbbox((0, 0), "Ag(", font=font)[3], 8) + 4
    band = Image.new("RGB", (width, line_h * len(lines) + 2), "white")
    draw = ImageDraw.Draw(band)
    for i, (left, centred) in enumerate(lines):
        y = 2 + i * line_h
        if left:
            draw.text((3, y), left, fill="black", font=font)
        for x0, x1, text in centred:
            w = draw.textlength(text, font=font)
            draw.text((x0 + max(0.0, (x1 - x0 - w) / 2), y), text, fill="black", font=font)
    return band


def grid_image(rows: list[torch.Tensor], caption: str | None = None,
               labels: tuple[tuple[str, str], ...] | None = None) -> Image.Image:
    """A | G(A) | B per row, from NCHW tensors in [-1, 1] (grayscale shown as RGB). ``caption`` (e.g. the step) and
    ``labels`` (one (name, meaning) per column block, e.g. ``SAMPLE_LABELS``) go in a white band above the grid; a
    label's meaning is left out when the column is too narrow for it."""
    tiles = []
    for t in rows:
        t = t.detach().float().cpu()
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        tiles.append(to_uint8(t).numpy())  # N, H, W, 3
    strip = np.concatenate(tiles, axis=2)  # side by side
    grid = Image.fromarray(np.concatenate(list(strip), axis=0))
    if caption is None and not labels:
        return grid
    lines: list[tuple[str, list]] = [(caption, [])] if caption else []
    if labels:
        font, probe = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
        x, cols = 0, []
        for (name, meaning), t in zip(labels, tiles, strict=False):
            w = t.shape[2]
            text = f"{name}: {meaning}" if probe.textlength(f"{name}: {meaning}", font=font) <= w - 4 else name
            cols.append((x, x + w, text))
            x += w
        lines.append(("", cols))
    band = _caption_band(grid.width, lines)
    out = Image.new("RGB", (grid.width, band.height + grid.height), "white")
    out.paste(band, (0, 0))
    out.paste(grid, (0, band.height))
    return out


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


TENSORBOARD_INSTALL = 'pip install "fastp2p[tensorboard]"'


def tensorboard_on(setting: bool | None) -> bool:
    """``--tensorboard`` (True: required), ``--no-tensorboard`` (False), default None: on when it can be imported."""
    if setting is False:
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - imports tensorboard and checks its version
    except ImportError:
        if setting:
            raise UserError(f"--tensorboard: the tensorboard package is not installed here; {TENSORBOARD_INSTALL}, "
                            "or drop --tensorboard") from None
        return False
    return True


def check_loggers(tensorboard: bool | None, wandb: bool = False) -> None:
    """Before training: an explicit ``--tensorboard`` / ``--wandb`` whose package is missing is a one-line error."""
    tensorboard_on(tensorboard)
    if wandb:
        try:
            import wandb as _  # noqa: F401
        except ImportError:
            raise UserError("--wandb: the wandb package is not installed here; pip install wandb (and wandb login), "
                            "or drop --wandb") from None


def metric_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(loss rows, eval records) of a metrics.jsonl; a line cut short by a kill mid-write is skipped."""
    rows, evals = [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or "step" not in r:
            continue
        if isinstance(r.get("eval"), dict):
            evals.append(r)
        elif all(k in r for k in LOSS_KEYS):
            rows.append(r)
    return rows, evals


def plot_metrics(rows: list[dict], evals: list[dict], path: Path) -> list[str]:
    """The loss curves (one panel per loss) and, when there are --eval_every records, a second row with L1 / PSNR /
    SSIM vs step; saved to ``path``. Returns the panel titles, row by row. Points carry markers up to a few hundred
    of them, so a run with one log row shows a point, not an empty panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, rows, lambda r, k=k: r[k]) for k in LOSS_KEYS]
    keys = [k for k in EVAL_KEYS if any(k in e["eval"] for e in evals)]
    panels += [(f"eval {k}", [e for e in evals if k in e["eval"]], lambda e, k=k: e["eval"][k]) for k in keys]
    nrows = 2 if keys else 1
    fig, axes = plt.subplots(nrows, 3, figsize=(12, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, pts, get) in zip(axes.flat, panels, strict=False):
        ax.plot([r["step"] for r in pts], [get(r) for r in pts], marker="o" if len(pts) <= 300 else None,
                markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [t for t, _, _ in panels]


class RunReporter:
    def __init__(self, run_dir: Path, cfg, total_steps: int, progress: bool = True, start_step: int = 0,
                 world_size: int = 1, wandb: bool = False):
        self.run_dir, self.cfg = Path(run_dir), cfg
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if tensorboard_on(cfg.train.tensorboard):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events past the checkpoint's step that an earlier, killed run logged
            # (the steps about to be redone), as trim_metrics does for metrics.jsonl; a resume appends after them.
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if wandb:
            import wandb as wandb_mod

            self.wandb = wandb_mod.init(project="fastp2p", name=cfg.train.name, dir=str(self.run_dir),
                                        config=cfg.to_dict(), resume="allow")
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
        self._scalars(row["step"], {f"train/{k}": row[k] for k in ROW_SCALARS})
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
        self._scalars(step, {f"eval/{k}": scores[k] for k in EVAL_KEYS if isinstance(scores.get(k), (int, float))})
        self.last_eval = scores
        self._t += float(scores.get("time_s", 0.0))  # keep the evaluation out of the next row's img_per_s

    def _scalars(self, step: int, values: dict) -> None:
        for tag, v in values.items():
            self._tb("add_scalar", tag, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def _tb(self, method: str, *args, **kwargs) -> None:
        """A TensorBoard call that cannot stop training: the event file is a side channel (a full disk is reported by
        the checkpoint save, which matters), so an OSError there turns TensorBoard off with one warning line."""
        if self.tb is None:
            return
        try:
            getattr(self.tb, method)(*args, **kwargs)
        except OSError as e:
            import logging

            logging.getLogger("fastp2p.train").warning("TensorBoard logging stopped: %s (%s/tensorboard)", e,
                                                       self.run_dir)
            self.tb = None

    def sample(self, step: int, A, fake, B, n: int = 4) -> Path:
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        img = grid_image([A[:n], fake[:n], B[:n]], caption=f"step {step}", labels=SAMPLE_LABELS)
        save_png(img, path)
        self._tb("add_image", "samples", np.asarray(img), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(img, caption=f"step {step}: A | G(A) | B")}, step=step)
        return path

    def loss_curve(self) -> Path | None:
        """``loss_curve.png`` from metrics.jsonl (``plot_metrics``); None without a loss row."""
        if not self.metrics_path.is_file():
            return None
        rows, evals = metric_rows(self.metrics_path)
        if not rows:
            return None
        path = self.run_dir / "loss_curve.png"
        plot_metrics(rows, evals, path)
        return path

    def close(self, trainer, bad_files=(), interrupted: str | None = None) -> dict:
        self.log(trainer, self.last.get("lr", float(trainer.opt_G.param_groups[0]["lr"])))  # a tensor lr: graphs
        self.bar.close()
        self._tb("close")
        if self.wandb is not None:
            self.wandb.finish()
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
