"""``fastp2p eval``: translate a validation split, score every output against its target, write a report.

    fastp2p eval --checkpoint G.safetensors --data ../shared/datasets/facades/val --direction BtoA -o eval/G
    fastp2p eval --engine G.onnx --data ../shared/datasets/facades            # the dataset root: uses val/ (or test/)

    from fastp2p.evaluate import evaluate
    result = evaluate("G.safetensors", "datasets/facades/val", out="eval/G")   # the metrics.json dict (+ per_image)

Data (``--data``): a folder of aligned A|B images (the pix2pix layout; ``--direction`` picks the source half), or a
folder with ``A/`` and ``B/`` sub-folders of same-named images; or a dataset root without images of its own, whose
``val/`` split (else ``test/``) is used. Files are taken in sorted order; ``--max_images N`` keeps the first N. Every
kept file's header is read first: an unreadable file, one over ``--max_pixels``, or an A/B pair of different sizes
(refused, as training refuses it: resizing both to the model's size would compare different framings) stops the run
with one line naming the file, before any work.

Preprocessing is ``translate``'s (the reference's test setup): source and target are resized with bicubic filtering to
the model's ``crop_size`` (no crop, no flip) and the output is compared with the target at that resolution. Metrics
are computed on the 8-bit images (the PNGs under ``OUT/images/``, so they can be recomputed from the files), scaled to
[0, 1]; see ``fastp2p.metrics`` for the exact definitions (L1 on [0, 1], PSNR in dB capped at 100, Gaussian SSIM).
Means are over images (the mean of per-image PSNRs, as image-translation papers report it).

Mode: ``--mode paper`` (default for checkpoints, as ``translate`` and the reference's ``test.py``: per-image
normalization statistics, dropout on, drawn from ``--seed`` so a run is repeatable) or ``eval`` (running statistics,
no dropout). An exported engine has its mode baked in. Runs never touch the global RNG state (it is forked).

FID and LPIPS run only with local weights files; nothing is downloaded:

- ``--fid_weights inception-2015-12-05.pt``: the TorchScript Inception-v3 that NVlabs publishes for StyleGAN2-ADA's
  metrics and clean-fid uses. Images follow clean-fid's "clean" mode: each channel is resized in float with PIL's
  bicubic filter to 299 x 299, clipped to [0, 255], and the model is called as ``model(x, return_features=True)``
  (it normalizes ``(x - 128) / 128`` itself) -> N x 2048 pool features. FID compares the outputs' features with the
  targets' (both at the model's resolution). With ~100 images (facades val) FID is strongly biased upwards and
  noisy: compare runs with each other on the same split, not with published numbers.
- ``--lpips_weights lpips.pt``: any TorchScript module called as ``model(a, b)`` on two N,3,H,W batches in [-1, 1]
  returning one distance per image (N or N,1,1,1). To make one from the ``lpips`` package (which needs torchvision, so
  on another machine): ``m = lpips.LPIPS(net="alex").eval(); x = torch.zeros(1, 3, 256, 256);
  torch.jit.trace(m, (x, x)).save("lpips_alex.pt")``.

Output folder (default ``eval/<file stem>``): ``metrics.json`` (means and the run's description, schema in
``evaluate``'s doc), ``metrics.csv`` (one row per image), ``index.html`` (a gallery: name | input | output | target |
scores, sortable by clicking a column header; no external resources) and ``images/<name>_{input,output,target}.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import metrics as M
from . import outputs
from .checkpoint import atomic_write, versions
from .errors import DataError, UserError
from .images import open_image
from .inference import to_model_input, to_uint8

log = logging.getLogger("fastp2p.eval")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("val", "test")  # tried in this order under a dataset root
SKIP_HINT = ("pass --fid_weights inception-2015-12-05.pt and/or --lpips_weights lpips.pt (local TorchScript files; "
             "see `fastp2p eval --help`)")


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


def _open_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    try:
        with open_image(path, max_pixels) as im:
            im.load()
            return im.convert("RGB")
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image ({e})") from None


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
        img = _open_rgb(path, max_pixels)
        w, h = img.size
        if w % 2:
            raise DataError(path, f"odd width {w}: an aligned A|B pair must split into two equal halves")
        a, b = img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, w, h))
        src, tgt = (b, a) if direction == "BtoA" else (a, b)
        return _prep(src, size, in_nc), _prep(tgt, size, out_nc)
    return load


def _two_folder_loader(pa: Path, pb: Path, max_pixels: int | None = None):
    def load(direction: str, size: int, in_nc: int, out_nc: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = _open_rgb(pa, max_pixels), _open_rgb(pb, max_pixels)
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


def folder_pairs(data: str | Path, max_images: int | None = None, flag: str = "--data",
                 max_pixels: int | None = None) -> tuple[Path, list[EvalPair]]:
    """(resolved folder, pairs in sorted order, at most ``max_images``). Every kept file's header is read here, so an
    unreadable file, one over ``max_pixels``, or (two folders) an A/B pair of different sizes is a ``DataError``
    naming the file before any work; the training dataset refuses mismatched pairs too, and resizing both halves to
    the model's size would compare images of different aspect."""
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
        for p in _images_in(folder)[:max_images]:
            _probe(p, max_pixels)
            pairs.append(EvalPair(p.stem, str(p), _aligned_loader(p, max_pixels)))
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
def _load_torchscript(path, flag: str, what: str, device: torch.device):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: file not found: {path} ({what}; nothing is downloaded, give a local file)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # torch.jit raises RuntimeError / ValueError / zip errors for foreign files
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise UserError(f"{flag} {path}: not a TorchScript module ({why}); expected {what}") from None


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures:
    """N x 2048 Inception pool features of uint8 images (clean-fid's "clean" resize, see the module doc)."""

    SIZE = 299

    def __init__(self, path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = _load_torchscript(path, "--fid_weights", "the TorchScript Inception inception-2015-12-05.pt",
                                       self.device)

    def resize(self, img: np.ndarray) -> np.ndarray:
        """uint8 H,W,C -> float32 3,299,299 in [0, 255]: per-channel float bicubic, as clean-fid."""
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        chans = [np.asarray(Image.fromarray(img[:, :, c].astype(np.float32), mode="F")
                            .resize((self.SIZE, self.SIZE), Image.BICUBIC)) for c in range(3)]
        return np.clip(np.stack(chans), 0, 255)

    def __call__(self, imgs: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.stack([self.resize(i) for i in imgs])).to(self.device)
        with torch.inference_mode():
            f = self.model(x, return_features=True)
        f = torch.as_tensor(f).reshape(len(imgs), -1)
        return f.double().cpu().numpy()


class LpipsDistance:
    """Per-image LPIPS from a TorchScript ``model(a, b)`` on [-1, 1] N,3,H,W batches."""

    def __init__(self, path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = _load_torchscript(path, "--lpips_weights", "a TorchScript LPIPS module (see `fastp2p eval "
                                       "--help`)", self.device)
        self.path = path

    def __call__(self, out: torch.Tensor, tgt: torch.Tensor) -> list[float]:
        a = _rgb(to_model_input(out)).to(self.device)
        b = _rgb(to_model_input(tgt)).to(self.device)
        with torch.inference_mode():
            d = torch.as_tensor(self.model(a, b))
        if d.numel() != a.shape[0]:
            raise UserError(f"--lpips_weights {self.path}: returned {tuple(d.shape)} for a batch of {a.shape[0]}; "
                            "it must return one distance per image")
        return d.reshape(-1).double().cpu().tolist()


# ---------------------------------------------------------------------------------------------------------------------
# the evaluation loop
# ---------------------------------------------------------------------------------------------------------------------
def _cuda_devices(device: torch.device) -> list:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def run_pairs(net: Callable[[torch.Tensor], torch.Tensor], pairs: list[EvalPair], *, direction: str, size: int,
              in_nc: int, out_nc: int, device: torch.device | str = "cpu", batch_size: int = 1, seed: int = 0,
              fid: InceptionFeatures | None = None, lpips: LpipsDistance | None = None,
              on_batch: Callable | None = None) -> tuple[list[dict], dict]:
    """Translate ``pairs`` with ``net`` (float N,C,H,W in [-1, 1] -> same) and score them.

    Returns (per-image rows {"name", "L1", "PSNR", "SSIM"[, "LPIPS"]}, {"FID": float | None}). ``on_batch(pairs,
    source, output, target)`` gets each batch's uint8 N,H,W,C arrays (the gallery writer). The global RNG state is
    forked: paper-mode dropout draws from ``seed`` and the caller's RNG streams are left as they were."""
    device = torch.device(device)
    rows: list[dict] = []
    feats: dict[str, list[np.ndarray]] = {"output": [], "target": []}
    with torch.random.fork_rng(devices=_cuda_devices(device)), torch.inference_mode():
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
# report files
# ---------------------------------------------------------------------------------------------------------------------
_HIGHER_IS_BETTER = {"L1": False, "PSNR": True, "SSIM": True, "LPIPS": False}


KIND = "eval"  # the marker of the gallery PNGs (``fastp2p.outputs``)
REPORT_FILES = ("metrics.csv", "index.html", "metrics.json")
GALLERY_KINDS = ("input", "output", "target")


def _png(arr: np.ndarray, path: Path) -> None:
    info = PngInfo()
    for k, v in outputs.png_text(KIND).items():
        info.add_text(k, v)
    with outputs.writing(path, "-o"):
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path, format="PNG", pnginfo=info)


def is_eval_report(path: str | Path) -> bool:
    """``path`` is the metrics.json of an earlier ``fastp2p eval``."""
    d = outputs.json_object(path)
    return (d is not None and isinstance(d.get("definitions"), dict) and isinstance(d.get("versions"), dict)
            and "fastp2p" in d["versions"])


def check_report_folder(out: Path, pairs: list[EvalPair], *, inputs=(), overwrite: bool = False) -> list[Path]:
    """Check every file ``write_report`` and the gallery will write under ``out`` (``fastp2p.outputs``): ``out`` is no
    input folder; an existing file there is replaced only in an earlier eval's folder (its metrics.json, or gallery
    PNGs carrying eval's marker) or with ``overwrite``. Two pairs with one gallery name are refused."""
    outputs.output_dir(out, "-o", inputs=inputs)
    seen: dict[str, str] = {}
    for p in pairs:
        if p.name in seen:
            raise DataError(p.path, f"and {seen[p.name]} would share the gallery name {p.name}; rename one")
        seen[p.name] = p.path
    images = out / "images"
    owned = is_eval_report(out / "metrics.json") or (
        images.is_dir() and any(outputs.png_marked(f, KIND) for f in images.glob("*.png")))
    names = [*REPORT_FILES, *(f"images/{p.name}_{k}.png" for p in pairs for k in GALLERY_KINDS)]
    return outputs.output_files(out, names, "-o", kind=KIND, inputs=inputs, overwrite=overwrite,
                                ours=(lambda f: True) if owned else (lambda f: outputs.png_marked(f, KIND)))


class GalleryWriter:
    """Writes ``images/<name>_{input,output,target}.png`` as batches come in (``on_batch`` of ``run_pairs``)."""

    def __init__(self, out: Path):
        self.dir = out / "images"
        with outputs.writing(self.dir, "-o"):
            self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, pairs, src, out, tgt) -> None:
        for p, s, o, t in zip(pairs, src, out, tgt, strict=True):
            for kind, arr in (("input", s), ("output", o), ("target", t)):
                _png(arr, self.dir / f"{p.name}_{kind}.png")


