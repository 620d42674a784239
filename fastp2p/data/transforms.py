"""The reference pix2pix preprocessing (junyanz/pytorch-CycleGAN-and-pix2pix, ``data/base_dataset.py``), on PIL images.

Same operations, same order, same PIL calls, so outputs are bit-identical to the reference's torchvision pipeline
(torchvision's ``Resize`` on a PIL image is ``img.resize((w, h), BICUBIC)``, ``Grayscale(1)`` is ``img.convert('L')``,
``ToTensor`` + ``Normalize(0.5, 0.5)`` is ``(x / 255 - 0.5) / 0.5``):

1. optional grayscale;
2. ``'resize' in preprocess``: resize to ``load_size`` x ``load_size``; elif ``'scale_width' in preprocess``: scale the
   width to ``load_size`` keeping the aspect (height at least ``crop_size``);
3. ``'crop' in preprocess``: crop ``crop_size`` x ``crop_size`` at ``params['crop_pos']``;
4. ``preprocess == 'none'``: round both sides to a multiple of 4 (the U-Net needs it);
5. horizontal flip when ``params['flip']`` and not ``no_flip``;
6. to a float32 CHW tensor in [-1, 1].

The only change is where randomness comes from: ``get_params`` draws from a passed ``random.Random`` (same calls, in
the same order, as the reference's global ``random``) or numpy ``Generator``, so that a data worker's output depends
only on the seed it was given, never on process-global state or the number of workers.
"""

from __future__ import annotations

import logging
import random
from typing import TypedDict

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..errors import UserError

log = logging.getLogger("fastp2p.data")

PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
# Modes whose crop is taken from an image first brought to load_size, so load_size < crop_size cannot work. ('crop'
# alone never resizes: load_size is unused there, as in the reference apart from its blanket assert.)
_RESIZE_THEN_CROP = ("resize_and_crop", "scale_width_and_crop")

Rng = random.Random | np.random.Generator


class TransformParams(TypedDict):
    crop_pos: tuple[int, int]
    flip: bool


def check_preprocess(cfg: DataConfig) -> None:
    """Raise ``UserError`` naming the flag when the preprocessing settings cannot work."""
    if cfg.preprocess not in PREPROCESS_MODES:
        raise UserError(f"--preprocess: unknown mode {cfg.preprocess!r}; choose one of {', '.join(PREPROCESS_MODES)}")
    if cfg.load_size < 1 or cfg.crop_size < 1:
        raise UserError(f"--load_size/--crop_size must be positive (got {cfg.load_size}/{cfg.crop_size})")
    if cfg.preprocess in _RESIZE_THEN_CROP and cfg.load_size < cfg.crop_size:
        raise UserError(
            f"--load_size/--crop_size: load_size {cfg.load_size} is smaller than crop_size {cfg.crop_size}; "
            f"with --preprocess {cfg.preprocess} the crop is taken from the loaded image, so load_size >= crop_size"
        )


def _randint(rng: Rng, lo: int, hi: int) -> int:
    """Inclusive ``[lo, hi]`` like ``random.randint``."""
    if isinstance(rng, random.Random):
        return rng.randint(lo, hi)
    return int(rng.integers(lo, hi + 1))


def get_params(cfg: DataConfig, size: tuple[int, int], rng: Rng) -> TransformParams:
    """Draw one crop position and flip for an image of PIL ``size`` (w, h); reference ``get_params``.

    With ``rng = random.Random(s)`` the draws equal the reference's after ``random.seed(s)``: ``randint`` for x, then
    ``randint`` for y, then ``random() > 0.5`` for the flip."""
    check_preprocess(cfg)
    w, h = size
    new_w, new_h = w, h
    if cfg.preprocess == "resize_and_crop":
        new_w = new_h = cfg.load_size
    elif cfg.preprocess == "scale_width_and_crop":
        new_w = cfg.load_size
        new_h = cfg.load_size * h // w
    x = _randint(rng, 0, max(0, new_w - cfg.crop_size))
    y = _randint(rng, 0, max(0, new_h - cfg.crop_size))
    flip = bool(rng.random() > 0.5)
    return {"crop_pos": (x, y), "flip": flip}


