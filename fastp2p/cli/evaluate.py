"""``fastp2p eval``: score a generator (checkpoint or engine) on a validation split, with an HTML gallery."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
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
from .translate import add_backend, check_backend, runtime_options


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a generator on a validation split (L1, PSNR, SSIM; FID/LPIPS with local "
                                    "weights) and write an HTML gallery",
                       description="Translate a validation split, score every output against its target, write a "
                                   "report.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fastp2p .safetensors or reference latest_net_G.pth")
    src.add_argument("--engine", help="an exported G.onnx (ONNX Runtime or OpenVINO), G.xml (OpenVINO) or G.plan "
                                      "(TensorRT)")
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
    p.add_argument("--reference", default=None, metavar="CKPT|ENGINE",
                   help="also score the generator against this reference generator's outputs (e.g. the fp32 teacher "
                        "of an INT8 engine or a student): psnr_ref / ssim_ref / l1_ref per image and as means, a "
                        "reference column in the gallery. A checkpoint runs in the generator's mode; an export must "
                        "match it (default: no reference)")
    p.add_argument("--min_psnr", type=float, default=None,
                   help="with --reference, a quality gate: exit 2 when the mean psnr_ref (dB) is below this, after "
                        "writing the report (default: no gate)")
    p.add_argument("--force", action="store_true",
                   help="below --min_psnr, warn and exit 0; without it, a result below the bar exits 2")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar; without it a bar (images, img/s, ETA) on stderr when it is a terminal")
    add_max_pixels(p)
    add_arch(p)
    official.add_test_flags(p)  # test.py's options; --name/--epoch pick a run's checkpoint
    p.set_defaults(func=cmd_eval)


def _source(args):
    """--checkpoint / --engine, as ``evaluate`` takes it: the path, or with runtime options (--threads, --ov_*,
    --streams, which ``evaluate`` has no parameters for) the engine opened here with them."""
    opts = runtime_options(args)
    if not opts or args.engine is None:
        return args.checkpoint or args.engine
    from ..engines.runtime import open_runtime

    return open_runtime(args.engine, device=args.device, mode=args.mode,
                        dropout=False if args.no_dropout_at_inference else None, crop_size=args.crop_size,
                        direction=args.direction, backend=args.backend, **opts)


def cmd_eval(args) -> int:
    official.apply_test(args)  # test.py's options -> eval's flags
    from ..evaluate import _fmt, evaluate, skip_line

    check_source_flags(args)
    check_backend(args)
    check_arch_flags(args, args.checkpoint or args.engine, "--checkpoint" if args.checkpoint else "--engine")
    check_crop_size(args.crop_size, args.max_pixels)
    if args.reference is None and (args.min_psnr is not None or args.force):
        raise UserError(f"{'--min_psnr' if args.min_psnr is not None else '--force'}: a gate against a reference "
                        "generator; give --reference CKPT|ENGINE too")
    gate = None
    if args.min_psnr is not None:
        from ..gate import check_min_psnr, enforce, gate_line, scores_from_eval

        gate = check_min_psnr(args.min_psnr)
    r = evaluate(_source(args), args.data, out=args.out, direction=args.direction, mode=args.mode,
                 dropout=False if args.no_dropout_at_inference else None, model=arch_from(args),
                 crop_size=args.crop_size, batch_size=args.batch_size, seed=args.seed, device=args.device,
                 fid_weights=args.fid_weights, lpips_weights=args.lpips_weights, max_images=args.max_images,
                 quiet=True, overwrite=args.overwrite, max_pixels=args.max_pixels, progress=not args.no_progress,
                 backend=args.backend, reference=args.reference)
    if r["skipped"]:
        print(f"fastp2p: {skip_line(r['skipped'])}", file=sys.stderr)
    print(f"eval: {r['images']} image(s)  L1 {_fmt('L1', r['L1'])}  PSNR {_fmt('PSNR', r['PSNR'])} dB  "
          f"SSIM {_fmt('SSIM', r['SSIM'])}  FID {_fmt('FID', r['FID'])}  LPIPS {_fmt('LPIPS', r['LPIPS'])}  "
          f"-> {Path(r['out']) / 'index.html'} (with images/ beside it)")
    if args.reference is not None:
        print(f"eval: against the reference {r['reference']} ({r['reference_backend']}): "
              f"PSNR {_fmt('PSNR', r['psnr_ref'])} dB (worst image {_fmt('PSNR', r['psnr_ref_min'])})  "
              f"SSIM {_fmt('SSIM', r['ssim_ref'])}  L1 {_fmt('L1', r['l1_ref'])}; the reference against the targets: "
              f"L1 {_fmt('L1', r['reference_L1'])}  PSNR {_fmt('PSNR', r['reference_PSNR'])} dB  "
              f"SSIM {_fmt('SSIM', r['reference_SSIM'])}")
    if gate is not None:
        s = scores_from_eval(r)
        print(gate_line("eval", s, gate))
        enforce(s, min_psnr=gate, force=args.force, what="eval")
    return 0
