"""``fastp2p`` command line: one parser, subcommands; flags become ``dataclasses.replace`` on a preset."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ModelConfig, override, preset
from .errors import UserError

PREPROCESS = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")


def _whole(v: str, lo: int) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
    return n


def _positive(v: str) -> int:
    return _whole(v, 1)


def _non_negative(v: str) -> int:
    return _whole(v, 0)


def _seed(v: str) -> int:
    """A seed torch.manual_seed takes: a whole number in [-2**63, 2**64)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if not -(2**63) <= n < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64) (a 64-bit seed), got {n}")
    return n


def _number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = True):
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


def _max_pixels(v: str) -> int:
    return _positive(v.replace("_", "").replace(",", ""))  # 89_478_485 and 89,478,485 as the help prints it


def _add_max_pixels(p: argparse.ArgumentParser, default: int | None = None) -> None:
    from .config import DEFAULT_MAX_PIXELS

    p.add_argument("--max_pixels", type=_max_pixels, default=default,
                   help=f"refuse images (and video frames) larger than this many pixels, checked on the header "
                        f"before decoding (default {DEFAULT_MAX_PIXELS:,}: PIL's own limit, e.g. 9459x9459)")


def check_crop_size(crop_size: int | None, max_pixels: int | None = None, flag: str = "--crop_size") -> None:
    """A model input of crop_size x crop_size pixels must fit under --max_pixels (a 131072 crop is 51 GB a batch)."""
    from .config import DEFAULT_MAX_PIXELS

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
            from .checkpoint import read_meta

            model = dict((read_meta(path).get("config") or {}).get("model") or {})
        elif suffix == ".onnx":
            from .engines.onnx import read_onnx_meta

            arch = read_onnx_meta(path).get("arch") or {}
            model = {"netG": arch.get("netG"), "norm": arch.get("norm"), "ngf": arch.get("ngf"),
                     "no_dropout": None if "use_dropout" not in arch else not arch["use_dropout"]}
        else:
            return
    except UserError:
        return  # unreadable: the loader says so, naming the file
    for k, v in given.items():
        have = model.get(k)
        if have is not None and have != v:
            shown = "--no_dropout" if k == "no_dropout" else f"--{k} {v}"
            has = ("without dropout" if have else "with dropout") if k == "no_dropout" else f"--{k} {have}"
            raise UserError(f"{shown}: {path} is a {has} generator (its own metadata decides); leave {shown} out "
                            f"(the architecture flags describe a reference .pth)")


def check_source_flags(args) -> None:
    """--checkpoint / --engine: an existing file of the kind the flag takes (before anything is loaded)."""
    from .engines.runtime import ONNX_SUFFIXES, TORCH_SUFFIXES, TRT_SUFFIXES

    for flag, value, kinds, other in (("--checkpoint", getattr(args, "checkpoint", None), TORCH_SUFFIXES, "--engine"),
                                      ("--engine", getattr(args, "engine", None),
                                       TORCH_SUFFIXES + ONNX_SUFFIXES + TRT_SUFFIXES, None)):
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            raise UserError(f"{flag} {path}: is a folder; give the file")
        if not path.is_file():
            raise UserError(f"{flag} not found: {path}")
        if path.suffix.lower() not in kinds:
            hint = (f"; pass exported .onnx / .plan files with {other}" if other and path.suffix.lower() in
                    ONNX_SUFFIXES + TRT_SUFFIXES else "")
            raise UserError(f"{flag} {path}: expected a {' / '.join(kinds)} file{hint}")


def _add_overwrite(p: argparse.ArgumentParser, ours: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace existing files at the output paths; without it only {ours} are replaced "
                        "(inputs never are)")


