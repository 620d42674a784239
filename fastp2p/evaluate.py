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

Reference (``--reference CKPT|ENGINE``, e.g. the fp32 teacher of an INT8 engine or of a distilled student): the same
inputs also go through the reference generator, in a pass of its own with the same seed, and every output is scored
against the reference's output too (``psnr_ref``, ``ssim_ref``, ``l1_ref`` per image, their means and the worst
``psnr_ref_min``; the reference against the targets as ``reference_L1/PSNR/SSIM``), on the 8-bit images as the rest
(a generator against itself gives the PSNR cap, 100 dB). A reference checkpoint runs in the evaluated generator's
mode and paper-mode dropout; an exported reference must have been exported in that mode (else one error line). Keep
dropout off (``--no_dropout_at_inference`` or ``--mode eval``) for a deterministic comparison. ``--min_psnr DB`` makes
the run a quality gate (``fastp2p.gate``): exit 2 after writing the report when the mean ``psnr_ref`` is below it,
unless ``--force``. Without ``--reference`` the report is exactly what it was.

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
scores, rows in natural name order (2 before 10), sortable by clicking a column header; no external resources) and
``images/<name>_{input,output,target}.png`` (with a reference also ``_reference.png``, shown as input | reference |
output | target). The gallery shows the PNGs under ``images/`` beside it (relative links,
not inlined: a gallery of a large split would be hundreds of MB of HTML): copy or move the folder whole.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import re
import time
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
from .inference import to_model_input
from .scoring import (  # noqa: F401
    IMAGE_SUFFIXES,
    SPLITS,
    TRAIN_EVAL_MODE,
    EvalPair,
    TrainEval,
    folder_pairs,
    resolve_split,
    run_pairs,
    summarize,
    synthetic_pairs,
)

log = logging.getLogger("fastp2p.eval")

SKIP_HINT = ("pass --fid_weights inception-2015-12-05.pt and/or --lpips_weights lpips.pt (local TorchScript files; "
             "see `fastp2p eval --help`)")


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
# ---------------------------------------------------------------------------------------------------------------------
# report files
# ---------------------------------------------------------------------------------------------------------------------
_HIGHER_IS_BETTER = {"L1": False, "PSNR": True, "SSIM": True, "LPIPS": False, "psnr_ref": True, "ssim_ref": True,
                     "l1_ref": False}
REF_KEYS = ("psnr_ref", "ssim_ref", "l1_ref")  # per image, with ``reference``: the output against the reference's


KIND = "eval"  # the marker of the gallery PNGs (``fastp2p.outputs``)
REPORT_FILES = ("metrics.csv", "index.html", "metrics.json")
GALLERY_KINDS = ("input", "output", "target")
REFERENCE_KIND = "reference"  # images/<name>_reference.png: the --reference generator's output


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


def check_report_folder(out: Path, pairs: list[EvalPair], *, inputs=(), overwrite: bool = False,
                        kinds: tuple[str, ...] = GALLERY_KINDS) -> list[Path]:
    """Check every file ``write_report`` and the gallery will write under ``out`` (``fastp2p.outputs``): ``out`` is no
    input folder; an existing file there is replaced only in an earlier eval's folder (its metrics.json, or gallery
    PNGs carrying eval's marker) or with ``overwrite``. Two pairs with one gallery name are refused. ``kinds``: the
    gallery PNGs per pair (``images/<name>_<kind>.png``; with a reference, ``REFERENCE_KIND`` too)."""
    outputs.output_dir(out, "-o", inputs=inputs)
    seen: dict[str, str] = {}
    for p in pairs:
        if p.name in seen:
            raise DataError(p.path, f"and {seen[p.name]} would share the gallery name {p.name}; rename one")
        seen[p.name] = p.path
    images = out / "images"
    owned = is_eval_report(out / "metrics.json") or (
        images.is_dir() and any(outputs.png_marked(f, KIND) for f in images.glob("*.png")))
    names = [*REPORT_FILES, *(f"images/{p.name}_{k}.png" for p in pairs for k in kinds)]
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
    return f"{v:.2f}" if k in ("PSNR", "FID", "psnr_ref", "reference_PSNR", "psnr_ref_min") else f"{v:.4f}"