def _fmt(k: str, v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if k in ("PSNR", "FID") else f"{v:.4f}"


def gallery_html(result: dict, rows: list[dict]) -> str:
    keys = [k for k in ("L1", "PSNR", "SSIM", "LPIPS") if rows and k in rows[0]]
    e = html.escape
    src = result.get("checkpoint") or result.get("engine")
    where = f'{result.get("images")} image(s) from {e(str(result.get("data")))}'
    means = " &middot; ".join(f"{k} {_fmt(k, result.get(k))}" for k in ("L1", "PSNR", "SSIM", "FID", "LPIPS"))
    head = "".join(f'<th class="sort" data-key="{k.lower()}" title="{"higher" if _HIGHER_IS_BETTER[k] else "lower"} '
                   f'is better; click to sort">{k}</th>' for k in keys)
    body = []
    for r in rows:
        n = e(r["name"])
        data = " ".join(f'data-{k.lower()}="{r[k]!r}"' for k in keys)
        imgs = "".join(f'<td><img src="images/{e(quote(r["name"]))}_{kind}.png" alt="{n} {kind}"></td>'
                       for kind in ("input", "output", "target"))
        cells = "".join(f"<td>{_fmt(k, r[k])}</td>" for k in keys)
        body.append(f'<tr data-name="{e(r["name"], quote=True)}" {data}><td>{n}</td>{imgs}{cells}</tr>')
    rows_html = "\n".join(body)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fastp2p eval: {e(str(src))}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px; text-align: center; }}
