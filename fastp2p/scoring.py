"""Scoring a generator on validation pairs: the pairs of a folder (aligned A|B or A/ + B/) or of the synthetic set,
``run_pairs`` (translate and score: L1, PSNR, SSIM, and FID/LPIPS when given their models) and the trainer's
``--eval_every`` (``TrainEval``). The trainer's small dependency; ``fastp2p.evaluate`` adds the report and gallery."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import metrics as M
from .data.datasets import load_rgb
from .errors import DataError, UserError
from .images import open_image
from .inference import to_model_input, to_uint8

log = logging.getLogger("fastp2p.eval")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("val", "test")  # tried in this order under a dataset root


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalPair:
    """One validation pair. ``load(direction, size, in_nc, out_nc)`` -> (source, target), uint8 H,W,C at size x size."""

    name: str
    path: str
    load: Callable[[str, int, int, int], tuple[np.ndarray, np.ndarray]]


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=str)


def _prep(img: Image.Image, size: int, nc: int) -> np.ndarray:
    """translate's preprocessing of one image: grayscale for 1 channel, bicubic to size x size; uint8 H,W,C."""
    if nc == 1:
        img = img.convert("L")
    arr = np.asarray(img.resize((size, size), Image.BICUBIC))
    return arr[:, :, None] if arr.ndim == 2 else arr


def _probe(path: Path, max_pixels: int | None) -> tuple[int, int]:
    """(w, h) from the header; ``DataError`` naming the file when unreadable or over ``max_pixels``."""
    try:
        with open_image(path, max_pixels) as im:
            return im.size
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image ({e})") from None


def _aligned_loader(path: Path, max_pixels: int | None = None):
    def load(direction: str, size: int, in_nc: int, out_nc: int) -> tuple[np.ndarray, np.ndarray]:
        img = load_rgb(path, max_pixels)
        w, h = img.size
        if w % 2:
            raise DataError(path, f"odd width {w}: an aligned A|B pair must split into two equal halves")
        a, b = img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, w, h))
        src, tgt = (b, a) if direction == "BtoA" else (a, b)
        return _prep(src, size, in_nc), _prep(tgt, size, out_nc)
    return load


def _two_folder_loader(pa: Path, pb: Path, max_pixels: int | None = None):
    def load(direction: str, size: int, in_nc: int, out_nc: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = load_rgb(pa, max_pixels), load_rgb(pb, max_pixels)
        src, tgt = (b, a) if direction == "BtoA" else (a, b)
        return _prep(src, size, in_nc), _prep(tgt, size, out_nc)
    return load


def resolve_split(data: str | Path, flag: str = "--data") -> Path:
    """The folder holding the pairs: ``data`` itself when it holds images (or A/ and B/), else its val/ or test/."""
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"{flag}: no such folder: {root}")
    if not root.is_dir():
        raise UserError(f"{flag} {root}: not a folder; give a folder of aligned A|B images or a dataset root with "
                        f"{' or '.join(s + '/' for s in SPLITS)}")
    if _images_in(root) or ((root / "A").is_dir() and (root / "B").is_dir()):
        return root
    for split in SPLITS:
        if (root / split).is_dir():
            return root / split
    raise DataError(root, f"no .png/.jpg/.jpeg images and no {' or '.join(s + '/' for s in SPLITS)} sub-folder; "
                          f"give {flag} a folder of aligned A|B images")


PAIR_LAYOUTS = ("aligned A|B images (width = 2 x height: A the left half, B the right) or A/ and B/ sub-folders of "
                "same-named images")


def is_aligned_pair(w: int, h: int) -> bool:
    """An aligned A|B pair has two square halves side by side: width = 2 x height (translate's ``--layout auto``
    rule; a plain photo split in half would score a generator against the wrong target)."""
    return w == 2 * h


def _aligned_pairs(folder: Path, max_images: int | None, max_pixels: int | None) -> list[EvalPair]:
    """The aligned pairs of ``folder`` (at most ``max_images``). No file a pair: a ``DataError`` naming the first;
    some files not pairs: skipped, with one warning line naming how many and the first."""
    pairs: list[EvalPair] = []
    skipped: list[tuple[Path, int, int]] = []
    for p in _images_in(folder):
        if max_images and len(pairs) >= max_images:
            break
        w, h = _probe(p, max_pixels)
        if not is_aligned_pair(w, h):
            skipped.append((p, w, h))
            continue
        pairs.append(EvalPair(p.stem, str(p), _aligned_loader(p, max_pixels)))
    if skipped:
        first, w, h = skipped[0]
        if not pairs:
            raise DataError(first, f"{w}x{h} is not an aligned A|B pair (none of the {len(skipped)} images in "
                                   f"{folder} is); evaluation refuses to split a plain image in half: give it "
                                   f"{PAIR_LAYOUTS}")
        log.warning("%s: skipping %d image(s) that are not aligned A|B pairs (width != 2 x height; first: %s, %dx%d); "
                    "evaluating the other %d; eval expects %s", folder, len(skipped), first.name, w, h, len(pairs),
                    PAIR_LAYOUTS)
    return pairs