def natural_key(name: str) -> list:
    """Sort key that orders the digit runs of a name by value: 2.jpg before 10.jpg, p9 before p10."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.casefold())
            for part in re.split(r"(\d+)", name) if part]


GALLERY_IMAGE_PX = 256  # thumbnail width in index.html: the model's usual crop size, shown 1:1


def gallery_html(result: dict, rows: list[dict]) -> str:
    """index.html: one row per image in natural name order, linking ``images/<name>_<kind>.png`` beside it."""
    rows = sorted(rows, key=lambda r: natural_key(r["name"]))
    keys = [k for k in ("L1", "PSNR", "SSIM", "LPIPS", *REF_KEYS) if rows and k in rows[0]]
    e = html.escape
    src = result.get("checkpoint") or result.get("engine")
    where = f'{result.get("images")} image(s) from {e(str(result.get("data")))}'
    means = " &middot; ".join(f"{k} {_fmt(k, result.get(k))}" for k in ("L1", "PSNR", "SSIM", "FID", "LPIPS"))
    kinds = ("input", "output", "target")
    if result.get("reference"):  # input | reference | output | target, and a line of means against the reference
        kinds = ("input", REFERENCE_KIND, "output", "target")
        vs_ref = " &middot; ".join(f"{k} {_fmt(k, result.get(k))}" for k in REF_KEYS)
        ref_vs_tgt = " &middot; ".join(f"{k} {_fmt('reference_' + k, result.get('reference_' + k))}"
                                       for k in ("L1", "PSNR", "SSIM"))
        means += (f"</p>\n<p>against the reference {e(str(result['reference']))} "
                  f"({e(str(result.get('reference_backend')))}): {vs_ref} &middot; the reference against the "
                  f"targets: {ref_vs_tgt}")
    head = "".join(f'<th class="sort" data-key="{k.lower()}" title="{"higher" if _HIGHER_IS_BETTER[k] else "lower"} '
                   f'is better; click to sort">{k}</th>' for k in keys)
    body = []
    for r in rows:
        n = e(r["name"])
        data = " ".join(f'data-{k.lower()}="{r[k]!r}"' for k in keys)
        imgs = "".join(f'<td><img src="images/{e(quote(r["name"]))}_{kind}.png" alt="{n} {kind}"></td>'
                       for kind in kinds)
        cells = "".join(f"<td>{_fmt(k, r[k])}</td>" for k in keys)
        body.append(f'<tr data-name="{e(r["name"], quote=True)}" {data}><td>{n}</td>{imgs}{cells}</tr>')
    rows_html = "\n".join(body)
    img_head = "".join(f"<th>{kind}</th>" for kind in kinds)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fastp2p eval: {e(str(src))}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px; text-align: center; }}
th.sort {{ cursor: pointer; text-decoration: underline; }}
img {{ width: {GALLERY_IMAGE_PX}px; height: auto; display: block; }}
</style></head>
<body>
<h1>fastp2p eval</h1>
<p>{e(str(src))} &middot; {e(str(result.get("backend")))} &middot; mode {e(str(result.get("mode")))} &middot;
direction {e(str(result.get("direction")))} &middot; {where}</p>
<p>{means}</p>
<p>L1 on [0, 1], PSNR in dB (data range 1, capped at {M.PSNR_MAX:g}), SSIM (Gaussian 11x11, &sigma; 1.5).
Click a column header to sort. The images are the PNGs in <code>images/</code> beside this page: keep the two
together.</p>
<table id="results">
<thead><tr><th class="sort" data-key="name">name</th>{img_head}{head}</tr></thead>
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
      var c = key === "name" ? x.localeCompare(y, undefined, {{numeric: true, sensitivity: "base"}})
                             : parseFloat(x) - parseFloat(y);
      return (c < 0 ? -1 : c > 0 ? 1 : 0) * (asc ? 1 : -1);
    }});
    rows.forEach(function (r) {{ tbody.appendChild(r); }});
  }});
}});
</script>
</body></html>
"""


def _csv_text(rows: list[dict]) -> str:
    keys = ["name"] + [k for k in ("L1", "PSNR", "SSIM", "LPIPS", *REF_KEYS) if rows and k in rows[0]]
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


REF_DEFINITIONS = {  # added to "definitions" with a reference only (the report without one is unchanged)
    "psnr_ref": "PSNR of the output against the reference generator's output on the same input (both 8-bit, on "
                f"[0, 1], capped at {M.PSNR_MAX:g} dB: a generator against itself gives {M.PSNR_MAX:g}); mean of "
                "per-image values; psnr_ref_min is the worst image",
    "ssim_ref": "SSIM of the output against the reference generator's output (definition as SSIM)",
    "l1_ref": "L1 of the output against the reference generator's output (definition as L1)",
    "reference_L1": "L1 of the reference generator's outputs against the targets (likewise reference_PSNR, "
                    "reference_SSIM)",
}


def skip_line(skipped: dict) -> str:
    return f"{' and '.join(skipped)} skipped: no weights given; {SKIP_HINT}"


def _runs_as(meta: dict) -> str:
    dropout = f", dropout {'on' if meta['dropout'] else 'off'}" if meta["mode"] == "paper" else ""
    return f"{meta['mode']} mode{dropout}"