def _add_arch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netG", choices=("unet_256", "unet_128"), default=None, help="generator (default unet_256)")
    p.add_argument("--norm", choices=("batch", "instance", "none", "sync_batch"), default=None,
                   help="normalization (default batch); sync_batch: batch norm over all ranks' images (torchrun, CUDA)")
    p.add_argument("--no_dropout", action="store_true", default=None, help="generator without dropout")
    p.add_argument("--ngf", type=_positive, default=None, help="generator filters in the first conv (default 64)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train pix2pix", description="Train pix2pix (the paper's recipe by default).")
    p.add_argument("--preset", default="default", help="named defaults that flags override: default, facades, debug")
    p.add_argument("--data", default=None, help="dataset folder (pix2pix layout); omitted: built-in synthetic pairs")
    p.add_argument("--out", default=None, help="output root (default runs)")
    p.add_argument("--name", default=None, help="run name; the run folder is <out>/<name>")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (bf16 where native, else fp16)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the step functions")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on with CUDA, off on CPU where it measured slower)")
    p.add_argument("--kernels", choices=("triton", "torch"), default=None,
                   help="fused Triton norm+activation kernels or PyTorch's (default: triton with CUDA, else torch)")
    p.add_argument("--max_steps", type=_positive, default=None, help="stop after N iterations")
    p.add_argument("--resume", action="store_true", default=None, help="continue <out>/<name> from its checkpoint")
    _add_arch(p)
    p.add_argument("--netD", choices=("basic", "n_layers", "pixel"), default=None)
    p.add_argument("--n_layers_D", type=_positive, default=None)
    p.add_argument("--ndf", type=_positive, default=None)
    p.add_argument("--input_nc", type=int, choices=(1, 3), default=None)
    p.add_argument("--output_nc", type=int, choices=(1, 3), default=None)
    p.add_argument("--lambda_L1", type=_number(0.0), default=None, help="weight of the L1 term (>= 0; default 100)")
    p.add_argument("--gan_mode", choices=("vanilla", "lsgan"), default=None)
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None)
    p.add_argument("--load_size", type=_positive, default=None)
    p.add_argument("--crop_size", type=_positive, default=None)
    p.add_argument("--preprocess", choices=PREPROCESS, default=None)
    p.add_argument("--no_flip", action="store_true", default=None)
    p.add_argument("--skip_bad", action="store_true", default=None, help="skip unreadable images, count them")
    _add_max_pixels(p)
    p.add_argument("--num_workers", type=_non_negative, default=None,
                   help="data loader worker processes (0: load in the main process)")
    p.add_argument("--loader", choices=("dali", "torch", "gpu-cache"), default=None,
                   help="data loader: dali (NVIDIA DALI; --num_workers threads), torch (worker processes), gpu-cache "
                        "(dataset decoded once into device memory); default: dali on CUDA when installed, else torch")
    p.add_argument("--batch_size", type=_positive, default=None)
    p.add_argument("--lr", type=_number(0.0, lo_open=True), default=None, help="Adam learning rate (> 0; default 2e-4)")
    p.add_argument("--beta1", type=_number(0.0, 1.0), default=None, help="Adam beta1 in [0, 1) (default 0.5)")
    p.add_argument("--lr_policy", choices=("linear", "step", "cosine"), default=None)
    p.add_argument("--n_epochs", type=_non_negative, default=None,
                   help="epochs at the initial lr (with --n_epochs_decay at least 1 epoch in all)")
    p.add_argument("--n_epochs_decay", type=_non_negative, default=None, help="epochs of linear decay to zero")
    p.add_argument("--lr_decay_iters", type=_positive, default=None, help="epochs per x0.1 with --lr_policy step")
    p.add_argument("--seed", type=_seed, default=None)
    p.add_argument("--log_every", type=_positive, default=None)
    p.add_argument("--sample_every", type=_positive, default=None)
    p.add_argument("--save_every", type=_positive, default=None)
    p.add_argument("--eval_every", type=_positive, default=None,
                   help="score G on the validation split every N steps (and at the end) into metrics.jsonl")
    p.add_argument("--eval_data", default=None,
                   help="validation split for --eval_every (default: the val/ split beside --data)")
    p.add_argument("--eval_max_images", type=_positive, default=None, help="pairs per evaluation (default 50)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=_positive, default=None,
                   help="data-parallel processes on this machine (one per GPU, at most one per CPU core without "
                        "CUDA): runs torchrun for you")
    p.add_argument("--scale_lr", action="store_true", default=None,
                   help="multiply --lr by the number of processes (default: the paper's lr at any world size)")
    p.add_argument("--dist_timeout", type=_number(0.0, lo_open=True), default=None,
                   help="seconds a multi-process job waits on a silent rank before failing (default 600)")
    p.set_defaults(func=cmd_train)


