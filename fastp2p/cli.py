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


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


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
    p.add_argument("--lambda_L1", type=float, default=None)
    p.add_argument("--gan_mode", choices=("vanilla", "lsgan"), default=None)
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None)
    p.add_argument("--load_size", type=_positive, default=None)
    p.add_argument("--crop_size", type=_positive, default=None)
    p.add_argument("--preprocess", choices=PREPROCESS, default=None)
    p.add_argument("--no_flip", action="store_true", default=None)
    p.add_argument("--skip_bad", action="store_true", default=None, help="skip unreadable images, count them")
    p.add_argument("--num_workers", type=int, default=None, help="data loader worker processes")
    p.add_argument("--loader", choices=("dali", "torch", "gpu-cache"), default=None,
                   help="data loader: dali (NVIDIA DALI; --num_workers threads), torch (worker processes), gpu-cache "
                        "(dataset decoded once into device memory); default: dali on CUDA when installed, else torch")
    p.add_argument("--batch_size", type=_positive, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta1", type=float, default=None)
    p.add_argument("--lr_policy", choices=("linear", "step", "cosine"), default=None)
    p.add_argument("--n_epochs", type=int, default=None, help="epochs at the initial lr")
    p.add_argument("--n_epochs_decay", type=int, default=None, help="epochs of linear decay to zero")
    p.add_argument("--lr_decay_iters", type=_positive, default=None, help="epochs per x0.1 with --lr_policy step")
    p.add_argument("--seed", type=int, default=None)
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
                   help="data-parallel processes on this machine (one per GPU): runs torchrun for you")
    p.add_argument("--scale_lr", action="store_true", default=None,
                   help="multiply --lr by the number of processes (default: the paper's lr at any world size)")
    p.add_argument("--dist_timeout", type=float, default=None,
                   help="seconds a multi-process job waits on a silent rank before failing (default 600)")
    p.set_defaults(func=cmd_train)


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
    if args.nproc is not None and args.nproc > 1:  # after the checks above: a bad flag is reported once, not N times
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
                   help="output folder (one PNG per input, named after its stem), or the output video file")
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
    p.add_argument("--seed", type=int, default=0, help="seed of paper-mode dropout")
    p.add_argument("--kernels", choices=("triton", "torch"), default=None,
                   help="fused Triton norm+activation kernels (checkpoints; default: triton with CUDA, else torch)")
    _add_arch(p)
    p.set_defaults(func=cmd_translate)


def _arch_from(args) -> ModelConfig:
    base = ModelConfig()
    return ModelConfig(netG=args.netG or base.netG, norm=args.norm or base.norm, no_dropout=bool(args.no_dropout),
                       ngf=args.ngf or base.ngf)


def cmd_translate(args) -> int:
    from .translate import translate_paths
    from .video import is_video_path, translate_video

    if len(args.inputs) == 1 and is_video_path(Path(args.inputs[0])):
        out = translate_video(args.inputs[0], args.out, checkpoint=args.checkpoint, engine=args.engine,
                              batch_size=args.batch_size or 8, mode=args.mode, device=args.device,
                              model=_arch_from(args))
        print(f"wrote {out}")
        return 0

    written = translate_paths(args.inputs, args.checkpoint, args.out, mode=args.mode, direction=args.direction,
                              layout=args.layout, batch_size=args.batch_size or 1, crop_size=args.crop_size,
                              model=_arch_from(args), dropout=False if args.no_dropout_at_inference else None,
                              device=args.device, seed=args.seed, engine=args.engine, kernels=args.kernels)
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="reference .pth <-> fastp2p .safetensors")
    p.add_argument("src", metavar="CHECKPOINT")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--to", choices=("fastp2p", "reference"), default="fastp2p")
    _add_arch(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    import torch

    from . import checkpoint
    from .config import Config
    from .models import keys

    out = Path(args.out)
    if args.to == "fastp2p":
        model = _arch_from(args)
        G = checkpoint.generator_from_reference(checkpoint.load_reference_pth(args.src), model, args.src)
        cfg = Config(model=ModelConfig(netG=model.netG, norm=model.norm, no_dropout=model.no_dropout,
                                       ngf=G.down[0].out_channels, input_nc=G.down[0].in_channels,
                                       output_nc=G.up[0].out_channels))
        checkpoint.save(out, cfg=cfg, G=G, extra={"source": str(args.src),
                                                   "source_sha256": checkpoint.file_hash(args.src)})
    else:
        G, cfg = checkpoint.load_generator(args.src, _arch_from(args))
        sd = keys.to_reference(G.state_dict(), G.num_downs)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, out)
    print(f"wrote {out}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("src", metavar="CHECKPOINT")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from . import checkpoint

    path = Path(args.src)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastp2p", description="Exact pix2pix, fast.")
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
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", None):  # train --nproc N re-runs this command line under torchrun
        args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="fastp2p: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except UserError as e:
        print(f"fastp2p: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastp2p: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