def open_reference(reference, candidate, *, direction: str, device=None, model=None):
    """The ``Generator`` that ``reference`` (a checkpoint, an exported .onnx / .plan, or an open ``Generator``) names,
    running as ``candidate`` runs: a checkpoint is opened in the candidate's mode and paper-mode dropout, at its
    ``crop_size`` and ``direction``, on ``device`` (default: the candidate's device); an exported file or a
    ``Generator`` must already match (mode, dropout, sizes, channels), else a one-line ``UserError`` naming
    ``--reference``. Same mode and inputs make the two outputs comparable: in eval mode or without dropout both are
    deterministic, so a reference against itself gives identical outputs."""
    from .engines.runtime import TORCH_SUFFIXES, Generator, open_runtime

    cm = candidate.meta
    if isinstance(reference, Generator):
        ref, name = reference, str(reference.meta.get("source") or "generator")
    else:
        path = Path(reference)
        if not path.is_file():
            raise UserError(f"--reference: file not found: {path}")
        name = str(path)
        with torch.random.fork_rng(devices=[]):  # building the module draws init weights from the CPU RNG
            if path.suffix.lower() in TORCH_SUFFIXES:
                ref = open_runtime(path, device=device if device is not None else candidate.device,
                                   mode=cm["mode"], dropout=cm["dropout"], model=model,
                                   crop_size=int(cm["crop_size"]), direction=direction)
            else:
                ref = open_runtime(path, device=device)
    rm = ref.meta
    if rm["mode"] != cm["mode"] or (cm["mode"] == "paper" and bool(rm["dropout"]) != bool(cm["dropout"])):
        how = f"--mode {cm['mode']}" + (" --paper_dropout" if cm["mode"] == "paper" and cm["dropout"] else "")
        alike = ""
        if candidate.backend.startswith("torch"):  # a checkpoint under test can take the reference's mode instead
            flags = "--mode eval" if rm["mode"] == "eval" else (
                "--mode paper" if rm["dropout"] else "--mode paper --no_dropout_at_inference")
            alike = f"evaluate with {flags}, "
        raise UserError(f"--reference {name} runs in {_runs_as(rm)}, but the generator under test runs in "
                        f"{_runs_as(cm)}; they must run alike to be compared: {alike}give the reference's checkpoint "
                        f"(it opens in the generator's mode), or re-export it with `fastp2p export CKPT {how}`")
    for k in ("input_nc", "output_nc"):
        if rm[k] != cm[k]:
            raise UserError(f"--reference {name} has {k} {rm[k]}, the generator under test {cm[k]}; compare "
                            "generators of the same task")
    size = int(cm["crop_size"])
    if not rm["dynamic_hw"] and int(rm["crop_size"]) != size:
        raise UserError(f"--reference {name} takes {rm['crop_size']}x{rm['crop_size']} only, the generator under test "
                        f"runs at {size}x{size}; give the reference's checkpoint or re-export it with --dynamic")
    return ref, name


class _ReferenceOutputs:
    """``on_batch`` of the reference's pass: keeps its uint8 outputs in order (8-bit, as eval scores everything) and
    writes ``images/<name>_reference.png`` when ``folder`` is given."""

    def __init__(self, folder: Path | None):
        self.folder, self.outputs = folder, []

    def __call__(self, pairs, src, out, tgt) -> None:
        for p, o in zip(pairs, out, strict=True):
            self.outputs.append(o)
            if self.folder is not None:
                _png(o, self.folder / f"{p.name}_{REFERENCE_KIND}.png")


class _CompareToReference:
    """``on_batch`` of the candidate's pass: per-image L1 / PSNR / SSIM of its outputs against the reference's
    (``fastp2p.metrics`` on the 8-bit images), in order; then the gallery writer, if any."""

    def __init__(self, reference_outputs: list[np.ndarray], gallery=None):
        self.ref, self.gallery, self.rows = reference_outputs, gallery, []

    def __call__(self, pairs, src, out, tgt) -> None:
        i = len(self.rows)
        ref = np.stack(self.ref[i:i + len(pairs)])
        s = M.image_metrics(M.from_uint8(out), M.from_uint8(ref))
        self.rows += [{"psnr_ref": s["PSNR"][j], "ssim_ref": s["SSIM"][j], "l1_ref": s["L1"][j]}
                      for j in range(len(pairs))]
        if self.gallery is not None:
            self.gallery(pairs, src, out, tgt)


