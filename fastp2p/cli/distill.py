"""``fastp2p distill``: a narrower student U-Net from a trained teacher checkpoint (fastp2p.distill). The training
flags are ``fastp2p train``'s own definitions (taken from its parser, so the two cannot drift); the teacher decides
the architecture and preprocessing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DistillConfig
from ..errors import UserError
from .args import PREPROCESS, add_gate_flags, bounded_float, gate_data_from, positive

# train's flags that mean the same here (by option string, so train.py-style aliases such as --niter stay out).
TRAIN_FLAGS = ("--out", "--device", "--amp", "--compile", "--compile_mode", "--channels_last", "--kernels",
               "--max_steps", "--resume", "--lambda_L1", "--no_flip", "--skip_bad", "--max_pixels", "--num_workers",
               "--loader", "--batch_size", "--lr", "--beta1", "--lr_policy", "--n_epochs", "--n_epochs_decay",
               "--lr_decay_iters", "--seed", "--log_every", "--sample_every", "--save_every", "--eval_every",
               "--eval_data", "--eval_max_images", "--no_progress", "--tensorboard", "--wandb", "--save_epoch_freq",
               "--keep_last")
NOT_CONFIG = ("func", "command", "verbose", "argv", "no_progress", "wandb", "teacher", "ngf", "gate_data",
              "gate_images", "min_psnr", "force", "no_gate")


def _train_actions(flags: tuple[str, ...]) -> list[argparse.Action]:
    """The argparse actions of ``fastp2p train``'s ``flags`` (types, defaults, help text), from a throwaway copy of
    its parser. Sharing an action between parsers is what argparse's own ``parents=`` does."""
    from . import train

    holder = argparse.ArgumentParser(add_help=False)

    class _One:
        def add_parser(self, name, **kwargs):
            return holder

    train.add_parser(_One())
    by_flag = {s: a for a in holder._actions for s in a.option_strings}
    return [by_flag[f] for f in flags]


def add_parser(sub) -> None:
    d = DistillConfig()
    p = sub.add_parser("distill", help="train a narrower student generator from a trained teacher",
                       description="Distill a trained fastp2p generator into a U-Net of the same topology with fewer "
                                   "filters (GAN Compression / OMGD style: the teacher's outputs and features as "
                                   "targets beside pix2pix's losses); writes an ordinary fastp2p checkpoint.")
    p.add_argument("--teacher", default=None,
                   help="the teacher: a fastp2p .safetensors checkpoint or its run folder (required; with --resume "
                        "default: the run's own teacher, checked by sha256)")
    p.add_argument("--ngf", type=positive, default=None,
                   help="student generator filters in the first conv, fewer than the teacher's (default: a quarter "
                        "of the teacher's, 16 for a ngf-64 teacher as OMGD's student)")
    p.add_argument("--data", default=None,
                   help="dataset folder (pix2pix layout) (default: the teacher's training data, when that folder is "
                        "there)")
    p.add_argument("--name", default=None,
                   help="run name; the run folder is <out>/<name> (default distill-ngf<N>; without --name a folder "
                        "that already holds a run gets a fresh <name>-2, -3, ...)")
    p.add_argument("--discriminator", choices=("teacher", "fresh"), default=None,
                   help="teacher: start D from the teacher checkpoint's discriminator and keep training it (as GAN "
                        f"Compression); fresh: a newly initialized D (default {d.discriminator})")
    p.add_argument("--lambda_teacher", type=bounded_float(0.0), default=None,
                   help=f"weight of L1(student output, teacher output) (>= 0; default {d.lambda_teacher:g})")
    p.add_argument("--lambda_feat", type=bounded_float(0.0), default=None,
                   help="weight of the feature term: the sum over --feat_layers of MSE(1x1 adapter(student feature), "
                        f"teacher feature) (>= 0, 0: no adapters; default {d.lambda_feat:g})")
    p.add_argument("--feat_layers", default=None,
                   help="U-Net activations matched, comma-separated: down<L> (encoder level L after its LeakyReLU) "
                        f"and up<L> (decoder level L before dropout) (default {d.feat_layers}: OMGD's layers)")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help="AtoB: learn A -> B of each A|B pair; BtoA: B -> A (default: the teacher's)")
    p.add_argument("--load_size", type=positive, default=None,
                   help="resize images to this size (scale_width: this width) before cropping, in pixels (default: "
                        "the teacher's)")
    p.add_argument("--crop_size", type=positive, default=None,
                   help="random square crop, the model's input size, in pixels (default: the teacher's)")
    p.add_argument("--preprocess", choices=PREPROCESS, default=None,
                   help="as fastp2p train's --preprocess (default: the teacher's)")
    for action in _train_actions(TRAIN_FLAGS):
        p._add_action(action)
    from ..gate import DEFAULT_MIN_PSNR, MEASURED

    add_gate_flags(p, "student", DEFAULT_MIN_PSNR["student"], MEASURED["student"])
    p.set_defaults(func=cmd_distill)