def folder_pairs(data: str | Path, max_images: int | None = None, flag: str = "--data",
                 max_pixels: int | None = None) -> tuple[Path, list[EvalPair]]:
    """(resolved folder, pairs in sorted order, at most ``max_images``). Every kept file's header is read here, so an
    unreadable file, one over ``max_pixels``, or (two folders) an A/B pair of different sizes is a ``DataError``
    naming the file before any work; the training dataset refuses mismatched pairs too, and resizing both halves to
    the model's size would compare images of different aspect. Aligned folders: see ``_aligned_pairs`` (images that
    are not pairs are skipped with a warning, or refused when none is)."""
    folder = resolve_split(data, flag)
    pairs: list[EvalPair] = []
    if (folder / "A").is_dir() and (folder / "B").is_dir() and not _images_in(folder):
        index_b = {p.stem: p for p in _images_in(folder / "B")}
        for pa in _images_in(folder / "A")[:max_images]:
            if pa.stem not in index_b:
                raise DataError(pa, f"no counterpart named {pa.stem}.* in {folder / 'B'}")
            pb = index_b[pa.stem]
            (wa, ha), (wb, hb) = _probe(pa, max_pixels), _probe(pb, max_pixels)
            if (wa, ha) != (wb, hb):
                raise DataError(pa, f"size {wa}x{ha} differs from its counterpart {pb} ({wb}x{hb}); an A/B pair must "
                                    "be the same size (resize one of them, or leave the pair out)")
            pairs.append(EvalPair(pa.stem, str(pa), _two_folder_loader(pa, pb, max_pixels)))
    else:
        pairs = _aligned_pairs(folder, max_images, max_pixels)
    if not pairs:
        raise DataError(folder, "folder holds no .png/.jpg/.jpeg images")
    seen: set[str] = set()
    for pr in pairs:  # 1.png and 1.jpg in one folder: keep gallery file names apart
        if pr.name in seen:
            pr.name = Path(pr.path).name.replace(".", "_")
        seen.add(pr.name)
    return folder, pairs[:max_images] if max_images else pairs