def _check_run_folder(cfg) -> None:
    """``--out`` / ``<out>/<name>``: folders that can be made and written, before any training (fit refuses an
    existing run without --resume itself)."""
    from . import outputs

    out = Path(cfg.train.out)
    outputs.output_dir(out, "--out")
    run_dir = out / cfg.train.name
    outputs.output_dir(run_dir, "--name", inputs=[cfg.data.data])  # the run folder is never the dataset
    for sub in ("checkpoints", "samples"):
        outputs.output_dir(run_dir / sub, "--name")


def _check_train_config(cfg) -> None:
    """What the flag types cannot see alone (several flags together, the preset's values), before anything is built."""
    from .models.unet import NUM_DOWNS, size_problem

    t, d, m = cfg.train, cfg.data, cfg.model
    if t.n_epochs < 0 or t.n_epochs_decay < 0 or t.n_epochs + t.n_epochs_decay < 1:
        raise UserError(f"--n_epochs {t.n_epochs} --n_epochs_decay {t.n_epochs_decay}: the lr schedule needs at least "
                        "one epoch in all (--max_steps N stops a run earlier)")
    if t.lr_policy == "cosine" and t.n_epochs < 1:
        raise UserError("--n_epochs 0: --lr_policy cosine anneals over --n_epochs; give --n_epochs >= 1")
    if not (t.lr > 0 and 0 <= t.beta1 < 1 and t.lambda_L1 >= 0):  # a preset's values (flags are checked on parsing)
        raise UserError(f"--lr {t.lr} --beta1 {t.beta1} --lambda_L1 {t.lambda_L1}: need lr > 0, 0 <= beta1 < 1, "
                        "lambda_L1 >= 0")
    depth = NUM_DOWNS.get(m.netG)
    if depth is not None:
        # The U-Net's input is the crop (crop modes) or load_size wide (scale_width); --preprocess none keeps each
        # image's own size, which only the data can tell.
        flag, size = (("--crop_size", d.crop_size) if "crop" in d.preprocess else
                      ("--load_size", d.load_size) if d.preprocess == "scale_width" else (None, None))
        why = size_problem(size, depth, flag) if flag else None
        if why:
            raise UserError(why)
    check_crop_size(d.crop_size, d.max_pixels)
    if "resize" in d.preprocess or "scale_width" in d.preprocess:  # every image is resized to load_size first
        check_crop_size(d.load_size, d.max_pixels, "--load_size")
    if m.netD in ("basic", "n_layers") and "crop" in d.preprocess:
        from .models.patchgan import n_layers_problem

        why = n_layers_problem(d.crop_size, 3 if m.netD == "basic" else m.n_layers_D)
        if why:
            raise UserError(why if m.netD == "n_layers" else why.replace("--n_layers_D 3", "--netD basic (3 levels)"))
    _check_model_fits(cfg)
    if d.loader == "dali":
        from .data.backends import require_dali

        require_dali()


def _check_model_fits(cfg) -> None:
    """--ngf / --ndf: G and D (built on the meta device: no memory) must fit, with their gradients and Adam's two
    moments (16 bytes a parameter in fp32), in this machine's memory (the GPU's with --device cuda)."""
    import os

    import torch

    from .models import build_discriminator, build_generator

    m = cfg.model
    with torch.device("meta"):
        n = sum(p.numel() for p in build_generator(m.netG, m.input_nc, m.output_nc, m.ngf, m.norm, not m.no_dropout,
                                                   init=False).parameters())
        n += sum(p.numel() for p in build_discriminator(m.netD, m.input_nc + m.output_nc, m.ndf, m.n_layers_D,
                                                        m.norm, init=False).parameters())
    need = 16 * n
    try:
        if cfg.train.device == "cuda" and torch.cuda.is_available():
            have, where = torch.cuda.get_device_properties(0).total_memory, "the GPU's"
        else:
            have, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's"
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): nothing to compare with
        return
    if need > have:
        raise UserError(f"--ngf {m.ngf} --ndf {m.ndf}: G and D would have {n:,} parameters, {need / 2**30:,.0f} GiB "
                        f"with gradients and Adam state, more than {where} {have / 2**30:,.0f} GiB; use smaller "
                        "--ngf / --ndf (default 64)")


def _check_nproc(nproc: int, device: str) -> None:
    """--nproc N starts N processes: each needs its own GPU (cuda:LOCAL_RANK), or on a CPU at least one core."""
    import os

    import torch

    if device == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > have:
            raise UserError(f"--nproc {nproc}: each process trains on its own GPU and this machine has {have}; use "
                            f"--nproc {have} or fewer" if have else f"--nproc {nproc} --device cuda: no CUDA device "
                            "is available here")
    elif nproc > (os.cpu_count() or 1):
        raise UserError(f"--nproc {nproc}: more processes than this machine's {os.cpu_count()} CPU cores; use "
                        f"--nproc {os.cpu_count()} or fewer")


