"""The quality gate of every lossy step (INT8 export, distillation): score a generator against a reference generator
(the fp32 teacher) on a validation split, print one line, refuse results below a bar.

    from fastp2p.gate import quality_gate, default_gate_data
    data = default_gate_data("teacher.safetensors")               # <training data>/val, or None
    r = quality_gate("G.int8.onnx", "teacher.safetensors", data, min_psnr=35.0, what="INT8 export")
    r["psnr_ref"], r["passed"]                                     # JSON values: record them in the artifact

Scores (``score_against_reference``; ``fastp2p eval --reference`` computes the same, on the same code):

- ``psnr_ref``, ``ssim_ref``, ``l1_ref``: the candidate's outputs against the reference's outputs on the same inputs;
- ``l1``, ``psnr``, ``ssim``: the candidate against the real targets; ``reference_l1/psnr/ssim``: the reference
  against the targets (what the lossy step costs in the metric a paper reports).

Everything is ``fastp2p.eval``'s: the same pairs (``fastp2p.scoring.folder_pairs``: a folder of A|B pairs, A/ + B/,
or a dataset root's val/), the same preprocessing (bicubic resize to the candidate's ``crop_size``), metrics on the
8-bit images scaled to [0, 1] (``fastp2p.metrics``), means over images. PSNR is capped at ``metrics.PSNR_MAX``
(100 dB), so a generator against itself scores exactly 100 dB, not inf, and the JSON stays valid; 8-bit rounding of
both outputs puts a floor of its own near 50-60 dB under any comparison, far above the bars used here.

The reference runs as the candidate does: a checkpoint reference is opened in the candidate's ``mode`` and paper-mode
dropout (``candidate.meta``), an exported reference must match (else a one-line ``UserError``). A checkpoint
*candidate* given as a path is opened deterministically (paper mode, dropout off) unless ``mode`` / ``dropout`` say
otherwise: with dropout on, two generators draw different masks and psnr_ref measures the noise, not the step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .errors import UserError
from .evaluate import _fmt, evaluate

_log = logging.getLogger("fastp2p.gate")

# --min_psnr defaults (dB, psnr_ref against the fp32 teacher on facades val; README states them):
# int8: the issue's bar; the calibrated facades teacher (1600 steps) scores 44.2 dB (eval mode, worst image 43.2) and
# 42.9 dB in paper mode (step 1000), so 35 dB refuses only a broken calibration. student: a distilled ngf-16 student
# scored 22.3 dB against its teacher after the teacher's budget (1600 steps, eval mode) and 19.4 dB after 200 steps
# (paper mode), a pix2pix-only ngf-16 student 15.8 dB at 200 steps: 18 dB passes a distillation that worked and
# refuses one that did not move the student toward its teacher.
DEFAULT_MIN_PSNR: dict[str, float | None] = {"int8": 35.0, "student": 18.0}
# where each default comes from (the --min_psnr help line says it)
MEASURED = {"int8": "a facades teacher's INT8 export: 44.2 dB", "student": "a facades ngf-16 student: 22.3 dB"}


def _is_checkpoint_path(x) -> bool:
    from .engines.runtime import TORCH_SUFFIXES, Generator

    return not isinstance(x, Generator) and Path(x).suffix.lower() in TORCH_SUFFIXES


def score_against_reference(candidate, reference, data, *, max_images: int | None = None,
                            direction: str | None = None, batch_size: int = 1, seed: int = 0,
                            progress: bool = False, mode: str | None = None, dropout: bool | None = None,
                            device: str | None = None, backend: str | None = None,
                            max_pixels: int | None = None) -> dict:
    """Score ``candidate`` against ``reference`` (each a checkpoint .safetensors / .pth, an .onnx, a .plan, or an
    ``engines.runtime.Generator``) on the pairs of ``data``: one pass per generator over the same inputs, ``seed``
    for paper-mode dropout in both. ``mode`` / ``dropout``: how a checkpoint candidate path is opened (default paper
    mode, dropout off); ``backend``: what runs an .onnx candidate. Returns JSON values:

        psnr_ref, ssim_ref, l1_ref, psnr_ref_min (candidate vs reference outputs), l1, psnr, ssim (candidate vs
        targets), reference_l1, reference_psnr, reference_ssim (reference vs targets), images: int, data: str (the
        folder used), mode, dropout, direction, crop_size, reference: str, candidate: str, backend,
        reference_backend
    """
    if dropout is None and _is_checkpoint_path(candidate):
        dropout = False  # deterministic: see the module doc
    r = evaluate(candidate, data, direction=direction, mode=mode, dropout=dropout, batch_size=batch_size, seed=seed,
                 device=device, max_images=max_images, write=False, quiet=True, max_pixels=max_pixels,
                 progress=progress, backend=backend, reference=reference)
    return scores_from_eval(r)


def scores_from_eval(r: dict) -> dict:
    """The gate's scores (``score_against_reference``'s dict) from the result of ``evaluate(..., reference=...)``."""
    return {
        "psnr_ref": r["psnr_ref"], "ssim_ref": r["ssim_ref"], "l1_ref": r["l1_ref"], "psnr_ref_min": r["psnr_ref_min"],
        "l1": r["L1"], "psnr": r["PSNR"], "ssim": r["SSIM"],
        "reference_l1": r["reference_L1"], "reference_psnr": r["reference_PSNR"],
        "reference_ssim": r["reference_SSIM"],
        "images": r["images"], "data": r["data"], "mode": r["mode"], "dropout": r["dropout"],
        "direction": r["direction"], "crop_size": r["crop_size"], "reference": r["reference"],
        "candidate": r["checkpoint"] or r["engine"], "backend": r["backend"],
        "reference_backend": r["reference_backend"],
    }


def gate_line(what: str, s: dict, min_psnr: float | None) -> str:
    """The one table line of a gate: scores against the reference, then against the targets for both."""
    bar = "no bar" if min_psnr is None else (f"min {min_psnr:.2f} dB: "
                                             + ("passed" if s["psnr_ref"] >= min_psnr else "BELOW"))
    return (f"gate {what}: {s['images']} image(s)  vs reference: PSNR {_fmt('PSNR', s['psnr_ref'])} dB "
            f"(worst {_fmt('PSNR', s['psnr_ref_min'])})  SSIM {_fmt('SSIM', s['ssim_ref'])}  |  vs targets: "
            f"L1 {_fmt('L1', s['l1'])}  PSNR {_fmt('PSNR', s['psnr'])}  SSIM {_fmt('SSIM', s['ssim'])}  "
            f"(reference L1 {_fmt('L1', s['reference_l1'])}  PSNR {_fmt('PSNR', s['reference_psnr'])}  "
            f"SSIM {_fmt('SSIM', s['reference_ssim'])})  |  {bar}")


def check_min_psnr(min_psnr: float | None) -> float | None:
    if min_psnr is not None and not (isinstance(min_psnr, (int, float)) and math.isfinite(min_psnr)):
        raise UserError(f"--min_psnr {min_psnr!r}: give a finite number of dB")
    return None if min_psnr is None else float(min_psnr)


def enforce(scores: dict, *, min_psnr: float | None, force: bool = False, what: str = "INT8 export") -> dict:
    """``scores`` plus {"min_psnr", "passed"}. Below the bar: a ``UserError`` (one line naming --min_psnr, --force
    and the measured value), or with ``force`` one warning line and ``passed`` False. ``min_psnr`` None: no bar,
    passed True."""
    min_psnr = check_min_psnr(min_psnr)
    passed = min_psnr is None or scores["psnr_ref"] >= min_psnr
    result = {**scores, "min_psnr": min_psnr, "passed": bool(passed)}
    if passed:
        return result
    got = (f"{what}: PSNR {scores['psnr_ref']:.2f} dB against the reference {scores['reference']} on "
           f"{scores['images']} image(s) of {scores['data']} is below --min_psnr {min_psnr:g}")
    if not force:
        raise UserError(f"{got}; lower --min_psnr or pass --force to keep the result anyway")
    _log.warning("%s; kept anyway (--force)", got)
    return result


def quality_gate(candidate, reference, data, *, min_psnr: float | None, force: bool = False,
                 what: str = "INT8 export", max_images: int | None = None, direction: str | None = None, log=print,
                 **score_kw) -> dict:
    """``score_against_reference`` (``score_kw``: its other keywords), one table line through ``log``, then
    ``enforce``: returns the scores plus {"min_psnr", "passed"}, or raises ``UserError`` below ``min_psnr`` unless
    ``force``."""
    check_min_psnr(min_psnr)  # before the work
    s = score_against_reference(candidate, reference, data, max_images=max_images, direction=direction, **score_kw)
    log(gate_line(what, s, min_psnr))
    return enforce(s, min_psnr=min_psnr, force=force, what=what)


def default_gate_data(ckpt_meta_or_cfg) -> Path | None:
    """The validation split beside the training data a checkpoint records, the default of ``--gate_data``.

    Takes a ``Config``, a config dict (``Config.to_dict()``), a checkpoint's metadata (``{"config": ...}``), a
    checkpoint path (its metadata is read) or a torch ``Generator`` opened from one. With training data ``D``
    (relative paths resolve against the current folder, as training read them): ``D/val`` (else ``D/test``); ``D``
    itself when it is named like a split (val, test); the sibling ``val`` (else ``test``) when ``D`` is the training
    split (``.../train``, or the config's ``phase``). None when the checkpoint records no data (synthetic training)
    or none of these folders exists."""
    from .config import Config
    from .engines.runtime import TORCH_SUFFIXES, Generator
    from .scoring import SPLITS

    src = ckpt_meta_or_cfg
    if isinstance(src, Generator):
        src = src.meta.get("source") or ""
        if Path(src).suffix.lower() not in TORCH_SUFFIXES:
            return None
    if isinstance(src, (str, Path)):
        from .checkpoint import read_meta, read_reference_sidecar

        path = Path(src)
        if path.suffix.lower() in (".pth", ".pt"):
            side = read_reference_sidecar(path)
            if not side:
                return None
            src = side
        else:
            src = read_meta(path)
    if isinstance(src, Config):
        data, phase = src.data.data, src.data.phase
    elif isinstance(src, dict):
        cfg = src.get("config", src)
        d = cfg.get("data") if isinstance(cfg, dict) else None
        data, phase = (d.get("data"), d.get("phase", "train")) if isinstance(d, dict) else (None, "train")
    else:
        raise TypeError(f"default_gate_data: expected a Config, a checkpoint's metadata or a path, got {type(src)}")
    if not data:
        return None
    root = Path(data).expanduser()
    cands = [root / s for s in SPLITS]
    if root.name in SPLITS:
        cands.insert(0, root)
    if root.name in {"train", phase}:
        cands += [root.parent / s for s in SPLITS]
    return next((c for c in cands if c.is_dir()), None)