def synthetic_pairs(data_cfg, n: int) -> list[EvalPair]:
    """The built-in synthetic dataset's ``val`` phase (other images than training's), for runs without ``--data``."""
    from .data.synthetic import SyntheticDataset

    ds = SyntheticDataset(dataclasses.replace(data_cfg, phase="val", synthetic_size=n))

    def loader(i: int):
        def load(direction: str, size: int, in_nc: int, out_nc: int) -> tuple[np.ndarray, np.ndarray]:
            a, b = (Image.fromarray(x) for x in ds.arrays(i))
            src, tgt = (b, a) if direction == "BtoA" else (a, b)
            return _prep(src, size, in_nc), _prep(tgt, size, out_nc)
        return load

    return [EvalPair(f"val_{i:05d}", f"synthetic:val/{i:05d}", loader(i)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# FID / LPIPS models (local TorchScript files only)
# ---------------------------------------------------------------------------------------------------------------------
def _cuda_devices(device: torch.device) -> list:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def run_pairs(net: Callable[[torch.Tensor], torch.Tensor], pairs: list[EvalPair], *, direction: str, size: int,
              in_nc: int, out_nc: int, device: torch.device | str = "cpu", batch_size: int = 1, seed: int = 0,
              fid: Callable[[np.ndarray], np.ndarray] | None = None,
              lpips: Callable[[torch.Tensor, torch.Tensor], list[float]] | None = None,
              on_batch: Callable | None = None, progress: bool = False) -> tuple[list[dict], dict]:
    """Translate ``pairs`` with ``net`` (float N,C,H,W in [-1, 1] -> same) and score them; ``progress``: a bar on
    stderr (images, img/s, ETA; ``fastp2p.report.progress_bar``), off by default (``--eval_every`` runs inside the
    training bar).

    Returns (per-image rows {"name", "L1", "PSNR", "SSIM"[, "LPIPS"]}, {"FID": float | None}). ``on_batch(pairs,
    source, output, target)`` gets each batch's uint8 N,H,W,C arrays (the gallery writer). The global RNG state is
    forked: paper-mode dropout draws from ``seed`` and the caller's RNG streams are left as they were."""
    device = torch.device(device)
    rows: list[dict] = []
    feats: dict[str, list[np.ndarray]] = {"output": [], "target": []}
    from .report import progress_bar

    with torch.random.fork_rng(devices=_cuda_devices(device)), torch.inference_mode(), \
            progress_bar(len(pairs), "eval", progress) as bar:
        torch.manual_seed(seed)
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            loaded = [p.load(direction, size, in_nc, out_nc) for p in chunk]
            src = np.stack([s for s, _ in loaded])
            tgt = torch.from_numpy(np.stack([t for _, t in loaded]))
            out = to_uint8(net(to_model_input(torch.from_numpy(src)).to(device))).cpu()
            if out.shape != tgt.shape:
                raise UserError(f"the generator's output {tuple(out.shape[1:])} does not match the target "
                                f"{tuple(tgt.shape[1:])} (H,W,C) for {chunk[0].path}; check --direction and the "
                                "model's output channels")
            scores = M.image_metrics(M.from_uint8(out), M.from_uint8(tgt))
            if lpips is not None:
                scores["LPIPS"] = lpips(out, tgt)
            for j, p in enumerate(chunk):
                rows.append({"name": p.name, **{k: v[j] for k, v in scores.items()}})
            if fid is not None:
                feats["output"].append(fid(out.numpy()))
                feats["target"].append(fid(tgt.numpy()))
            if on_batch is not None:
                on_batch(chunk, src, out.numpy(), tgt.numpy())
            bar.update(len(chunk))
    extra: dict = {"FID": None}
    if fid is not None:
        if len(rows) < 2:
            extra["FID_note"] = "FID needs at least 2 images"
        else:
            extra["FID"] = M.fid_from_features(np.concatenate(feats["output"]), np.concatenate(feats["target"]))
    return rows, extra


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in ("L1", "PSNR", "SSIM", "LPIPS") if rows and k in rows[0]]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


# ---------------------------------------------------------------------------------------------------------------------
# the trainer's --eval_every
# ---------------------------------------------------------------------------------------------------------------------
TRAIN_EVAL_MODE = "paper"  # the default of `fastp2p eval` for checkpoints


class TrainEval:
    """``--eval_every N``: score a snapshot of the trainer's generator on the validation split.

    Split: ``--eval_data`` when given; else the ``val`` split beside the training data (``<data>/val``, or
    ``<data>/../val`` when ``--data`` names the train split itself); without ``--data``, the synthetic dataset's val
    phase. At most ``--eval_max_images`` pairs. Mode: paper (dropout on, seeded with the run's ``--seed``, the same
    masks at every evaluation), like ``fastp2p eval``'s default. The generator is copied into a fresh, untransformed
    module (the trainer's may carry fused kernels / GEMM convs), so the training modules, their BN statistics and
    train mode are untouched, and the global RNG is forked, so a run with ``--eval_every`` trains exactly as one
    without it."""

    def __init__(self, cfg, pairs: list[EvalPair], where: str):
        self.cfg, self.pairs, self.where = cfg, pairs, where

    @classmethod
    def from_config(cls, cfg) -> TrainEval | None:
        t = cfg.train
        if not t.eval_every:
            return None
        n = t.eval_max_images
        if t.eval_data:
            folder, pairs = folder_pairs(t.eval_data, n, flag="--eval_data", max_pixels=cfg.data.max_pixels)
            return cls(cfg, pairs, str(folder))
        if cfg.data.data is None:
            return cls(cfg, synthetic_pairs(cfg.data, n or 16), "synthetic:val")
        root = Path(cfg.data.data)
        for cand in (root / "val", root.parent / "val" if root.name == cfg.data.phase else None):
            if cand is not None and cand.is_dir():
                folder, pairs = folder_pairs(cand, n, flag="--eval_data", max_pixels=cfg.data.max_pixels)
                return cls(cfg, pairs, str(folder))
        log.warning("--eval_every: no val/ split beside the training data in %s; pass --eval_data DIR to evaluate "
                    "(training continues without evaluation)", root)
        return None

    def snapshot(self, G: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from .inference import with_mode
        from .models import build_generator, keys

        m = self.cfg.model
        fresh = build_generator(m.netG, m.input_nc, m.output_nc, m.ngf, m.norm, not m.no_dropout, init=False)
        fresh.load_state_dict({k: v.detach() for k, v in keys.strip_wrappers(G.state_dict()).items()})
        return with_mode(fresh.to(device), TRAIN_EVAL_MODE, dropout=True, inplace=True)

    def __call__(self, G: torch.nn.Module, device: torch.device | str) -> dict:
        device = torch.device(device)
        t0 = time.perf_counter()
        d = self.cfg.data
        # Forked RNG around everything, the module construction included (nn.Conv2d's init draws from it).
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            net = self.snapshot(G, device)
            rows, _ = run_pairs(net, self.pairs, direction=d.direction, size=d.crop_size,
                                in_nc=self.cfg.model.input_nc, out_nc=self.cfg.model.output_nc, device=device,
                                batch_size=1, seed=self.cfg.train.seed)
        return {"images": len(rows), **summarize(rows), "mode": TRAIN_EVAL_MODE, "data": self.where,
                "time_s": round(time.perf_counter() - t0, 3)}