def cmd_train(args) -> int:
    from .train import fit

    base = preset(args.preset)
    fields = {k: v for k, v in vars(args).items()
              if k not in ("preset", "func", "command", "no_progress", "verbose", "nproc", "argv")}
    if fields.get("data") is not None and not Path(fields["data"]).exists():
        raise UserError(f"--data: no such folder: {fields['data']}")
    cfg = override(base, **fields)
    if cfg.data.crop_size > cfg.data.load_size and "crop" in cfg.data.preprocess:
        raise UserError(f"--crop_size {cfg.data.crop_size} is larger than --load_size {cfg.data.load_size}")
    if args.n_layers_D is not None and cfg.model.netD != "n_layers" and args.n_layers_D != 3:
        raise UserError(f"--n_layers_D {args.n_layers_D}: only used with --netD n_layers (--netD {cfg.model.netD} is "
                        f"{'3 levels' if cfg.model.netD == 'basic' else '1x1 convolutions'}); add --netD n_layers")
    _check_train_config(cfg)
    _check_run_folder(cfg)
    if args.nproc is not None and args.nproc > 1:  # after the checks above: a bad flag is reported once, not N times
        _check_nproc(args.nproc, cfg.train.device)
        from .distributed import launch

        return launch(args.argv, args.nproc)
    try:
        summary = fit(cfg, progress=not args.no_progress)
    except Exception as e:
        from .distributed import describe_failure

        msg = describe_failure(e)  # another rank died or hung: one line, not N tracebacks
        if msg is None:
            raise
        raise UserError(msg) from e
    # Stopped by a signal: the shell's convention, 128 + its number (SIGINT 130, SIGTERM 143).
    code = 128 + SIGNAL_NUMBERS.get(summary.get("interrupted"), 2) if summary.get("interrupted") else 0
    if summary.get("rank"):  # ranks > 0 of a torchrun job: rank 0 prints the summary
        return code
    print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        print(f"fastp2p: interrupted ({summary['interrupted']}) at step {summary['steps']}; checkpoint saved to "
              f"{summary['checkpoint']}; continue with --resume", file=sys.stderr)
    return code


SIGNAL_NUMBERS = {"SIGINT": 2, "SIGTERM": 15}


def _add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate images with a trained generator")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders, or one video file (.mp4 .mov .mkv .avi .webm ...: PyAV)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fastp2p .safetensors or reference latest_net_G.pth")
    src.add_argument("--engine", help="an exported G.onnx (ONNX Runtime) or G.plan (TensorRT), see `fastp2p export`")
    p.add_argument("-o", "--out", required=True,
                   help="output folder (one PNG per input, named after its stem; two inputs with one stem are "
                        "refused), or the output video file; never an input or an input folder")
    _add_overwrite(p, "earlier translate outputs (PNGs / a video fastp2p wrote)")
    p.add_argument("--mode", choices=("paper", "eval"), default=None,
                   help="paper (default for checkpoints): per-image statistics + dropout, as the reference's test.py; "
                        "eval: running stats, no dropout. An --engine has its mode baked in")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help="which half of an aligned A|B input is the source (default: the checkpoint's, else AtoB)")
    p.add_argument("--layout", choices=("auto", "aligned", "single"), default="auto",
                   help="aligned: inputs are A|B pairs; single: plain images; auto: aligned when width == 2 x height")
    p.add_argument("--batch_size", type=_positive, default=None, help="default: 1 for images, 8 for a video")
    p.add_argument("--crop_size", type=_positive, default=None, help="model input size (default: the checkpoint's)")
    p.add_argument("--no_dropout_at_inference", action="store_true", help="paper mode without dropout")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu (cuda for a TensorRT plan)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of paper-mode dropout")
    p.add_argument("--kernels", choices=("triton", "torch"), default=None,
                   help="fused Triton norm+activation kernels (checkpoints; default: triton with CUDA, else torch)")
    _add_max_pixels(p)
    _add_arch(p)
    p.set_defaults(func=cmd_translate)


