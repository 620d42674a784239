"""Argument builders and checks every subcommand shares: whole-number and bounded-float types, seeds, the
architecture flags of a reference .pth, --max_pixels, --overwrite, and the checks of a --checkpoint / --engine given
on the command line. The one public place for them: subcommand modules import from here, nothing below the CLI does."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import ModelConfig
from ..errors import UserError

PREPROCESS = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")


def _whole(v: str, lo: int) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
    return n


def positive(v: str) -> int:
    return _whole(v, 1)


def non_negative(v: str) -> int:
    return _whole(v, 0)


def seed_int(v: str) -> int:
    """A seed torch.manual_seed takes: a whole number in [-2**63, 2**64)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if not -(2**63) <= n < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64) (a 64-bit seed), got {n}")
    return n


def bounded_float(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = True):
    """An argparse type: a finite float in [lo, hi) (``lo_open``: (lo, ...); no ``hi``: unbounded)."""
    import math

    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
        ok = math.isfinite(x) and (x > lo if lo_open else x >= lo)
        if ok and hi is not None:
            ok = x < hi if hi_open else x <= hi
        if not ok:
            rng = f"{'>' if lo_open else '>='} {lo:g}" if hi is None else \
                f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {v}")
        return x
    parse.__name__ = "number"  # argparse names the type in "invalid <name> value" messages
    return parse


def max_pixels_type(v: str) -> int:
    return positive(v.replace("_", "").replace(",", ""))  # 89_478_485 and 89,478,485 as the help prints it


def add_max_pixels(p: argparse.ArgumentParser, default: int | None = None) -> None:
    from ..config import DEFAULT_MAX_PIXELS

    p.add_argument("--max_pixels", type=max_pixels_type, default=default,
                   help=f"refuse images (and video frames) larger than this many pixels, checked on the header "
                        f"before decoding (default {DEFAULT_MAX_PIXELS:,}: PIL's own limit, e.g. 9459x9459)")


def check_crop_size(crop_size: int | None, max_pixels: int | None = None, flag: str = "--crop_size") -> None:
    """A model input of crop_size x crop_size pixels must fit under --max_pixels (a 131072 crop is 51 GB a batch)."""
    from ..config import DEFAULT_MAX_PIXELS

    limit = max_pixels or DEFAULT_MAX_PIXELS
    if crop_size is not None and crop_size * crop_size > limit:
        raise UserError(f"{flag} {crop_size}: {crop_size}x{crop_size} is more than --max_pixels {limit:,} pixels; "
                        "use a smaller size (or raise --max_pixels where the command has it)")


def check_arch_flags(args, src, flag: str = "--checkpoint") -> None:
    """The architecture flags (--netG/--norm/--ngf/--no_dropout) describe a reference .pth; a fastp2p checkpoint or
    an export carries its own. Given with one of those and contradicting it, they would be ignored: refuse them."""
    given = {k: getattr(args, k, None) for k in ("netG", "norm", "ngf", "no_dropout")}
    given = {k: v for k, v in given.items() if v is not None}
    if not given or src is None:
        return
    path = Path(src)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix in (".pth", ".pt"):
        return  # a missing file is reported by the loader; a .pth needs these flags
    try:
        if suffix == ".safetensors":
            from ..checkpoint import read_meta

            model = dict((read_meta(path).get("config") or {}).get("model") or {})
        elif suffix == ".onnx":
            from ..engines.onnx import read_onnx_meta

            arch = read_onnx_meta(path).get("arch") or {}
            model = {"netG": arch.get("netG"), "norm": arch.get("norm"), "ngf": arch.get("ngf"),
                     "no_dropout": None if "use_dropout" not in arch else not arch["use_dropout"]}
        else:
            return
    except UserError:
        return  # unreadable: the loader says so, naming the file
    for k, v in given.items():
        have = model.get(k)
        if k == "norm" and have == "sync_batch":  # trained with sync_batch: batch norm's modules and keys
            have = "batch"
        if have is not None and have != v:
            shown = "--no_dropout" if k == "no_dropout" else f"--{k} {v}"
            has = ("without dropout" if have else "with dropout") if k == "no_dropout" else f"--{k} {have}"
            raise UserError(f"{shown}: {path} is a {has} generator (its own metadata decides); leave {shown} out "
                            f"(the architecture flags describe a reference .pth)")


def check_source_flags(args) -> None:
    """--checkpoint / --engine: an existing file of the kind the flag takes (before anything is loaded)."""
    from ..engines.runtime import ONNX_SUFFIXES, OPENVINO_SUFFIXES, TORCH_SUFFIXES, TRT_SUFFIXES

    for flag, value, kinds, other in (("--checkpoint", getattr(args, "checkpoint", None), TORCH_SUFFIXES, "--engine"),
                                      ("--engine", getattr(args, "engine", None),
                                       TORCH_SUFFIXES + ONNX_SUFFIXES + OPENVINO_SUFFIXES + TRT_SUFFIXES, None)):
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            raise UserError(f"{flag} {path}: is a folder; give the file")
        if path.suffix.lower() not in kinds:  # the wrong flag for this kind of file, whether it exists or not
            hint = (f"; pass exported .onnx / .xml / .plan files with {other}" if other and path.suffix.lower() in
                    ONNX_SUFFIXES + OPENVINO_SUFFIXES + TRT_SUFFIXES else "")
            raise UserError(f"{flag} {path}: expected a {' / '.join(kinds)} file{hint}")
        if not path.is_file():
            raise UserError(f"{flag} not found: {path}")