def evaluate(source, data, *, out: str | Path | None = None, direction: str | None = None, mode: str | None = None,
             dropout: bool | None = None, model=None, crop_size: int | None = None, batch_size: int = 1,
             seed: int = 0, device: str | None = None, fid_weights: str | Path | None = None,
             lpips_weights: str | Path | None = None, max_images: int | None = None, write: bool = True,
             quiet: bool = False, overwrite: bool = False, max_pixels: int | None = None,
             progress: bool = True, backend: str | None = None, reference=None) -> dict:
    """Evaluate a generator on a split and (``write``) write the report to ``out`` (default ``eval/<stem>``; checked
    first by ``check_report_folder``: never the data folder, files there replaced only if an earlier eval's, or
    with ``overwrite``). ``progress``: a bar on stderr (images, img/s, ETA) while the pairs are translated.

    source: a checkpoint (.safetensors / reference .pth described by ``model``), an exported .onnx / .plan, or an open
    ``fastp2p.engines.runtime.Generator``. mode / dropout: as ``translate`` (checkpoints: default paper mode with
    dropout; engines: baked in). Returns the ``metrics.json`` dict plus ``"per_image"`` (the CSV's rows):

        images: int, L1, PSNR, SSIM: float (means), FID, LPIPS: float | null,
        checkpoint | engine: str (the other null), backend, mode, dropout, direction, crop_size, seed, data (the
        folder used), max_images, skipped: {"FID"?: why, "LPIPS"?: why}, definitions: {metric: text},
        files: {"csv", "gallery", "images"}, time_s, versions

    reference: a second generator (checkpoint, export or ``Generator``; see ``open_reference``: it runs in the
    source's mode) translating the same inputs in a pass of its own, with the same ``seed``. The report then adds
    (and nothing else changes):

        reference: str, reference_backend, psnr_ref, ssim_ref, l1_ref (means of the output against the reference's
        output), psnr_ref_min (the worst image), reference_L1, reference_PSNR, reference_SSIM (the reference against
        the targets), definitions of these; per image (CSV, gallery, ``per_image``): psnr_ref, ssim_ref, l1_ref; the
        gallery gains a reference column (input | reference | output | target, ``images/<name>_reference.png``).
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
        ref_named = None if reference is None or isinstance(reference, Generator) else Path(reference)
        check_report_folder(Path(out) if out is not None else Path("eval") / named.stem, pairs, overwrite=overwrite,
                            inputs=[data, folder, folder / "A", folder / "B", named, fid_weights, lpips_weights,
                                    ref_named],
                            kinds=GALLERY_KINDS if reference is None else (*GALLERY_KINDS, REFERENCE_KIND))
    dev = torch.device(device or "cpu")
    fid = InceptionFeatures(fid_weights, dev) if fid_weights else None
    lpips = LpipsDistance(lpips_weights, dev) if lpips_weights else None
    if isinstance(source, Generator):
        rt, path = source, Path(str(source.meta.get("source") or "generator"))
    else:
        path = Path(source)
        with torch.random.fork_rng(devices=[]):  # building the module draws init weights from the CPU RNG
            rt = open_runtime(path, device=device, mode=mode, dropout=dropout, model=model, crop_size=crop_size,
                              direction=direction, backend=backend)
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
    on_batch, ref_result = gallery, {}
    if reference is not None:
        ref, ref_name = open_reference(reference, rt, direction=direction, device=device, model=model)
        if meta["mode"] == "paper" and meta["dropout"]:
            log.warning("--reference: paper-mode dropout is on: the generator and the reference draw dropout masks of "
                        "their own (the same ones only for one architecture on torch), so psnr_ref includes that "
                        "noise; --no_dropout_at_inference or --mode eval compare deterministically")
        kept = _ReferenceOutputs(gallery.dir if gallery is not None else None)
        ref_rows, _ = run_pairs(ref, pairs, direction=direction, size=meta["crop_size"], in_nc=meta["input_nc"],
                                out_nc=meta["output_nc"], device=ref.device, batch_size=batch_size, seed=seed,
                                on_batch=kept, progress=progress)
        on_batch = _CompareToReference(kept.outputs, gallery)
        ref_means = summarize(ref_rows)
        ref_result = {"reference": ref_name, "reference_backend": ref.backend,
                      **{f"reference_{k}": ref_means[k] for k in ("L1", "PSNR", "SSIM")}}
    rows, extra = run_pairs(rt, pairs, direction=direction, size=meta["crop_size"], in_nc=meta["input_nc"],
                            out_nc=meta["output_nc"], device=rt.device, batch_size=batch_size, seed=seed, fid=fid,
                            lpips=lpips, on_batch=on_batch, progress=progress)
    if reference is not None:
        for r, c in zip(rows, on_batch.rows, strict=True):
            r.update(c)
        ref_result.update({k: float(np.mean([r[k] for r in rows])) for k in REF_KEYS})
        ref_result["psnr_ref_min"] = float(min(r["psnr_ref"] for r in rows))
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
    if reference is not None:
        result.update(ref_result)
        result["definitions"] = {**DEFINITIONS, **REF_DEFINITIONS}
    if "FID_note" in extra:
        result["skipped"]["FID"] = extra["FID_note"]
    if write:
        write_report(out, result, rows)
        result["out"] = str(out)
    result["per_image"] = rows
    return result