def _arch_from(args) -> ModelConfig:
    base = ModelConfig()
    return ModelConfig(netG=args.netG or base.netG, norm=args.norm or base.norm, no_dropout=bool(args.no_dropout),
                       ngf=args.ngf or base.ngf)


def cmd_translate(args) -> int:
    from .translate import translate_paths
    from .video import is_video_path, translate_video

    check_source_flags(args)
    check_arch_flags(args, args.checkpoint or args.engine, "--checkpoint" if args.checkpoint else "--engine")
    check_crop_size(args.crop_size, args.max_pixels)
    if len(args.inputs) == 1 and is_video_path(Path(args.inputs[0])):
        # Frames run whole at their own size (padded to the U-Net's multiple): these flags would be silently ignored
        unused = [f for f, on in (("--crop_size", args.crop_size is not None), ("--direction", args.direction),
                                  ("--layout", args.layout != "auto"), ("--seed", args.seed != 0),
                                  ("--no_dropout_at_inference", args.no_dropout_at_inference),
                                  ("--kernels", args.kernels)) if on]
        if unused:
            raise UserError(f"{unused[0]}: not used for a video (frames are translated whole, at their own size, "
                            f"in --mode eval unless told); leave {' '.join(unused)} out")
        out = translate_video(args.inputs[0], args.out, checkpoint=args.checkpoint, engine=args.engine,
                              batch_size=args.batch_size or 8, mode=args.mode, device=args.device,
                              model=_arch_from(args), overwrite=args.overwrite, max_pixels=args.max_pixels)
        print(f"wrote {out}")
        return 0

    written = translate_paths(args.inputs, args.checkpoint, args.out, mode=args.mode, direction=args.direction,
                              layout=args.layout, batch_size=args.batch_size or 1, crop_size=args.crop_size,
                              model=_arch_from(args), dropout=False if args.no_dropout_at_inference else None,
                              device=args.device, seed=args.seed, engine=args.engine, kernels=args.kernels,
                              overwrite=args.overwrite, max_pixels=args.max_pixels)
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="reference .pth <-> fastp2p .safetensors")
    p.add_argument("src", metavar="CHECKPOINT")
    p.add_argument("-o", "--out", required=True,
                   help="output file: G.safetensors (+ its .json sidecar), or with --to reference latest_net_G.pth")
    p.add_argument("--to", choices=("fastp2p", "reference"), default="fastp2p")
    _add_overwrite(p, "earlier convert outputs (told by their fastp2p metadata; a .pth by its zip comment)")
    _add_arch(p)
    p.set_defaults(func=cmd_convert)


CONVERT_KIND = "convert"  # see fastp2p.outputs: the marker of convert's files


def _convert_output_ours(path: Path) -> bool:
    """An earlier ``convert`` output at ``path``: a .pth with convert's zip comment, a safetensors checkpoint (or its
    .json sidecar) whose fastp2p metadata records the file it was converted from. A trained checkpoint is not."""
    from . import checkpoint, outputs

    if outputs.zip_marked(path, CONVERT_KIND):
        return True
    if path.suffix == ".json":
        meta = outputs.json_object(path)
    else:
        try:
            meta = checkpoint.read_meta(path)
        except UserError:
            meta = None
    return isinstance(meta, dict) and meta.get("format") == checkpoint.FORMAT and "source_sha256" in meta


def _check_convert_output(out: Path, args) -> None:
    from . import outputs

    files = [out]
    if args.to == "fastp2p":
        if out.suffix == ".json":
            raise UserError(f"-o {out}: the checkpoint's .json sidecar would take this name; name it *.safetensors")
        files.append(out.with_suffix(".json"))  # written by checkpoint.save
    for f in files:
        outputs.output_file(f, "-o", kind=CONVERT_KIND, ours=_convert_output_ours, inputs=[args.src],
                            overwrite=args.overwrite)