def _scale_width(img: Image.Image, target_width: int, crop_size: int) -> Image.Image:
    # Reference __scale_width: keep the image when it already has the target width and is tall enough to crop.
    ow, oh = img.size
    if ow == target_width and oh >= crop_size:
        return img
    w = target_width
    h = int(max(target_width * oh / ow, crop_size))
    return img.resize((w, h), Image.Resampling.BICUBIC)


def _crop(img: Image.Image, pos: tuple[int, int], size: int) -> Image.Image:
    # Reference __crop: crops only when a side exceeds the crop size (an image smaller than the crop on one side gets
    # PIL's zero padding on that side, exactly as in the reference).
    ow, oh = img.size
    x1, y1 = pos
    if ow > size or oh > size:
        return img.crop((x1, y1, x1 + size, y1 + size))
    return img


_warned_power_2 = False


def _make_power_2(img: Image.Image, base: int = 4) -> Image.Image:
    # Reference __make_power_2 (despite the name: the nearest multiple of `base`, Python's round-half-to-even).
    global _warned_power_2
    ow, oh = img.size
    h = int(round(oh / base) * base)
    w = int(round(ow / base) * base)
    if h == oh and w == ow:
        return img
    if not _warned_power_2:  # the reference also warns only once
        log.warning("image size (%d, %d) is not a multiple of %d; resized to (%d, %d)", ow, oh, base, w, h)
        _warned_power_2 = True
    return img.resize((w, h), Image.Resampling.BICUBIC)


def transform_pil(img: Image.Image, cfg: DataConfig, params: TransformParams, grayscale: bool = False) -> Image.Image:
    """Steps 1-5 (everything but the tensor conversion), on PIL images."""
    check_preprocess(cfg)
    if grayscale:
        img = img.convert("L")
    if "resize" in cfg.preprocess:
        # Image.resize returns a copy without resampling when the size already matches (same as torchvision).
        img = img.resize((cfg.load_size, cfg.load_size), Image.Resampling.BICUBIC)
    elif "scale_width" in cfg.preprocess:
        img = _scale_width(img, cfg.load_size, cfg.crop_size)
    if "crop" in cfg.preprocess:
        img = _crop(img, params["crop_pos"], cfg.crop_size)
    if cfg.preprocess == "none":
        img = _make_power_2(img, base=4)
    if not cfg.no_flip and params["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# uint8 value -> the reference's float: ToTensor divides by 255, Normalize((0.5,), (0.5,)) subtracts 0.5 and divides
# by 0.5, all float32 torch ops. Tabulating those exact ops for the 256 possible inputs makes the conversion bit-exact
# by construction and a single gather pass.
_TO_FLOAT = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).sub_(torch.tensor([0.5])).div_(
    torch.tensor([0.5])).numpy().copy()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 PIL image (RGB or L) -> float32 CHW tensor in [-1, 1], bit-identical to ToTensor + Normalize(0.5, 0.5).

    One numpy gather from the HWC uint8 pixels into a contiguous CHW float32 array, wrapped without a copy. numpy, not
    torch ops, on purpose: torch would split this small op across its intra-op threads, and with another process on the
    other core each call then waits for a scheduler tick (measured 0.2 ms -> 24 ms on 2 cores)."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    arr = np.asarray(img)  # HWC (or HW) uint8; read-only is fine, take() writes a new array
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(_TO_FLOAT.take(chw))


def apply(img: Image.Image, cfg: DataConfig, params: TransformParams, grayscale: bool = False) -> torch.Tensor:
    """The whole reference transform: PIL image -> float32 CHW tensor in [-1, 1]."""
    return to_tensor(transform_pil(img, cfg, params, grayscale))
