"""``fastp2p export`` and ``fastp2p build-engine``: ``add_parsers(subparsers)`` adds both to the main parser.

    fastp2p export CKPT -o G.onnx [--mode paper|eval] [--precision fp32|fp16|bf16] [--dynamic] [--opset N]
    fastp2p export CKPT -o G.int8.onnx --precision int8 --calib DIR [--calib_images N] [--calib_method minmax]
                   [--gate_data DIR] [--min_psnr DB] [--force]
    fastp2p build-engine CKPT|G.onnx -o G.plan [--backend tensorrt|onnxruntime|openvino] [--precision fp16|bf16|fp32]
                         [--batch MIN,OPT,MAX]
    fastp2p build-engine CKPT|G.onnx -o G.xml --backend openvino [--precision fp32|bf16] [--ov_hint latency|throughput]

Each subcommand sets ``func`` (``args -> exit status``); failures raise ``UserError`` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError
from . import official
from .args import (
    add_arch,
    add_gate_flags,
    add_overwrite,
    arch_from,
    check_arch_flags,
    check_crop_size,
    gate_data_from,
    positive,
)


def _add_export_flags(p: argparse.ArgumentParser, *, precision_default: str | None,
                      mode_default: str = "paper") -> None:
    p.add_argument("--mode", choices=("paper", "eval"), default="paper",
                   help="paper: per-image statistics (instance-norm arithmetic with the batch-norm affine); "
                        f"eval: running statistics folded into the convolutions, no dropout (default {mode_default})")
    drop = p.add_mutually_exclusive_group()
    drop.add_argument("--paper_dropout", action="store_true",
                      help="paper mode with the paper's dropout baked in as random masks (a new draw every call); "
                           "without it: no dropout")
    drop.add_argument("--no_dropout_at_inference", action="store_true",
                      help="paper mode without dropout: deterministic (the default for exports, so this flag only "
                           "says it). Not --no_dropout, which describes a .pth generator built without dropout layers")
    default_help = (f"default {precision_default}" if precision_default else
                    "default: fp16 for tensorrt, fp32 for onnxruntime, an .onnx's own")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default=precision_default,
                   help="weights and activations; input/output stay float32; bf16 needs opset 22; int8: static "
                        f"per-channel QDQ calibrated on --calib images, made by export only ({default_help})")
    if precision_default is not None:  # export; build-engine (None: an .onnx keeps its own precision) never calibrates
        # engines/quantize.py's DEFAULT_CALIB_IMAGES, DEFAULT_METHOD, METHODS, spelled out so that building the parser
        # imports no torch (tests/test_quantize.py checks that they agree)
        DEFAULT_CALIB_IMAGES, DEFAULT_METHOD, METHODS = 64, "minmax", ("minmax", "entropy", "percentile")
        p.add_argument("--calib", metavar="DIR", default=None,
                       help="--precision int8 only, and then required: folder of source images to calibrate on "
                            "(aligned A|B pairs: the source half per the checkpoint's direction; A/ and B/; or plain "
                            "images), read with the model's preprocessing; a dataset root means its val/ "
                            "(default: none)")
        p.add_argument("--calib_images", type=positive, default=None, metavar="N",
                       help=f"how many images of --calib to calibrate on, evenly spaced over the sorted files "
                            f"(default {DEFAULT_CALIB_IMAGES}, or all when fewer)")
        p.add_argument("--calib_method", choices=METHODS, default=None,
                       help="activation ranges: minmax (observed extremes), entropy (KL divergence), percentile "
                            f"(99.999th); entropy and percentile hold every activation of every calibration image "
                            f"in memory, ~55 MB per image for unet_256 at 256x256 (default {DEFAULT_METHOD})")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic height and width (multiples of 2^num_downs); without it: fixed at --crop_size; "
                        "the batch is always dynamic")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 22 for bf16; at least 17)")
    p.add_argument("--crop_size", type=positive, default=None,
                   help="model input size in pixels (default: the checkpoint's; 256 for a reference .pth)")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help="recorded in the metadata (default: the checkpoint's, else AtoB)")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="torch.onnx exporter (default %(default)s: dynamo when onnxscript is installed)")
    add_arch(p)


def add_parsers(sub) -> None:
    """Add ``export`` and ``build-engine`` to the ``fastp2p`` subparsers."""
    p = sub.add_parser("export", help="export the generator to ONNX",
                       description="Export the generator of a fastp2p checkpoint or a reference .pth to ONNX, in an "
                                   "explicit inference mode (--mode, default paper: the reference's test.py).")
    p.add_argument("src", metavar="CHECKPOINT", help="fastp2p .safetensors or reference latest_net_G.pth")
    p.add_argument("-o", "--out", required=True, help="output .onnx")
    add_overwrite(p, "ONNX files fastp2p exported")
    _add_export_flags(p, precision_default="fp32")
    from ..gate import DEFAULT_MIN_PSNR, MEASURED

    add_gate_flags(p, "INT8 export", DEFAULT_MIN_PSNR["int8"], MEASURED["int8"])
    official.add_selection_flags(p, dest="src")  # or --name/--epoch: a run's checkpoint
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engine", help="build a TensorRT engine, an OpenVINO IR, or an optimized ONNX Runtime "
                                            "model",
                       description="Build an inference engine from a checkpoint (exported to ONNX first) or an "
                                   "exported .onnx. With --backend openvino, --precision is the compute precision "
                                   "(fp32, or bf16 where the CPU has it; the IR keeps fp32 weights, an INT8 QDQ .onnx "
                                   "its int8 ones) and is recorded in the IR with --ov_hint as the default of later "
                                   "runs; the model is compiled once, into OpenVINO's on-disk cache.")
    p.add_argument("src", metavar="CHECKPOINT|ONNX", help="fastp2p .safetensors, reference .pth, or G.onnx")
    p.add_argument("-o", "--out", required=True,
                   help="output: G.plan (tensorrt), G.xml with G.bin beside it (openvino) or G.ort.onnx (onnxruntime)")
    p.add_argument("--backend", choices=("tensorrt", "openvino", "onnxruntime"), default="tensorrt",
                   help="tensorrt: a TensorRT .plan; openvino: an OpenVINO IR (.xml + .bin, CPU), its compiled model "
                        "cached in ~/.cache/fastp2p/openvino; onnxruntime: an optimized .onnx (default %(default)s)")
    p.add_argument("--ov_hint", choices=("latency", "throughput"), default=None,
                   help="--backend openvino: the OpenVINO mode recorded in the IR as its runs' default, latency (one "
                        "stream) or throughput (several) (default latency)")
    p.add_argument("--batch", default="1,8,32", help="TensorRT profile batch sizes MIN,OPT,MAX (default 1,8,32)")
    p.add_argument("--hw", default=None,
                   help="TensorRT profile sizes MIN,OPT,MAX for a --dynamic export (default size_multiple,crop,crop)")
    p.add_argument("--opt_level", type=int, choices=range(6), default=3, metavar="0-5",
                   help="TensorRT builder optimization level (default 3)")
    p.add_argument("--workspace", type=positive, default=4096,
                   help="TensorRT workspace limit in MiB (default 4096)")
    p.add_argument("--timing_cache", default=None,
                   help="persistent TensorRT timing cache file (default ~/.cache/fastp2p/tensorrt/timing.cache)")
    p.add_argument("--tf32", action="store_true",
                   help="let TensorRT use TF32 for fp32 layers; without it fp32 layers compute in full fp32")
    p.add_argument("--onnx", default=None,
                   help="where to write the intermediate ONNX of a checkpoint (default: -o with suffix .onnx; "
                        "G.src.onnx beside a --backend onnxruntime G.ort.onnx)")
    add_overwrite(p, "files of an earlier build (a plan with its .plan.json sidecar, an IR's .xml and .bin, "
                     "fastp2p ONNX files)")
    _add_export_flags(p, precision_default=None, mode_default="paper for a checkpoint; an .onnx keeps its own")
    p.set_defaults(func=cmd_build_engine, mode=None)  # None: paper for a checkpoint; an .onnx keeps its own


def _check_outputs(args, src: Path, onnx_path: Path, out: Path) -> None:
    """Every file build-engine writes, checked before the first one is written (``fastp2p.outputs``); needs no
    TensorRT nor OpenVINO (an IR's .xml is told by its XML, its .bin by the .xml beside it)."""
    if args.backend == "tensorrt":
        from ..engines.tensorrt import check_plan_output

        check_plan_output(out, inputs=[src, onnx_path], overwrite=args.overwrite, timing_cache=args.timing_cache)
    elif args.backend == "openvino":
        from ..engines.openvino import check_ir_output

        check_ir_output(out, inputs=[src, onnx_path], overwrite=args.overwrite)
    else:
        from ..engines.onnxruntime import check_optimized_output

        check_optimized_output(onnx_path, out, overwrite=args.overwrite)
    if onnx_path != src:
        from ..engines.onnx import check_onnx_output

        check_onnx_output(onnx_path, "--onnx" if args.onnx else "-o", inputs=[src], overwrite=args.overwrite)


def _export_kwargs(args, precision: str) -> dict:
    return {"mode": args.mode, "dropout": bool(args.paper_dropout), "precision": precision, "dynamic": args.dynamic,
            "opset": args.opset, "model": arch_from(args), "direction": args.direction, "crop_size": args.crop_size,
            "exporter": args.exporter}


def _check_mode_flags(args) -> None:
    if args.mode == "eval" and args.paper_dropout:
        raise UserError("--paper_dropout: eval mode has no dropout; use --mode paper")
    check_arch_flags(args, args.src, "CHECKPOINT")
    check_crop_size(args.crop_size)


def _check_onnx_source(args, src: Path, meta: dict) -> None:
    """build-engine from an exported .onnx: the export flags would be ignored (the file keeps its mode, sizes and
    architecture), so any that asks for something else is refused."""
    arch = meta.get("arch") or {}
    pre = meta["preprocessing"]
    asked = [(f"--mode {args.mode}", args.mode is not None and args.mode != meta.get("mode")),
             ("--paper_dropout", args.paper_dropout and meta.get("dropout") != "on"),
             ("--no_dropout_at_inference", args.no_dropout_at_inference and meta.get("dropout") == "on"),
             ("--dynamic", args.dynamic and not meta.get("dynamic_hw")),
             (f"--crop_size {args.crop_size}", args.crop_size is not None and args.crop_size != pre["crop_size"]),
             (f"--direction {args.direction}", args.direction is not None and args.direction != pre.get("direction")),
             (f"--opset {args.opset}", args.opset is not None and args.opset != meta.get("opset")),
             (f"--exporter {args.exporter}", args.exporter != "auto"),
             (f"--netG {args.netG}", args.netG is not None and args.netG != arch.get("netG")),
             (f"--norm {args.norm}", args.norm is not None and args.norm != arch.get("norm")),
             (f"--ngf {args.ngf}", args.ngf is not None and args.ngf != arch.get("ngf")),
             ("--no_dropout", args.no_dropout is not None and arch.get("use_dropout") is not False)]
    flags = [f for f, on in asked if on]
    if flags:
        raise UserError(f"{flags[0]}: {src} is an exported ONNX, which keeps its own mode, sizes and architecture "
                        f"({meta.get('mode')} mode, {meta['preprocessing']['crop_size']}px"
                        f"{', dynamic H,W' if meta.get('dynamic_hw') else ''}); re-export the checkpoint with "
                        f"{' '.join(flags)} (`fastp2p export`), or leave them out")


def cmd_export(args) -> int:
    official.apply_selection(args, "src", "CHECKPOINT")  # --name/--epoch -> CHECKPOINT
    from ..engines.onnx import export_onnx

    _check_mode_flags(args)
    calib_flags = [f for f, v in (("--calib", args.calib), ("--calib_images", args.calib_images),
                                  ("--calib_method", args.calib_method)) if v is not None]
    gate_flags = [f for f, on in (("--gate_data", args.gate_data is not None), ("--gate_images", args.gate_images),
                                  ("--force", args.force), ("--no_gate", args.no_gate)) if on]
    if args.precision != "int8":
        if gate_flags:
            raise UserError(f"{gate_flags[0]}: the quality gate is for --precision int8 only (an fp32 export is the "
                            "generator itself); add --precision int8 or leave it out")
        if calib_flags:
            raise UserError(f"{calib_flags[0]}: calibration is for --precision int8 only; add --precision int8 or "
                            f"leave {' '.join(calib_flags)} out")
        out = export_onnx(args.src, args.out, **_export_kwargs(args, args.precision), overwrite=args.overwrite)
        print(f"wrote {out} ({args.mode} mode{', dropout on' if args.paper_dropout else ''}, {args.precision}"
              f"{', dynamic H,W' if args.dynamic else ''})")
        return 0

    # int8: export fp32 to a temporary file, calibrate on --calib, write the QDQ graph to -o (engines/quantize.py)
    import tempfile

    from ..engines import quantize as q
    from ..engines.onnx import check_onnx_output, read_onnx_meta

    if args.calib is None:
        raise UserError("--precision int8 needs --calib DIR: a folder of source images to calibrate the int8 ranges "
                        "on (e.g. the training or validation split)")
    n_images = args.calib_images or q.DEFAULT_CALIB_IMAGES
    method = args.calib_method or q.DEFAULT_METHOD
    q.calibration_sources(args.calib, n_images)  # a bad --calib fails before the export, not after it
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UserError(f"-o {out}: an ONNX export must be named *.onnx")
    check_onnx_output(out, inputs=[args.src], overwrite=args.overwrite)
    gate_data = gate_data_from(args, args.src)  # a bad --gate_data fails before the export, not after it
    with tempfile.TemporaryDirectory(prefix="fastp2p-int8-", dir=out.parent if out.parent.is_dir() else None) as work:
        fp32 = export_onnx(args.src, Path(work) / "fp32.onnx", **_export_kwargs(args, "fp32"))
        calib = q.calibration_batches(args.calib, read_onnx_meta(fp32), n_images)
        staged = Path(work) / out.name  # gated first, then moved to -o: a rejected file never lands there
        q.quantize_onnx(fp32, staged, calib, method=method,
                        meta_extra={"source_onnx": f"fp32 export of {Path(args.src).name}, made for this file"})
        if gate_data is not None:
            # The gate: the int8 file against the fp32 checkpoint it came from (opened in the file's mode, dropout,
            # size and direction), on validation pairs; the scores go into the file's metadata either way.
            from .. import gate
            from ..engines.onnx import update_onnx_meta

            scores = gate.score_against_reference(staged, args.src, gate_data, max_images=args.gate_images,
                                                  batch_size=4, backend="auto")
            print(gate.gate_line("INT8 export", scores, args.min_psnr), file=sys.stderr)
            try:
                result = gate.enforce(scores, min_psnr=args.min_psnr, force=args.force, what="INT8 export")
            except UserError as e:
                raise UserError(f"{e}; nothing written to {out}") from None
            result["candidate"] = str(out)
            update_onnx_meta(staged, quality_gate=result)
        check_onnx_output(out, inputs=[args.src], overwrite=args.overwrite)  # again: a file may have appeared
        os.replace(staged, out)
    print(f"wrote {out} ({args.mode} mode{', dropout on' if args.paper_dropout else ''}, int8 QDQ, calibrated on "
          f"{len(calib)} image(s) of {calib.folder}, {method}{', dynamic H,W' if args.dynamic else ''}"
          f"{'' if gate_data is None else ', gate ' + ('passed' if result['passed'] else 'FORCED')})")
    return 0


def _openvino_precision(args, meta: dict | None) -> str:
    """build-engine --backend openvino: the compute precision --precision asks for (see the parser's description);
    None -> fp32. Refused before anything is written: a precision OpenVINO's CPU plugin has no hint for, bf16 on a CPU
    without it."""
    from ..engines.openvino import PRECISIONS, check_precision

    own = (meta or {}).get("precision")
    if args.precision is None or (meta is not None and args.precision == own and own not in PRECISIONS):
        precision = "fp32"  # an .onnx's own precision (fp16 weights, int8 QDQ) computed in fp32 where not int8
    elif args.precision in PRECISIONS:
        precision = args.precision
    else:
        hint = ("; for INT8 build from a QDQ .onnx (`fastp2p export --precision int8 --calib DIR`)"
                if args.precision == "int8" else "")
        raise UserError(f"--precision {args.precision}: --backend openvino computes in fp32 or bf16 (an fp16 or INT8 "
                        f"QDQ .onnx runs under either); use --precision fp32 or bf16{hint}")
    check_precision(precision)
    return precision


def _refuse_other_backend_flags(args) -> None:
    """Flags of another backend than the one building: refused, not ignored."""
    trt = [("--hw", args.hw is not None), ("--timing_cache", args.timing_cache is not None), ("--tf32", args.tf32),
           (f"--batch {args.batch}", args.batch != "1,8,32"), (f"--opt_level {args.opt_level}", args.opt_level != 3),
           (f"--workspace {args.workspace}", args.workspace != 4096)]
    given = [f for f, on in trt if on]
    if args.backend == "openvino" and given:
        raise UserError(f"{given[0]}: a TensorRT flag; --backend openvino takes --precision and --ov_hint, leave it "
                        "out")
    if args.backend != "openvino" and args.ov_hint is not None:
        raise UserError(f"--ov_hint {args.ov_hint}: for --backend openvino only, not {args.backend}; leave it out")


def cmd_build_engine(args) -> int:
    from ..engines.onnx import read_onnx_meta
    from ..engines.tensorrt import parse_triple

    _check_mode_flags(args)
    src, out = Path(args.src), Path(args.out)
    if src.is_dir():
        raise UserError(f"CHECKPOINT|ONNX {src}: is a folder; give a checkpoint or an exported .onnx file")
    if not src.is_file():
        raise UserError(f"not found: {src}")
    if args.timing_cache and Path(args.timing_cache).is_dir():
        raise UserError(f"--timing_cache {args.timing_cache}: is a folder; give a file path (created if missing)")
    batch = parse_triple(args.batch, "--batch")
    hw = parse_triple(args.hw, "--hw") if args.hw else None
    _refuse_other_backend_flags(args)
    from_onnx = src.suffix == ".onnx"
    if args.backend == "tensorrt":
        from ..engines.runtime import TRT_SUFFIXES

        if out.suffix not in TRT_SUFFIXES:
            raise UserError(f"-o {out}: a TensorRT engine is written as *.plan")
    elif args.backend == "openvino":
        from ..engines.openvino import IR_SUFFIXES, require_openvino

        if out.suffix.lower() not in IR_SUFFIXES:
            raise UserError(f"-o {out}: --backend openvino writes an OpenVINO IR, G.xml with G.bin beside it; name "
                            "it *.xml")
        require_openvino()
    elif out.suffix != ".onnx":
        raise UserError(f"-o {out}: --backend onnxruntime writes an optimized ONNX file; name it *.onnx")

    ov_precision = None
    if from_onnx:
        meta = read_onnx_meta(src)
        _check_onnx_source(args, src, meta)
        if args.backend == "openvino":
            ov_precision = _openvino_precision(args, meta)
        elif args.precision and args.precision != meta.get("precision"):
            raise UserError(f"--precision {args.precision}: {src} was exported in {meta.get('precision')} and "
                            "TensorRT builds strongly typed networks; re-export the checkpoint with "
                            f"`fastp2p export --precision {args.precision}"
                            f"{' --calib DIR' if args.precision == 'int8' else ''}`")
        if args.backend == "tensorrt" and meta.get("precision") == "int8":
            from ..engines.tensorrt import check_int8_onnx

            check_int8_onnx(src)  # symmetric Q/DQ only: refused before a trtexec command is printed
        onnx_path = src
        _check_outputs(args, src, onnx_path, out)
    else:
        from ..engines.onnx import export_onnx

        if args.precision == "int8":
            raise UserError(f"--precision int8: build-engine does not calibrate; make the int8 file with `fastp2p "
                            f"export {src} -o G.int8.onnx --precision int8 --calib DIR` and build from G.int8.onnx")
        args.mode = args.mode or "paper"
        if args.backend == "openvino":  # fp32 weights: the IR computes in --precision (fp32 or bf16) from them
            ov_precision = _openvino_precision(args, None)
            precision = "fp32"
        else:
            precision = args.precision or ("fp16" if args.backend == "tensorrt" else "fp32")
        if args.backend in ("tensorrt", "openvino"):
            onnx_path = Path(args.onnx) if args.onnx else out.with_suffix(".onnx")
        else:
            onnx_path = Path(args.onnx) if args.onnx else out.with_name(out.stem.removesuffix(".ort") + ".src.onnx")
        if onnx_path.resolve() == out.resolve():
            raise UserError(f"--onnx {onnx_path}: same file as -o; choose another name")
        _check_outputs(args, src, onnx_path, out)
        export_onnx(src, onnx_path, **_export_kwargs(args, precision), overwrite=args.overwrite)
        print(f"wrote {onnx_path} ({args.mode} mode, {precision})")

    if args.backend == "openvino":
        from ..engines.openvino import bin_path, build_ir

        gen = build_ir(onnx_path, out, precision=ov_precision, hint=args.ov_hint or "latency",
                       overwrite=args.overwrite)
        print(f"wrote {out} and {bin_path(out).name} (OpenVINO IR, {gen.onnx_meta.get('precision', 'fp32')} "
              f"weights; compiled {gen.precision}/{gen.hint} in {gen.load_s:.1f} s into the cache {gen.cache_dir})")
        return 0

    if args.backend == "onnxruntime":
        from ..engines.onnxruntime import optimize_onnx

        optimize_onnx(onnx_path, out, overwrite=args.overwrite)
        print(f"wrote {out} and {out}.json (ONNX Runtime optimized graph)")
        return 0

    from ..engines import tensorrt as engine_trt

    shapes = engine_trt.profile_shapes(read_onnx_meta(onnx_path), batch, hw)
    ok, why = engine_trt.tensorrt_available()
    if not ok:
        cmd = engine_trt.trtexec_command(onnx_path, out, shapes, opt_level=args.opt_level,
                                         workspace_mib=args.workspace, timing_cache=args.timing_cache, tf32=args.tf32)
        print("equivalent trtexec command, for a machine with TensorRT >= 10 and an NVIDIA GPU:")
        print(cmd)
        raise UserError(f"no TensorRT engine built: {why} on this machine, so run the trtexec command above (or "
                        f"`fastp2p build-engine {onnx_path} -o {out}`) on a machine with TensorRT >= 10 and an "
                        "NVIDIA GPU")
    engine_trt.build_engine(onnx_path, out, batch=batch, hw=hw, opt_level=args.opt_level,
                            workspace_mib=args.workspace, timing_cache=args.timing_cache, tf32=args.tf32,
                            verbose=getattr(args, "verbose", False), overwrite=args.overwrite)
    print(f"wrote {out} and {engine_trt.sidecar_path(out).name}")
    return 0
