"""``fastp2p eval``: score a generator (checkpoint or engine) on a validation split, with an HTML gallery."""

from __future__ import annotations

import sys
from pathlib import Path

from . import official
from .args import (
    add_arch,
    add_inference_flags,
    add_max_pixels,
    add_overwrite,
    arch_from,
    check_arch_flags,
    check_crop_size,
    check_source_flags,
    positive,
    seed_int,
)
from .translate import add_backend, check_backend


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a generator on a validation split (L1, PSNR, SSIM; FID/LPIPS with local "
                                    "weights) and write an HTML gallery",
                       description="Translate a validation split, score every output against its target, write a "
                                   "report.")
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
    add_overwrite(p, "the files of an earlier eval's folder")
    p.add_argument("--batch_size", type=positive, default=1, help="images per batch (default %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of paper-mode dropout (default %(default)s)")
    p.add_argument("--max_images", type=positive, default=None,
                   help="evaluate the first N pairs only (default: all)")
    add_inference_flags(p)
    add_backend(p)
    p.add_argument("--fid_weights", default=None,
                   help="local TorchScript inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid); enables FID "
                        "(default: no FID)")
    p.add_argument("--lpips_weights", default=None,
                   help="local TorchScript LPIPS module: model(a, b) on [-1, 1] images -> one distance per image, "
                        'e.g. torch.jit.trace(lpips.LPIPS(net="alex").eval(), (x, x)).save(...); enables LPIPS '
                        "(default: no LPIPS)")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar; without it a bar (images, img/s, ETA) on stderr when it is a terminal")
    add_max_pixels(p)
    add_arch(p)
    official.add_test_flags(p)  # test.py's options; --name/--epoch pick a run's checkpoint
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    official.apply_test(args)  # test.py's options -> eval's flags
    from ..evaluate import _fmt, evaluate, skip_line

    check_source_flags(args)
    check_backend(args)
    check_arch_flags(args, args.checkpoint or args.engine, "--checkpoint" if args.checkpoint else "--engine")
    check_crop_size(args.crop_size, args.max_pixels)
    r = evaluate(args.checkpoint or args.engine, args.data, out=args.out, direction=args.direction, mode=args.mode,
                 dropout=False if args.no_dropout_at_inference else None, model=arch_from(args),
                 crop_size=args.crop_size, batch_size=args.batch_size, seed=args.seed, device=args.device,
                 fid_weights=args.fid_weights, lpips_weights=args.lpips_weights, max_images=args.max_images,
                 quiet=True, overwrite=args.overwrite, max_pixels=args.max_pixels, progress=not args.no_progress,
                 backend=args.backend)
    if r["skipped"]:
        print(f"fastp2p: {skip_line(r['skipped'])}", file=sys.stderr)
    print(f"eval: {r['images']} image(s)  L1 {_fmt('L1', r['L1'])}  PSNR {_fmt('PSNR', r['PSNR'])} dB  "
          f"SSIM {_fmt('SSIM', r['SSIM'])}  FID {_fmt('FID', r['FID'])}  LPIPS {_fmt('LPIPS', r['LPIPS'])}  "
          f"-> {Path(r['out']) / 'index.html'} (with images/ beside it)")
    return 0
