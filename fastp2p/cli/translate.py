"""``fastp2p translate`` (image files, folders, a video file) and ``fastp2p pipe`` (raw RGB24 frames on stdin)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from . import official
from .args import (
    add_arch,
    add_inference_flags,
    add_max_pixels,
    add_overwrite,
    arch_from,
    bounded_float,
    check_arch_flags,
    check_crop_size,
    check_source_flags,
    positive,
    seed_int,
)

log = logging.getLogger("fastp2p.video")


BACKENDS = ("auto", "onnxruntime", "openvino")  # fastp2p.engines.runtime.BACKEND_CHOICES (not imported: torch)
RUNTIME_OPTIONS = ("threads", "ov_precision", "ov_hint", "streams")  # open_runtime keywords set by add_backend


def add_backend(p) -> None:
    """``--backend`` and the CPU runtime options: what runs an .onnx / .xml --engine, and how (translate, pipe,
    eval); ``runtime_options(args)`` hands them to ``open_runtime``."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what runs an .onnx --engine: onnxruntime; openvino (CPU, compiled model cached in "
                        "~/.cache/fastp2p/openvino); auto: openvino on the CPU when it is installed, else onnxruntime, "
                        "said in one log line (default %(default)s). An .xml (build-engine --backend openvino) "
                        "runs on openvino")
    p.add_argument("--ov_precision", choices=("fp32", "bf16"), default=None,
                   help="OpenVINO compute precision: bf16 only where the CPU has it (AVX512-BF16 / AMX), outputs "
                        "differ from fp32 by up to ~3e-2 (default fp32; an .xml: what its build-engine chose)")
    p.add_argument("--ov_hint", choices=("latency", "throughput"), default=None,
                   help="OpenVINO mode: latency (one stream, for small batches) or throughput (a batch split over "
                        "several streams) (default latency; an .xml: what its build-engine chose)")
    p.add_argument("--threads", type=positive, default=None,
                   help="CPU threads of ONNX Runtime / OpenVINO (default: one per core this process may run on)")
    p.add_argument("--streams", type=positive, default=None,
                   help="OpenVINO streams, parallel infer requests (default: OpenVINO's choice for --ov_hint)")


def runtime_options(args) -> dict:
    """The ``open_runtime`` keywords of ``add_backend``'s options that were given."""
    return {k: getattr(args, k) for k in RUNTIME_OPTIONS if getattr(args, k, None) is not None}


def check_backend(args) -> None:
    if args.checkpoint is None:
        return
    if args.backend not in (None, "auto"):
        raise UserError(f"--backend {args.backend}: only for an .onnx --engine, not --checkpoint; leave --backend out")
    given = [f"--{k}" for k in runtime_options(args)]
    if given:
        raise UserError(f"{given[0]}: only for an .onnx or .xml --engine (ONNX Runtime / OpenVINO), not --checkpoint; "
                        "leave it out")


def add_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate images with a trained generator")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders, or one video file (.mp4 .mov .mkv .avi .webm ...: PyAV)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fastp2p .safetensors or reference latest_net_G.pth")
    src.add_argument("--engine", help="an exported G.onnx (ONNX Runtime or OpenVINO, see --backend), G.xml (OpenVINO) "
                                      "or G.plan (TensorRT), see `fastp2p export` and `fastp2p build-engine`")
    p.add_argument("-o", "--out", required=True,
                   help="output folder (one PNG per input, named after its stem; two inputs with one stem are "
                        "refused), or the output video file; never an input or an input folder")
    add_overwrite(p, "earlier translate outputs (PNGs / a video fastp2p wrote)")
    p.add_argument("--mode", choices=("paper", "eval"), default=None,
                   help="paper (default for checkpoints): per-image statistics + dropout, as the reference's test.py; "
                        "eval: running stats, no dropout. An --engine has its mode baked in")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help="which half of an aligned A|B input is the source (default: the checkpoint's, else AtoB)")
    p.add_argument("--layout", choices=("auto", "aligned", "single"), default="auto",
                   help="aligned: inputs are A|B pairs; single: plain images; auto: aligned when width == 2 x height "
                        "(default %(default)s)")
    p.add_argument("--batch_size", type=positive, default=None,
                   help="images (video: frames) per batch (default: 1 image, 8 frames for a video)")
    add_inference_flags(p)
    add_backend(p)
    p.add_argument("--seed", type=seed_int, default=0, help="seed of paper-mode dropout (default %(default)s)")
    p.add_argument("--kernels", choices=("triton", "torch"), default=None,
                   help="fused Triton norm+activation kernels (checkpoints; default: triton with CUDA, else torch)")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar; without it a bar (images or frames, per second, ETA) on stderr (for "
                        "images only when stderr is a terminal)")
    add_max_pixels(p)
    add_arch(p)
    official.add_translate_flags(p)  # --name/--epoch pick a run's checkpoint; test.py's --model, --gpu_ids
    p.set_defaults(func=cmd_translate)