def add_overwrite(p: argparse.ArgumentParser, ours: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace existing files at the output paths; without it only {ours} are replaced "
                        "(inputs never are)")


def preset_default(name: str, unit: str = "") -> str:
    """'default <value> [unit]' of a config field in the default preset, plus each preset that sets another value
    ('; --preset debug: 128'): help text made from fastp2p.config, so it cannot drift from the code."""
    from ..config import PRESETS

    def value(cfg):
        sec = next(s for s in (cfg.model, cfg.data, cfg.train) if hasattr(s, name))
        v = getattr(sec, name)
        return f"{v:g}" if isinstance(v, float) else str(v)

    base = value(PRESETS["default"])
    others = [f"--preset {n}: {value(c)}" for n, c in PRESETS.items() if n != "default" and value(c) != base]
    return f"default {base}{' ' + unit if unit else ''}" + (f"; {', '.join(others)}" if others else "")


def add_arch(p: argparse.ArgumentParser, *, train: bool = False) -> None:
    """--netG/--norm/--ngf/--no_dropout. ``train``: the network to build (defaults from --preset; --norm sync_batch,
    which only a torchrun training run uses); otherwise they describe a reference .pth (a fastp2p checkpoint or an
    export carries its own, see check_arch_flags), and sync_batch is not offered: it builds the same batch-norm
    modules and keys as batch, so a checkpoint trained with it loads without any flag."""
    base = ModelConfig()

    def dflt(name: str) -> str:
        return preset_default(name) if train else f"default: the checkpoint's, {getattr(base, name)} for a .pth"

    p.add_argument("--netG", choices=("unet_256", "unet_128"), default=None,
                   help=f"generator: 8-level (unet_256) or 7-level (unet_128) U-Net ({dflt('netG')})")
    norms = ("batch", "instance", "none") + (("sync_batch",) if train else ())
    p.add_argument("--norm", choices=norms, default=None,
                   help=f"normalization ({dflt('norm')})" + ("; sync_batch: batch norm over all ranks' images "
                                                             "(torchrun, CUDA)" if train else ""))
    p.add_argument("--no_dropout", action="store_true", default=None,
                   help=("architecture: build and train G without dropout layers (without it: the paper's dropout)"
                         if train else "architecture: a generator without dropout layers (default: the checkpoint's, "
                         "with dropout for a .pth)") + "; not --no_dropout_at_inference, which runs a dropout "
                        "generator's paper mode with dropout switched off")
    p.add_argument("--ngf", type=positive, default=None,
                   help=f"generator filters in the first conv ({dflt('ngf')})")


def arch_from(args) -> ModelConfig:
    base = ModelConfig()
    return ModelConfig(netG=args.netG or base.netG, norm=args.norm or base.norm, no_dropout=bool(args.no_dropout),
                       ngf=args.ngf or base.ngf)




def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """--crop_size, --no_dropout_at_inference, --device: how translate and eval run a checkpoint."""
    p.add_argument("--crop_size", type=positive, default=None,
                   help="model input size in pixels (default: the checkpoint's)")
    p.add_argument("--no_dropout_at_inference", action="store_true",
                   help="paper mode with the generator's dropout switched off (deterministic); without it paper "
                        "mode draws the paper's dropout, seeded by --seed. Not --no_dropout, which describes a .pth "
                        "generator built without dropout layers")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu (cuda for a TensorRT plan)")


def add_gate_flags(p: argparse.ArgumentParser, what: str, default_min_psnr: float | None, measured: str) -> None:
    """The quality gate of a lossy step (``fastp2p.gate``): ``--gate_data``, ``--gate_images``, ``--min_psnr``,
    ``--force``, ``--no_gate``. ``measured``: where the default bar comes from, for the help line."""
    p.add_argument("--gate_data", default=None, metavar="DIR",
                   help=f"validation pairs the {what} is scored on against the fp32 teacher (default: the val split "
                        "beside the teacher's training data; no gate when there is none)")
    p.add_argument("--gate_images", type=positive, default=None,
                   help="score at most this many images of --gate_data (default: all)")
    bar = "none: scores printed and recorded only" if default_min_psnr is None else f"{default_min_psnr:g} dB"
    p.add_argument("--min_psnr", type=float, default=default_min_psnr,
                   help=f"lowest PSNR in dB of the {what}'s outputs against the teacher's outputs, mean over "
                        f"--gate_data; below it: exit 2 (default {bar}; {measured})")
    p.add_argument("--force", action="store_true",
                   help="keep a result below --min_psnr (one warning line, exit 0); without it: exit 2")
    p.add_argument("--no_gate", action="store_true", help="skip the quality gate (default: gate when data exists)")


def gate_data_from(args, teacher) -> Path | None:
    """The folder the quality gate scores on: ``--gate_data``, else the val split beside ``teacher``'s training
    data (``fastp2p.gate.default_gate_data``); None: no gate (``--no_gate``, or no such split: one warning line).
    Called before the lossy step, so a bad --gate_data or --min_psnr fails before the work."""
    from .. import gate

    gate.check_min_psnr(args.min_psnr)
    if args.no_gate:
        return None
    if args.gate_data is not None:
        from ..scoring import resolve_split

        return resolve_split(args.gate_data, "--gate_data")
    found = gate.default_gate_data(teacher)
    if found is None:
        logging.getLogger("fastp2p").warning("no quality gate: %s records no training data with a val split beside "
                                             "it; pass --gate_data DIR (or --no_gate)", teacher)
    return found