def _resume_base(args):
    """--resume: the run's own config (teacher, --ngf, distill settings, data) is the base the flags override."""
    from .. import checkpoint
    from ..config import Config, TrainConfig

    out = Path(args.out or TrainConfig().out)
    if args.name is None:
        raise UserError("--resume: give --name (the run folder to continue)")
    ckpt = out / args.name / "checkpoints" / "latest.safetensors"
    if not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt}; drop --resume to start a new run")
    cfg = Config.from_dict(checkpoint.read_meta(ckpt)["config"])
    if cfg.distill is None:
        raise UserError(f"--resume: {ckpt} is a `fastp2p train` run, not a distillation; choose another --name")
    if args.ngf is not None and args.ngf != cfg.model.ngf:
        raise UserError(f"--resume: {ckpt} is a --ngf {cfg.model.ngf} student (this command: --ngf {args.ngf}); "
                        "leave --ngf out to continue it")
    return cfg


def cmd_distill(args) -> int:
    import dataclasses

    from .. import distill
    from ..config import override
    from .train import SIGNAL_NUMBERS, _check_run_folder, _check_train_config, _fresh_default_name

    if args.data is not None and not Path(args.data).exists():
        raise UserError(f"--data: no such folder: {args.data}")
    fields = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    dnames = {f.name for f in dataclasses.fields(DistillConfig)}
    dflags = {k: fields.pop(k) for k in list(fields) if k in dnames and fields[k] is not None}
    fields = {k: v for k, v in fields.items() if k not in dnames}
    if args.resume:
        cfg = _resume_base(args)
        teacher = args.teacher or cfg.distill.teacher
        # the recorded sha256 stays: DistillTrainer refuses a --teacher file other than the run's own
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
            cfg.distill, teacher=str(distill.teacher_path(teacher)), **dflags))
        cfg = override(cfg, **fields)
    else:
        if args.teacher is None:
            raise UserError("--teacher: required (the trained fastp2p checkpoint to distill)")
        cfg = distill.student_config(args.teacher, args.ngf, **dflags, **fields)
        cfg = _fresh_default_name(cfg, args)
    if cfg.data.crop_size > cfg.data.load_size and "crop" in cfg.data.preprocess:
        raise UserError(f"--crop_size {cfg.data.crop_size} is larger than --load_size {cfg.data.load_size}")
    _check_train_config(cfg)
    _check_run_folder(cfg)
    gate_data = gate_data_from(args, cfg.distill.teacher)  # checked before hours of training, not after
    summary = distill.distill(cfg, progress=not args.no_progress, wandb=args.wandb)
    code = 128 + SIGNAL_NUMBERS.get(summary.get("interrupted"), 2) if summary.get("interrupted") else 0
    gate_error = None
    if gate_data is not None and not summary.get("interrupted"):
        # The gate of a lossy step: the student against its fp32 teacher on validation pairs, both deterministic
        # (paper mode, dropout off). The checkpoint stays whatever the verdict (it is the run's, --resume needs it);
        # the scores go into its metadata (``quality``), and a result below --min_psnr exits 2 unless --force.
        from .. import gate

        scores = gate.score_against_reference(summary["checkpoint"], cfg.distill.teacher, gate_data,
                                              max_images=args.gate_images, batch_size=4)
        print(gate.gate_line("student", scores, args.min_psnr), file=sys.stderr)
        try:
            result = gate.enforce(scores, min_psnr=args.min_psnr, force=args.force, what="student")
        except UserError as e:
            gate_error, result = e, {**scores, "min_psnr": args.min_psnr, "passed": False}
        distill.record_scores(summary["checkpoint"], result)
        summary["quality"] = result
    print(json.dumps(summary, indent=2))
    if gate_error is not None:
        raise gate_error
    if summary.get("interrupted"):
        print(f"fastp2p: interrupted ({summary['interrupted']}) at step {summary['steps']}; checkpoint saved to "
              f"{summary['checkpoint']}; continue with --resume --name {cfg.train.name}", file=sys.stderr)
    return code