def cmd_convert(args) -> int:
    import torch

    from . import checkpoint, outputs
    from .config import Config
    from .models import keys

    out = Path(args.out)
    if args.to == "fastp2p" and Path(args.src).suffix.lower() == ".safetensors":
        raise UserError(f"CHECKPOINT {args.src}: already a fastp2p checkpoint; convert it back with --to reference")
    if args.to == "reference":
        check_arch_flags(args, args.src, "CHECKPOINT")
    _check_convert_output(out, args)
    if args.to == "fastp2p":
        model = _arch_from(args)
        G = checkpoint.generator_from_reference(checkpoint.load_reference_pth(args.src), model, args.src)
        cfg = Config(model=ModelConfig(netG=model.netG, norm=model.norm, no_dropout=model.no_dropout,
                                       ngf=G.down[0].out_channels, input_nc=G.down[0].in_channels,
                                       output_nc=G.up[0].out_channels))
        with outputs.writing(out, "-o"):
            checkpoint.save(out, cfg=cfg, G=G, extra={"source": str(args.src),
                                                       "source_sha256": checkpoint.file_hash(args.src)})
    else:
        G, cfg = checkpoint.load_generator(args.src, _arch_from(args))
        sd = keys.to_reference(G.state_dict(), G.num_downs)

        def write(tmp):  # the reference's own format (a plain state dict), marked by the zip comment only
            torch.save(sd, tmp)
            outputs.mark_zip(tmp, CONVERT_KIND)

        with outputs.writing(out, "-o"):
            checkpoint.atomic_write(out, write)
    print(f"wrote {out}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("src", metavar="CHECKPOINT")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from . import checkpoint

    path = Path(args.src)
    if path.is_dir():
        raise UserError(f"CHECKPOINT {path}: is a folder; give a .safetensors or .pth file")
    if path.suffix.lower() in (".onnx", ".plan", ".engine", ".trt"):
        raise UserError(f"CHECKPOINT {path}: an exported engine, not a checkpoint; `fastp2p info` reads fastp2p "
                        ".safetensors and reference .pth files")
    if path.suffix in (".pth", ".pt"):
        from .models import keys

        sd = keys.strip_wrappers(checkpoint.load_reference_pth(path))
        try:
            depth = keys.num_downs_of_reference(sd)
            kind = {7: "unet_128", 8: "unet_256"}.get(depth, f"{depth}-level U-Net")
        except KeyError:
            kind = "not a reference U-Net generator"
        info = {"format": "reference .pth", "generator": kind, "tensors": len(sd),
                "parameters": sum(v.numel() for k, v in sd.items() if "running_" not in k and "num_batches" not in k)}
    else:
        meta, tensors = checkpoint.load(path)
        info = dict(meta)
        info["tensors"] = len(tensors)
        info["parameters"] = {p: sum(v.numel() for k, v in tensors.items() if k.startswith(p + ".")
                                     and "running_" not in k and "num_batches" not in k) for p in ("G", "D")}
    print(json.dumps(info, indent=2))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line, ``fastp2p: error: <flag>: <problem> (<cmd> --help ...)``, exit 2
    (argparse prints the whole usage block first, several lines that bury the one that matters)."""

    def error(self, message: str):
        self.exit(2, f"fastp2p: error: {message} (`{self.prog} --help` lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastp2p", description="Exact pix2pix, fast.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_translate(sub)
    _add_convert(sub)
    _add_info(sub)
    from .evaluate import add_subcommand as add_eval_subcommand  # eval

    add_eval_subcommand(sub)
    from .bench.cli import add_bench_subcommand  # bench
    from .engines.cli import add_subcommands  # export, build-engine
    from .video import add_video_subcommands  # pipe

    add_subcommands(sub)
    add_video_subcommands(sub)
    add_bench_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "nproc", None):  # train --nproc N re-runs this command line under torchrun
            args.argv = list(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="fastp2p: %(message)s",
                            stream=sys.stderr)
        _image_warnings_are_errors()
        try:
            return args.func(args)
        except UserError as e:
            print(f"fastp2p: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fastp2p: interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:
        # The reader of stdout went away (`fastp2p info X | head -1`): stop quietly, as Unix tools do. fd 1 now points
        # at /dev/null so the interpreter's flush at exit does not fail again (the Python docs' SIGPIPE recipe).
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _stdout_to_devnull() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by something without a file descriptor
        pass


def _image_warnings_are_errors() -> None:
    """PIL only *warns* between its limit and twice that (DecompressionBombWarning) and decodes anyway; the command
    makes that an exception, which ``fastp2p.images.open_image`` reports as the same one-line --max_pixels error as
    larger images. Process-wide, so data loader workers (forked) inherit it."""
    import warnings

    from PIL import Image

    warnings.simplefilter("error", Image.DecompressionBombWarning)


if __name__ == "__main__":
    sys.exit(main())
