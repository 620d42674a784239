"""``fastp2p train``: the paper's recipe by default, flags override a preset (``dataclasses.replace``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import PRESETS, override, preset
from ..errors import UserError
from . import official
from .args import (
    PREPROCESS,
    add_arch,
    add_max_pixels,
    bounded_float,
    check_crop_size,
    non_negative,
    positive,
    preset_default,
    seed_int,
)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train pix2pix", description="Train pix2pix (the paper's recipe by default).")
    p.add_argument("--preset", default="default",
                   help=f"named defaults that flags override: {', '.join(PRESETS)} (default %(default)s: the paper's "
                        "recipe); each flag's help gives its default under it and under any preset that differs")
    p.add_argument("--data", default=None, help="dataset folder (pix2pix layout); omitted: built-in synthetic pairs")
    p.add_argument("--out", default=None, help=f"output root folder ({preset_default('out')})")
    p.add_argument("--name", default=None,
                   help=f"run name; the run folder is <out>/<name> ({preset_default('name')}; without --name a "
                        "folder that already holds a run gets a fresh <name>-2, -3, ...)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help=f"where to train ({preset_default('device')})")
    p.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision: bf16 autocast where the device computes bf16 natively (most CUDA GPUs, CPUs "
                        "with avx512_bf16/AMX), fp16 autocast + GradScaler on other GPUs, fp32 on other CPUs; one log "
                        "line says which. Without it: fp32")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the step functions (the first step pays the compile); without it: eager")
    p.add_argument("--compile_mode", choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead"),
                   default=None, help="torch.compile mode with --compile (default: inductor's default; "
                                      "reduce-overhead uses inductor's own CUDA graphs instead of --cuda_graphs)")
    p.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the whole training step in one CUDA graph per input shape (default: on with "
                        "--device cuda where the step can be graphed: not fp16, DDP or --compile_mode reduce-overhead)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on with CUDA, off on CPU where it measured slower)")
    p.add_argument("--kernels", choices=("triton", "torch"), default=None,
                   help="fused Triton norm+activation kernels or PyTorch's (default: triton with CUDA, else torch)")
    p.add_argument("--max_steps", type=positive, default=None,
                   help="stop after N steps (batches); default: none, the whole lr schedule (--n_epochs + "
                        "--n_epochs_decay epochs)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue <out>/<name> from its checkpoint; without it an existing run is never continued "
                        "(refused with --name, a fresh <name>-2 without)")
    add_arch(p, train=True)
    p.add_argument("--netD", choices=("basic", "n_layers", "pixel"), default=None,
                   help="discriminator: basic (70x70 PatchGAN, 3 levels), n_layers (--n_layers_D levels), pixel "
                        f"(1x1 PixelGAN) ({preset_default('netD')})")
    p.add_argument("--n_layers_D", type=positive, default=None,
                   help=f"discriminator levels with --netD n_layers ({preset_default('n_layers_D')})")
    p.add_argument("--ndf", type=positive, default=None,
                   help=f"discriminator filters in the first conv ({preset_default('ndf')})")
    p.add_argument("--input_nc", type=int, choices=(1, 3), default=None,
                   help=f"channels of the source image: 1 gray, 3 RGB ({preset_default('input_nc')})")
    p.add_argument("--output_nc", type=int, choices=(1, 3), default=None,
                   help=f"channels of the target image: 1 gray, 3 RGB ({preset_default('output_nc')})")
    p.add_argument("--lambda_L1", type=bounded_float(0.0), default=None,
                   help=f"weight of the L1 term (>= 0; {preset_default('lambda_L1')})")
    p.add_argument("--gan_mode", choices=("vanilla", "lsgan"), default=None,
                   help=f"GAN loss: vanilla (the paper's cross-entropy) or lsgan (least squares) "
                        f"({preset_default('gan_mode')})")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help=f"AtoB: learn A -> B of each A|B pair; BtoA: B -> A ({preset_default('direction')})")
    p.add_argument("--load_size", type=positive, default=None,
                   help=f"resize images to this size (scale_width: this width) before cropping "
                        f"({preset_default('load_size', 'pixels')})")
    p.add_argument("--crop_size", type=positive, default=None,
                   help=f"random square crop, the model's input size ({preset_default('crop_size', 'pixels')})")
    p.add_argument("--preprocess", choices=PREPROCESS, default=None,
                   help="resize_and_crop: resize to --load_size, random --crop_size crop; crop: crop only; "
                        "scale_width(_and_crop): width to --load_size, aspect kept (then crop); none: sizes rounded to "
                        "multiples of 4 "
                        f"({preset_default('preprocess')})")
    p.add_argument("--no_flip", action="store_true", default=None,
                   help="no random horizontal flips; without it each pair is flipped with probability 0.5 (as the "
                        "paper)")
    p.add_argument("--skip_bad", action="store_true", default=None,
                   help="skip unreadable images, count them in the summary; without it the first one stops training "
                        "with an error naming the file")
    add_max_pixels(p)
    p.add_argument("--num_workers", type=non_negative, default=None,
                   help=f"data loader worker processes (0: load in the main process; "
                        f"{preset_default('num_workers')})")
    p.add_argument("--loader", choices=("dali", "torch", "gpu-cache"), default=None,
                   help="data loader: dali (NVIDIA DALI; --num_workers threads), torch (worker processes), gpu-cache "
                        "(dataset decoded once into device memory); default: dali on CUDA when installed, else torch")
    p.add_argument("--batch_size", type=positive, default=None,
                   help=f"images per step, per process ({preset_default('batch_size')})")
    p.add_argument("--lr", type=bounded_float(0.0, lo_open=True), default=None,
                   help=f"Adam learning rate (> 0; {preset_default('lr')})")
    p.add_argument("--beta1", type=bounded_float(0.0, 1.0), default=None,
                   help=f"Adam beta1 in [0, 1) ({preset_default('beta1')})")
    p.add_argument("--lr_policy", choices=("linear", "step", "cosine"), default=None,
                   help="linear: --n_epochs at the initial lr, then linear decay to zero over --n_epochs_decay; step: "
                        f"x0.1 every --lr_decay_iters epochs; cosine: annealed over --n_epochs "
                        f"({preset_default('lr_policy')})")
    p.add_argument("--n_epochs", type=non_negative, default=None,
                   help="epochs at the initial lr (with --n_epochs_decay at least 1 epoch in all; "
                        f"{preset_default('n_epochs', 'epochs')})")
    p.add_argument("--n_epochs_decay", type=non_negative, default=None,
                   help=f"epochs of linear decay to zero ({preset_default('n_epochs_decay', 'epochs')})")
    p.add_argument("--lr_decay_iters", type=positive, default=None,
                   help=f"epochs per x0.1 with --lr_policy step ({preset_default('lr_decay_iters', 'epochs')})")
    p.add_argument("--seed", type=seed_int, default=None,
                   help=f"seed of the weights' init, the data order and dropout ({preset_default('seed')})")
    p.add_argument("--log_every", type=positive, default=None,
                   help=f"log losses and img/s to metrics.jsonl every N steps ({preset_default('log_every', 'steps')})")
    p.add_argument("--sample_every", type=positive, default=None,
                   help=f"write an A | G(A) | B sample image to samples/ every N steps "
                        f"({preset_default('sample_every', 'steps')})")
    p.add_argument("--save_every", type=positive, default=None,
                   help=f"save checkpoints/latest.safetensors every N steps, and at the end "
                        f"({preset_default('save_every', 'steps')})")
    p.add_argument("--eval_every", type=positive, default=None,
                   help="score G on the validation split every N steps (and at the end) into metrics.jsonl "
                        "(default: off)")
    p.add_argument("--eval_data", default=None,
                   help="validation split for --eval_every (default: the val/ split beside --data)")
    p.add_argument("--eval_max_images", type=positive, default=None,
                   help=f"pairs per evaluation ({preset_default('eval_max_images', 'images')})")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar; without it a bar (steps, img/s, losses) on stderr")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, dest="tensorboard", default=None,
                   help="TensorBoard events in <run>/tensorboard/ (losses, lr, img/s, eval scores, sample grids; "
                        "view with `tensorboard --logdir runs`) (default: on when the tensorboard package is "
                        'installed: pip install "fastp2p[tensorboard]")')
    p.add_argument("--wandb", action="store_true",
                   help="also log the scalars and sample grids to Weights & Biases, project fastp2p (default: off; "
                        "needs pip install wandb)")
    p.add_argument("--nproc", type=positive, default=None,
                   help="data-parallel processes on this machine (one per GPU, at most one per CPU core without "
                        "CUDA): runs torchrun for you (default: one process, no torchrun)")
    p.add_argument("--scale_lr", action="store_true", default=None,
                   help="multiply --lr by the number of processes (default: the paper's lr at any world size)")
    p.add_argument("--dist_timeout", type=bounded_float(0.0, lo_open=True), default=None,
                   help="seconds a multi-process job waits on a silent rank before failing "
                        f"({preset_default('dist_timeout', 'seconds')})")
    official.add_train_flags(p)  # --save_epoch_freq, --keep_last and train.py's options
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
    if t.compile_mode not in (None, "default") and not t.compile:
        raise UserError(f"--compile_mode {t.compile_mode}: only used with --compile; add --compile")
    if t.cuda_graphs and t.device != "cuda":
        raise UserError("--cuda_graphs: CUDA graphs need --device cuda; drop --cuda_graphs on a CPU")
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
    official.apply_train(args)  # train.py's options -> fastp2p's flags (before anything reads them)
    from ..train import fit

    base = preset(args.preset)
    fields = {k: v for k, v in vars(args).items()
              if k not in ("preset", "func", "command", "no_progress", "verbose", "nproc", "argv", "wandb")}
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
    from ..report import check_loggers

    check_loggers(cfg.train.tensorboard, args.wandb)  # once here, not once per rank under --nproc
    if args.nproc is not None and args.nproc > 1:  # after the checks above: a bad flag is reported once, not N times
        _check_nproc(args.nproc, cfg.train.device)
        from ..distributed import launch

        return launch(args.argv, args.nproc)
    try:
        summary = fit(cfg, progress=not args.no_progress, wandb=args.wandb)
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