def cmd_translate(args) -> int:
    official.apply_translate(args)  # the official options -> translate's flags
    from ..translate import translate_paths
    from ..video import is_video_path, translate_video

    check_source_flags(args)
    check_backend(args)
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
                              model=arch_from(args), overwrite=args.overwrite, max_pixels=args.max_pixels,
                              progress=not args.no_progress, backend=args.backend,
                              runtime_options=runtime_options(args))
        print(f"wrote {out}")
        return 0

    written = translate_paths(args.inputs, args.checkpoint, args.out, mode=args.mode, direction=args.direction,
                              layout=args.layout, batch_size=args.batch_size or 1, crop_size=args.crop_size,
                              model=arch_from(args), dropout=False if args.no_dropout_at_inference else None,
                              device=args.device, seed=args.seed, engine=args.engine, kernels=args.kernels,
                              overwrite=args.overwrite, max_pixels=args.max_pixels, progress=not args.no_progress,
                              backend=args.backend, runtime_options=runtime_options(args))
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


def add_pipe_parser(sub) -> None:
    p = sub.add_parser("pipe", help="translate raw RGB24 frames from stdin to stdout",
                       description="Raw RGB24 frames of --size WxH on stdin -> translated raw RGB24 frames of the "
                                   "same size on stdout; logs go to stderr. E.g. ffmpeg -i in.mp4 -f rawvideo "
                                   "-pix_fmt rgb24 - | fastp2p pipe --size 640x360 --checkpoint G.safetensors | "
                                   "ffmpeg -f rawvideo -pix_fmt rgb24 -s 640x360 -framerate 30000/1001 -i - "
                                   "-pix_fmt yuv420p out.mp4 (raw frames carry no rate: give the output ffmpeg the "
                                   "input's -framerate, from `ffprobe -v error -select_streams v:0 -show_entries "
                                   "stream=width,height,r_frame_rate -of csv=p=0 in.mp4`, or it plays at 25 fps)")
    p.add_argument("--size", required=True, help="frame size WIDTHxHEIGHT, e.g. 640x360")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fastp2p .safetensors or reference latest_net_G.pth")
    src.add_argument("--engine", help="an exported G.onnx (ONNX Runtime or OpenVINO), G.xml (OpenVINO) or G.plan "
                                      "(TensorRT)")
    p.add_argument("--batch_size", type=positive, default=4, help="frames per batch (default %(default)s)")
    p.add_argument("--max_latency_ms", type=bounded_float(0.0), default=100.0,
                   help="send a partial batch after this many ms without a full one (>= 0; default %(default)g ms)")
    p.add_argument("--mode", choices=("paper", "eval"), default=None,
                   help="default eval for checkpoints (running stats, no dropout: temporally stable)")
    p.add_argument("--fit", choices=("pad", "resize"), default="pad",
                   help="frames of a size the model does not take: pad (edge-replicate letterbox, cropped back) or "
                        "resize (stretched and back) (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu (cuda for a TensorRT plan)")
    add_backend(p)
    add_max_pixels(p)
    add_arch(p)
    p.set_defaults(func=cmd_pipe)


def cmd_pipe(args) -> int:
    from ..video import _translator, parse_size, run_pipe

    w, h = parse_size(args.size, args.max_pixels)
    check_source_flags(args)
    check_backend(args)
    check_arch_flags(args, args.checkpoint or args.engine, "--checkpoint" if args.checkpoint else "--engine")
    model = arch_from(args) if args.checkpoint else None
    tr = _translator(args.checkpoint, args.engine, mode=args.mode, device=args.device, model=model, fit=args.fit,
                     backend=args.backend, **runtime_options(args))
    n = run_pipe(tr, w, h, batch_size=args.batch_size, max_latency_ms=args.max_latency_ms)
    log.info("pipe: %d frame(s) of %dx%d", n, w, h)
    return 0
