"""Image-folder translation with a trained generator (``fastp2p translate``).

Preprocessing follows the reference's test setup (``load_size = crop_size``, no flip): the source image is resized
with bicubic filtering to ``crop_size`` x ``crop_size`` and normalized to [-1, 1]; one PNG per input, named after its
stem, at the model's resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from . import outputs
from .checkpoint import load_generator
from .config import ModelConfig
from .errors import DataError, UserError
from .images import open_image
from .inference import to_model_input, to_uint8, with_mode
from .models.unet import size_problem
from .report import progress_bar
from .video import VIDEO_SUFFIXES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
KIND = "translate"  # the marker of its PNGs (``fastp2p.outputs``): a rerun may replace them, nothing else


def collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise DataError(p, "folder holds no .png/.jpg/.jpeg images")
            files += found
        elif p.is_file():
            if len(inputs) > 1 and p.suffix.lower() in VIDEO_SUFFIXES:
                raise UserError(f"INPUT {p}: a video is translated on its own; give it as the only INPUT")
            files.append(p)
        else:
            raise UserError(f"INPUT not found: {p}")
    stems = {}
    for f in files:
        if f.stem in stems:
            raise UserError(f"INPUT: {f} and {stems[f.stem]} would both be written as {f.stem}.png; "
                            "translate them into different output folders")
        stems[f.stem] = f
    return files


def load_source(path: Path, direction: str, layout: str, size: int, nc: int,
                max_pixels: int | None = None) -> np.ndarray:
    """The source half of ``path`` as uint8 HxWxC at ``size`` x ``size``; ``DataError`` naming the file when it cannot
    be decoded or claims more than ``max_pixels`` (``fastp2p.images``)."""
    try:
        with open_image(path, max_pixels) as im:
            im.load()
            img = im.convert("RGB")
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image ({e})") from None
    w, h = img.size
    aligned = layout == "aligned" or (layout == "auto" and w == 2 * h)
    if aligned:
        if w % 2:
            raise DataError(path, f"odd width {w}: an aligned A|B pair must split into two equal halves")
        half = w // 2
        img = img.crop((half, 0, w, h)) if direction == "BtoA" else img.crop((0, 0, half, h))
    if nc == 1:
        img = img.convert("L")
    img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def output_paths(inputs: list[str], files: list[Path], out: Path, *, sources=(), overwrite: bool = False
                 ) -> list[Path]:
    """``out/<stem>.png`` for each input file, checked (``fastp2p.outputs``): never an input or an input folder; an
    existing file only if an earlier ``translate`` output, or with ``overwrite``."""
    outputs.output_dir(out, "-o", inputs=inputs)
    return outputs.output_files(out, [f"{f.stem}.png" for f in files], "-o", kind=KIND,
                                ours=lambda p: outputs.png_marked(p, KIND), inputs=[*files, *sources],
                                overwrite=overwrite)


def translate_paths(inputs, checkpoint, out, *, mode=None, direction=None, layout="auto", batch_size=1,
                    crop_size=None, model: ModelConfig | None = None, dropout=None, device=None, seed=0,
                    engine=None, kernels=None, overwrite: bool = False, max_pixels: int | None = None,
                    progress: bool = True, backend: str | None = None, runtime_options: dict | None = None
                    ) -> list[Path]:
    """Translate ``inputs`` with a ``checkpoint`` (torch) or an exported ``engine`` (.onnx / .plan); returns the PNGs.

    mode/dropout None: paper mode with dropout for checkpoints; whatever an engine has baked in. ``overwrite``: also
    replace files at the output paths that are not earlier translate outputs (inputs are never replaced).
    ``max_pixels``: larger inputs are a ``DataError`` (default ``fastp2p.config.DEFAULT_MAX_PIXELS``). ``progress``: a
    bar on stderr (images, img/s, ETA; ``fastp2p.report.progress_bar``). ``backend``, ``runtime_options`` (threads,
    ov_precision, ov_hint, streams): how an ``engine`` runs (``fastp2p.engines.runtime.open_runtime``)."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint not found: {checkpoint}")
    files = collect_inputs(list(inputs))
    for f in files:  # headers only: an unreadable or oversized input stops the run before any work, naming it
        try:
            with open_image(f, max_pixels):
                pass
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f, f"cannot decode image ({e})") from None
    out = Path(out)
    dsts = output_paths(list(inputs), files, out, sources=[checkpoint, engine], overwrite=overwrite)
    if engine is not None:
        from .engines.runtime import open_runtime

        net = open_runtime(engine, device=device, mode=mode, dropout=dropout, crop_size=crop_size,
                           direction=direction, backend=backend, **(runtime_options or {}))
        meta = net.meta
        direction, crop_size, in_nc, dev = direction or meta["direction"], crop_size or meta["crop_size"], \
            meta["input_nc"], net.device
    else:
        dev = torch.device(device or "cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        G, cfg = load_generator(checkpoint, model)
        if cfg is not None:
            direction = direction or cfg.data.direction
            crop_size = crop_size or cfg.data.crop_size
        direction, crop_size = direction or "AtoB", crop_size or 256
        why = size_problem(crop_size, G.num_downs)
        if why:
            raise UserError(why)
        in_nc = G.down[0].in_channels
        net = with_mode(G, mode or "paper", dropout=dropout is not False, inplace=True).to(dev)
        from .kernels import apply_fused_kernels, default_backend

        if (kernels or default_backend()) == "triton":  # the trainer's --kernels switch, same default
            apply_fused_kernels(net, "triton")
    torch.manual_seed(seed)
    with outputs.writing(out, "-o"):
        out.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for k, v in outputs.png_text(KIND).items():
        info.add_text(k, v)
    dst_of = dict(zip(files, dsts, strict=True))
    written = []
    with torch.inference_mode(), progress_bar(len(files), "translate", progress) as bar:
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            x = np.stack([load_source(f, direction, layout, crop_size, in_nc, max_pixels) for f in chunk])
            y = to_uint8(net(to_model_input(torch.from_numpy(x)).to(dev))).cpu().numpy()
            for f, img in zip(chunk, y, strict=True):
                dst = dst_of[f]
                with outputs.writing(dst, "-o"):
                    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(dst, pnginfo=info)
                written.append(dst)
            bar.update(len(chunk))
    return written
