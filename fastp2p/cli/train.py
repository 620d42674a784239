"""``fastp2p train``: the paper's recipe by default, flags override a preset (``dataclasses.replace``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import override, preset
from ..errors import UserError
from .args import PREPROCESS, add_arch, add_max_pixels, bounded_float, check_crop_size, non_negative, positive, seed_int


def add_parser(sub) -> None:
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
    p.add_argument("--max_steps", type=positive, default=None, help="stop after N iterations")
    p.add_argument("--resume", action="store_true", default=None, help="continue <out>/<name> from its checkpoint")
    add_arch(p)
    p.add_argument("--netD", choices=("basic", "n_layers", "pixel"), default=None)
    p.add_argument("--n_layers_D", type=positive, default=None)
    p.add_argument("--ndf", type=positive, default=None)
    p.add_argument("--input_nc", type=int, choices=(1, 3), default=None)
    p.add_argument("--output_nc", type=int, choices=(1, 3), default=None)
    p.add_argument("--lambda_L1", type=bounded_float(0.0), default=None,
                   help="weight of the L1 term (>= 0; default 100)")
    p.add_argument("--gan_mode", choices=("vanilla", "lsgan"), default=None)
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None)
    p.add_argument("--load_size", type=positive, default=None)
    p.add_argument("--crop_size", type=positive, default=None)
    p.add_argument("--preprocess", choices=PREPROCESS, default=None)
    p.add_argument("--no_flip", action="store_true", default=None)
    p.add_argument("--skip_bad", action="store_true", default=None, help="skip unreadable images, count them")
    add_max_pixels(p)
    p.add_argument("--num_workers", type=non_negative, default=None,
                   help="data loader worker processes (0: load in the main process)")
    p.add_argument("--loader", choices=("dali", "torch", "gpu-cache"), default=None,
                   help="data loader: dali (NVIDIA DALI; --num_workers threads), torch (worker processes), gpu-cache "
                        "(dataset decoded once into device memory); default: dali on CUDA when installed, else torch")
    p.add_argument("--batch_size", type=positive, default=None)
    p.add_argument("--lr", type=bounded_float(0.0, lo_open=True), default=None,
                   help="Adam learning rate (> 0; default 2e-4)")
    p.add_argument("--beta1", type=bounded_float(0.0, 1.0), default=None, help="Adam beta1 in [0, 1) (default 0.5)")
    p.add_argument("--lr_policy", choices=("linear", "step", "cosine"), default=None)
    p.add_argument("--n_epochs", type=non_negative, default=None,
                   help="epochs at the initial lr (with --n_epochs_decay at least 1 epoch in all)")
    p.add_argument("--n_epochs_decay", type=non_negative, default=None, help="epochs of linear decay to zero")
    p.add_argument("--lr_decay_iters", type=positive, default=None, help="epochs per x0.1 with --lr_policy step")
    p.add_argument("--seed", type=seed_int, default=None)
    p.add_argument("--log_every", type=positive, default=None)
    p.add_argument("--sample_every", type=positive, default=None)
    p.add_argument("--save_every", type=positive, default=None)
    p.add_argument("--eval_every", type=positive, default=None,
                   help="score G on the validation split every N steps (and at the end) into metrics.jsonl")
    p.add_argument("--eval_data", default=None,
                   help="validation split for --eval_every (default: the val/ split beside --data)")
    p.add_argument("--eval_max_images", type=positive, default=None, help="pairs per evaluation (default 50)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=positive, default=None,
                   help="data-parallel processes on this machine (one per GPU, at most one per CPU core without "
                        "CUDA): runs torchrun for you")
    p.add_argument("--scale_lr", action="store_true", default=None,
                   help="multiply --lr by the number of processes (default: the paper's lr at any world size)")
    p.add_argument("--dist_timeout", type=bounded_float(0.0, lo_open=True), default=None,
                   help="seconds a multi-process job waits on a silent rank before failing (default 600)")
    p.set_defaults(func=cmd_train)


def _check_run_folder(cfg) -> None:
    """``--out`` / ``<out>/<name>``: folders that can be made and written, before any training (fit refuses an
    existing run without --resume itself)."""
    from .. import outputs

    out = Path(cfg.train.out)
    outputs.output_dir(out, "--out")
    run_dir = out / cfg.train.name
    outputs.output_dir(run_dir, "--name", inputs=[cfg.data.data])  # the run folder is never the dataset
    for sub in ("checkpoints", "samples"):
        outputs.output_dir(run_dir / sub, "--name")


def _check_train_config(cfg) -> None:
    """What the flag types cannot see alone (several flags together, the preset's values), before anything is built."""
    from ..models.unet import NUM_DOWNS, size_problem

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
        from ..models.patchgan import n_layers_problem

        why = n_layers_problem(d.crop_size, 3 if m.netD == "basic" else m.n_layers_D)
        if why:
            raise UserError(why if m.netD == "n_layers" else why.replace("--n_layers_D 3", "--netD basic (3 levels)"))
    _check_model_fits(cfg)
    if d.loader == "dali":
        from ..data.backends import require_dali

        require_dali()


def _check_model_fits(cfg) -> None:
    """--ngf / --ndf: G and D (built on the meta device: no memory) must fit, with their gradients and Adam's two
    moments (16 bytes a parameter in fp32), in this machine's memory (the GPU's with --device cuda)."""
    import os

    import torch

    from ..models import build_discriminator, build_generator

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


def _fresh_default_name(cfg, args):
    """Without --name (and --resume), a run folder that already holds a run gets a sibling ``<name>-2``, ``-3``, ...
    instead of an error, so the Quickstart's command can be run again; one line says which. An explicit --name is
    never changed (fit refuses it with "pass --resume"). Not under torchrun, whose ranks must agree on one name
    (``--nproc`` passes the chosen name on to them)."""
    import logging
    import os

    t = cfg.train
    if args.name is not None or t.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return cfg
    out, name, n = Path(t.out), t.name, 1
    while (out / name / "checkpoints" / "latest.safetensors").is_file():
        n += 1
        name = f"{t.name}-{n}"
    if n == 1:
        return cfg
    logging.getLogger("fastp2p.train").warning("%s already holds a run: this one goes to %s (--name chooses the "
                                               "folder, --resume continues the old run)", out / t.name, out / name)
    if getattr(args, "argv", None) is not None:
        args.argv = [*args.argv, "--name", name]
    return override(cfg, name=name)


def cmd_train(args) -> int:
    from ..train import fit

    base = preset(args.preset)
    fields = {k: v for k, v in vars(args).items()
              if k not in ("preset", "func", "command", "no_progress", "verbose", "nproc", "argv")}
    if fields.get("data") is not None and not Path(fields["data"]).exists():
        raise UserError(f"--data: no such folder: {fields['data']}")
    cfg = override(base, **fields)
    cfg = _fresh_default_name(cfg, args)
    if cfg.data.crop_size > cfg.data.load_size and "crop" in cfg.data.preprocess:
        raise UserError(f"--crop_size {cfg.data.crop_size} is larger than --load_size {cfg.data.load_size}")
    if args.n_layers_D is not None and cfg.model.netD != "n_layers" and args.n_layers_D != 3:
        raise UserError(f"--n_layers_D {args.n_layers_D}: only used with --netD n_layers (--netD {cfg.model.netD} is "
                        f"{'3 levels' if cfg.model.netD == 'basic' else '1x1 convolutions'}); add --netD n_layers")
    _check_train_config(cfg)
    _check_run_folder(cfg)
    if args.nproc is not None and args.nproc > 1:  # after the checks above: a bad flag is reported once, not N times
        _check_nproc(args.nproc, cfg.train.device)
        from ..distributed import launch

        return launch(args.argv, args.nproc)
    try:
        summary = fit(cfg, progress=not args.no_progress)
    except Exception as e:
        from ..distributed import describe_failure

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