th.sort {{ cursor: pointer; text-decoration: underline; }}
img {{ width: 192px; height: auto; display: block; }}
</style></head>
<body>
<h1>fastp2p eval</h1>
<p>{e(str(src))} &middot; {e(str(result.get("backend")))} &middot; mode {e(str(result.get("mode")))} &middot;
direction {e(str(result.get("direction")))} &middot; {where}</p>
<p>{means}</p>
<p>L1 on [0, 1], PSNR in dB (data range 1, capped at {M.PSNR_MAX:g}), SSIM (Gaussian 11x11, &sigma; 1.5).
Click a column header to sort.</p>
<table id="results">
<thead><tr><th class="sort" data-key="name">name</th><th>input</th><th>output</th><th>target</th>{head}</tr></thead>
<tbody>
{rows_html}
</tbody></table>
<script>
document.querySelectorAll("th.sort").forEach(function (th) {{
  th.addEventListener("click", function () {{
    var key = th.dataset.key, tbody = document.querySelector("#results tbody");
    var asc = th.dataset.dir !== "asc";
    th.dataset.dir = asc ? "asc" : "desc";
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {{
      var x = a.dataset[key], y = b.dataset[key];
      if (key !== "name") {{ x = parseFloat(x); y = parseFloat(y); }}
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    }});
    rows.forEach(function (r) {{ tbody.appendChild(r); }});
  }});
}});
</script>
</body></html>
"""


def _csv_text(rows: list[dict]) -> str:
    keys = ["name"] + [k for k in ("L1", "PSNR", "SSIM", "LPIPS") if rows and k in rows[0]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in rows:
        w.writerow([r["name"]] + [repr(float(r[k])) for k in keys[1:]])
    return buf.getvalue()


def write_report(out: Path, result: dict, rows: list[dict]) -> None:
    with outputs.writing(out, "-o"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "metrics.csv", lambda tmp: Path(tmp).write_text(_csv_text(rows)))
        atomic_write(out / "index.html",
                     lambda tmp: Path(tmp).write_text(gallery_html(result, rows), encoding="utf-8"))
        atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))


# ---------------------------------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------------------------------
DEFINITIONS = {
    "L1": "mean absolute error over pixels and channels of the 8-bit images scaled to [0, 1]",
    "PSNR": f"10*log10(1/MSE) in dB on [0, 1] images (data range 1), capped at {M.PSNR_MAX:g} dB; mean of per-image "
            "values",
    "SSIM": "Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid window "
            "positions, mean over channels (= skimage structural_similarity(gaussian_weights=True, "
            "use_sample_covariance=False))",
    "FID": "Frechet distance of TorchScript Inception-v3 pool features (clean-fid 'clean' resize to 299), outputs vs "
           "targets",
    "LPIPS": "mean per-image distance of the given TorchScript LPIPS module, outputs vs targets in [-1, 1]",
}


def skip_line(skipped: dict) -> str:
    return f"{' and '.join(skipped)} skipped: no weights given; {SKIP_HINT}"


def evaluate(source, data, *, out: str | Path | None = None, direction: str | None = None, mode: str | None = None,
             dropout: bool | None = None, model=None, crop_size: int | None = None, batch_size: int = 1,
             seed: int = 0, device: str | None = None, fid_weights: str | Path | None = None,
             lpips_weights: str | Path | None = None, max_images: int | None = None, write: bool = True,
             quiet: bool = False, overwrite: bool = False, max_pixels: int | None = None) -> dict:
    """Evaluate a generator on a split and (``write``) write the report to ``out`` (default ``eval/<stem>``; checked
    first by ``check_report_folder``: never the data folder, files there replaced only if an earlier eval's, or
    with ``overwrite``).

    source: a checkpoint (.safetensors / reference .pth described by ``model``), an exported .onnx / .plan, or an open
    ``fastp2p.engines.runtime.Generator``. mode / dropout: as ``translate`` (checkpoints: default paper mode with
    dropout; engines: baked in). Returns the ``metrics.json`` dict plus ``"per_image"`` (the CSV's rows):

        images: int, L1, PSNR, SSIM: float (means), FID, LPIPS: float | null,
        checkpoint | engine: str (the other null), backend, mode, dropout, direction, crop_size, seed, data (the
        folder used), max_images, skipped: {"FID"?: why, "LPIPS"?: why}, definitions: {metric: text},
        files: {"csv", "gallery", "images"}, time_s, versions
    """
    from .engines.runtime import TORCH_SUFFIXES, Generator, open_runtime

    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be >= 1")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max_images {max_images}: must be >= 1")
    t0 = time.perf_counter()
    folder, pairs = folder_pairs(data, max_images, max_pixels=max_pixels)
    if write:  # before any model is loaded: a bad -o fails at once and nothing is written
        named = Path(str(source.meta.get("source") or "generator")) if isinstance(source, Generator) else Path(source)
        check_report_folder(Path(out) if out is not None else Path("eval") / named.stem, pairs, overwrite=overwrite,
                            inputs=[data, folder, folder / "A", folder / "B", named, fid_weights, lpips_weights])
    dev = torch.device(device or "cpu")
    fid = InceptionFeatures(fid_weights, dev) if fid_weights else None
    lpips = LpipsDistance(lpips_weights, dev) if lpips_weights else None
    if isinstance(source, Generator):
        rt, path = source, Path(str(source.meta.get("source") or "generator"))
    else:
        path = Path(source)
        with torch.random.fork_rng(devices=[]):  # building the module draws init weights from the CPU RNG
            rt = open_runtime(path, device=device, mode=mode, dropout=dropout, model=model, crop_size=crop_size,
                              direction=direction)
    meta = rt.meta
    is_ckpt = rt.backend.startswith("torch") and path.suffix.lower() in TORCH_SUFFIXES
    direction = direction or meta["direction"]
    skipped = {}
    if fid is None:
        skipped["FID"] = "no --fid_weights given"
    if lpips is None:
        skipped["LPIPS"] = "no --lpips_weights given"
    if skipped and not quiet:
        log.info("%s", skip_line(skipped))
    out = Path(out) if out is not None else Path("eval") / path.stem
    gallery = GalleryWriter(out) if write else None
    rows, extra = run_pairs(rt, pairs, direction=direction, size=meta["crop_size"], in_nc=meta["input_nc"],
                            out_nc=meta["output_nc"], device=rt.device, batch_size=batch_size, seed=seed, fid=fid,
                            lpips=lpips, on_batch=gallery)
    means = summarize(rows)
    result = {
        "images": len(rows), "L1": means["L1"], "PSNR": means["PSNR"], "SSIM": means["SSIM"], "FID": extra["FID"],
        "LPIPS": means.get("LPIPS"),
        "checkpoint": str(path) if is_ckpt else None, "engine": None if is_ckpt else str(path),
        "backend": rt.backend, "mode": meta["mode"], "dropout": bool(meta["dropout"]), "direction": direction,
        "crop_size": int(meta["crop_size"]), "seed": seed, "data": str(folder), "max_images": max_images,
        "skipped": skipped, "definitions": DEFINITIONS,
        "files": {"csv": "metrics.csv", "gallery": "index.html", "images": "images/"} if write else None,
        "time_s": round(time.perf_counter() - t0, 3), "versions": versions(),
    }
    if "FID_note" in extra:
        result["skipped"]["FID"] = extra["FID_note"]
    if write:
        write_report(out, result, rows)
        result["out"] = str(out)
    result["per_image"] = rows
    return result


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


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def add_subcommand(sub) -> None:
    from .cli import _add_arch, _add_max_pixels, _add_overwrite, _positive, _seed

    p = sub.add_parser("eval", help="score a generator on a validation split (L1, PSNR, SSIM; FID/LPIPS with local "
                                    "weights) and write an HTML gallery",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fastp2p .safetensors or reference latest_net_G.pth")
    src.add_argument("--engine", help="an exported G.onnx (ONNX Runtime) or G.plan (TensorRT)")
    p.add_argument("--data", required=True,
                   help="folder of aligned A|B images (or with A/ and B/), or a dataset root: its val/ (else test/)")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help="which half is the source (default: the checkpoint's, else AtoB)")
    p.add_argument("--mode", choices=("paper", "eval"), default=None,
                   help="paper (default for checkpoints): per-image statistics + dropout seeded by --seed; eval: "
                        "running stats, no dropout. An --engine has its mode baked in")
    p.add_argument("-o", "--out", default=None,
                   help="output folder (default eval/<file stem>); never the --data folder")
    _add_overwrite(p, "the files of an earlier eval's folder")
    p.add_argument("--batch_size", type=_positive, default=1)
    p.add_argument("--seed", type=_seed, default=0, help="seed of paper-mode dropout")
    p.add_argument("--max_images", type=_positive, default=None, help="evaluate the first N pairs only")
    p.add_argument("--crop_size", type=_positive, default=None, help="model input size (default: the checkpoint's)")
    p.add_argument("--no_dropout_at_inference", action="store_true", help="paper mode without dropout")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu (cuda for a TensorRT plan)")
    p.add_argument("--fid_weights", default=None,
                   help="local TorchScript inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid); enables FID")
    p.add_argument("--lpips_weights", default=None,
                   help="local TorchScript LPIPS module: model(a, b) on [-1, 1] images -> one distance per image, "
                        'e.g. torch.jit.trace(lpips.LPIPS(net="alex").eval(), (x, x)).save(...); enables LPIPS')
    _add_max_pixels(p)
    _add_arch(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .cli import _arch_from, check_arch_flags, check_crop_size, check_source_flags
    from .engines.runtime import TORCH_SUFFIXES

    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if ckpt.suffix.lower() not in TORCH_SUFFIXES:
            raise UserError(f"--checkpoint {ckpt}: expected a .safetensors or reference .pth; pass exported .onnx / "
                            ".plan files with --engine")
        if not ckpt.is_file():
            raise UserError(f"--checkpoint not found: {ckpt}")
    check_source_flags(args)
    check_arch_flags(args, args.checkpoint or args.engine, "--checkpoint" if args.checkpoint else "--engine")
    check_crop_size(args.crop_size, args.max_pixels)
    r = evaluate(args.checkpoint or args.engine, args.data, out=args.out, direction=args.direction, mode=args.mode,
                 dropout=False if args.no_dropout_at_inference else None, model=_arch_from(args),
                 crop_size=args.crop_size, batch_size=args.batch_size, seed=args.seed, device=args.device,
                 fid_weights=args.fid_weights, lpips_weights=args.lpips_weights, max_images=args.max_images,
                 quiet=True, overwrite=args.overwrite, max_pixels=args.max_pixels)
    if r["skipped"]:
        print(f"fastp2p: {skip_line(r['skipped'])}", file=sys.stderr)
    print(f"eval: {r['images']} image(s)  L1 {_fmt('L1', r['L1'])}  PSNR {_fmt('PSNR', r['PSNR'])} dB  "
          f"SSIM {_fmt('SSIM', r['SSIM'])}  FID {_fmt('FID', r['FID'])}  LPIPS {_fmt('LPIPS', r['LPIPS'])}  "
          f"-> {Path(r['out']) / 'index.html'}")
    return 0
