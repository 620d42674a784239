"""``fastp2p convert`` (reference .pth <-> fastp2p .safetensors) and ``fastp2p info`` (a checkpoint's metadata)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ModelConfig
from ..errors import UserError
from .args import PREPROCESS, add_arch, add_overwrite, check_arch_flags, positive

log = logging.getLogger("fastp2p.convert")


def add_convert_parser(sub) -> None:
    from ..config import DataConfig

    d = DataConfig()
    p = sub.add_parser("convert", help="reference .pth <-> fastp2p .safetensors")
    p.add_argument("src", metavar="CHECKPOINT",
                   help="the file to convert (required): a reference latest_net_G.pth for --to fastp2p (the "
                        "default), a fastp2p .safetensors checkpoint for --to reference")
    p.add_argument("-o", "--out", required=True,
                   help="output file (required): G.safetensors (+ its .json sidecar), or with --to reference "
                        "latest_net_G.pth (+ latest_net_G.fastp2p.json: the direction and preprocessing a .pth "
                        "cannot hold; the reference's tools ignore it)")
    p.add_argument("--to", choices=("fastp2p", "reference"), default="fastp2p",
                   help="the format to write (default fastp2p): fastp2p reads a reference .pth (and the "
                        ".fastp2p.json beside it, when there); reference writes one from a fastp2p checkpoint")
    add_overwrite(p, "earlier convert outputs (told by their fastp2p metadata; a .pth by its zip comment)")
    add_arch(p)
    g = p.add_argument_group("preprocessing of a .pth (--to fastp2p only)",
                             "what the model was trained with, recorded in the new checkpoint; each flag overrides "
                             "the .fastp2p.json sidecar beside the .pth (the flag wins). Without sidecar and flags: "
                             "the defaults below, direction AtoB (with a warning)")
    g.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help=f"which half of an aligned A|B image is the model's input (default: the sidecar's, else "
                        f"{d.direction})")
    g.add_argument("--load_size", type=positive, default=None,
                   help=f"training resize, in pixels (default: the sidecar's, else {d.load_size})")
    g.add_argument("--crop_size", type=positive, default=None,
                   help=f"the model's input size, in pixels (default: the sidecar's, else {d.crop_size}); a "
                        "multiple of 256 for unet_256, of 128 for unet_128")
    g.add_argument("--preprocess", choices=PREPROCESS, default=None,
                   help=f"training preprocessing (default: the sidecar's, else {d.preprocess})")
    p.set_defaults(func=cmd_convert)


PREPROCESSING_FLAGS = ("direction", "load_size", "crop_size", "preprocess")


CONVERT_KIND = "convert"  # see fastp2p.outputs: the marker of convert's files


def _convert_output_ours(path: Path) -> bool:
    """An earlier ``convert`` output at ``path``: a .pth with convert's zip comment, its ``.fastp2p.json`` sidecar, a
    safetensors checkpoint (or its .json sidecar) whose fastp2p metadata records the file it was converted from. A
    trained checkpoint is not."""
    from .. import checkpoint, outputs

    if outputs.zip_marked(path, CONVERT_KIND):
        return True
    if path.suffix == ".json":
        meta = outputs.json_object(path)
        if isinstance(meta, dict) and meta.get("format") == checkpoint.REFERENCE_SIDECAR_FORMAT:
            return True
    else:
        try:
            meta = checkpoint.read_meta(path)
        except UserError:
            meta = None
    return isinstance(meta, dict) and meta.get("format") == checkpoint.FORMAT and "source_sha256" in meta


def _check_convert_output(out: Path, args) -> None:
    from .. import checkpoint, outputs

    files = [out]
    inputs = [args.src]
    if args.to == "fastp2p":
        if out.suffix == ".json":
            raise UserError(f"-o {out}: the checkpoint's .json sidecar would take this name; name it *.safetensors")
        files.append(out.with_suffix(".json"))  # written by checkpoint.save
        inputs.append(checkpoint.reference_sidecar_path(args.src))  # read, never replaced
    else:
        if out.name.endswith(".fastp2p.json"):
            raise UserError(f"-o {out}: the .pth's .fastp2p.json sidecar would take this name; name it *.pth")
        files.append(checkpoint.reference_sidecar_path(out))
    for f in files:
        outputs.output_file(f, "-o", kind=CONVERT_KIND, ours=_convert_output_ours, inputs=inputs,
                            overwrite=args.overwrite)


def _pick(key: str, given, recorded, where: str):
    """The flag's value when given (logged when the sidecar ``where`` records another), else the sidecar's."""
    if given is None:
        return recorded
    if recorded is not None and given != recorded:
        shown = f"--{key}" if isinstance(given, bool) else f"--{key} {given}"
        log.warning("%s: %s records %s=%s; the flag wins", shown, where, key, recorded)
    return given


def _reference_config(args, sd: dict, side: dict | None):
    """(G, Config) of a reference state dict: the architecture and preprocessing from the flags, else from the
    ``.fastp2p.json`` sidecar ``side``, else the defaults (direction AtoB, said in one warning line)."""
    import dataclasses

    from .. import checkpoint
    from ..config import Config
    from ..models.unet import size_problem

    base = Config.from_dict(side["config"]) if side else Config()
    where = checkpoint.reference_sidecar_path(args.src).name
    rec_m = base.model if side else None
    model = ModelConfig(**{k: _pick(k, getattr(args, k), getattr(rec_m, k, None), where)
                           or getattr(ModelConfig(), k) for k in ("netG", "norm", "no_dropout", "ngf")})
    G = checkpoint.generator_from_reference(sd, model, args.src)
    rec_d = base.data if side else None
    data = {k: _pick(k, getattr(args, k), getattr(rec_d, k, None), where) for k in PREPROCESSING_FLAGS}
    if data["direction"] is None:
        log.warning("CHECKPOINT %s: no --direction and no usable sidecar %s: assuming AtoB (and the default "
                    "sizes); pass --direction BtoA if it was trained B->A", args.src, where)
    d = dataclasses.replace(base.data, **{k: v for k, v in data.items() if v is not None})
    for flag, size in (("--crop_size", d.crop_size),) + ((("--load_size", d.load_size),)
                                                        if d.preprocess == "scale_width" else ()):
        why = size_problem(size, int(G.num_downs), flag)
        if why:
            raise UserError(why)
    if d.crop_size > d.load_size and "crop" in d.preprocess:
        raise UserError(f"--crop_size {d.crop_size} is larger than --load_size {d.load_size}; a crop must fit in the "
                        "resized image")
    m = dataclasses.replace(base.model, netG=model.netG, norm=model.norm, no_dropout=model.no_dropout,
                            ngf=G.down[0].out_channels, input_nc=G.down[0].in_channels,
                            output_nc=G.up[0].out_channels)
    return G, Config(model=m, data=d, train=base.train)


def _generator_from_flags(args, sd: dict):
    from .. import checkpoint

    base = ModelConfig()
    model = ModelConfig(netG=args.netG or base.netG, norm=args.norm or base.norm, no_dropout=bool(args.no_dropout),
                        ngf=args.ngf or base.ngf)
    return checkpoint.generator_from_reference(sd, model, args.src)


def cmd_convert(args) -> int:
    import torch

    from .. import checkpoint, outputs
    from ..models import keys

    out = Path(args.out)
    if args.to == "fastp2p" and Path(args.src).suffix.lower() == ".safetensors":
        raise UserError(f"CHECKPOINT {args.src}: already a fastp2p checkpoint; convert it back with --to reference")
    if args.to == "reference":
        check_arch_flags(args, args.src, "CHECKPOINT")
        given = [f"--{k}" for k in PREPROCESSING_FLAGS if getattr(args, k, None) is not None]
        if given:
            raise UserError(f"{given[0]}: applies to --to fastp2p only; a fastp2p checkpoint carries its own "
                            "preprocessing (written to the .fastp2p.json beside the .pth)")
    _check_convert_output(out, args)
    if args.to == "fastp2p":
        sd = checkpoint.load_reference_pth(args.src)
        side = checkpoint.read_reference_sidecar(args.src)
        G, cfg = _reference_config(args, sd, side)
        extra = {"source": str(args.src), "source_sha256": checkpoint.file_hash(args.src)}
        if side:
            extra["source_sidecar"] = checkpoint.reference_sidecar_path(args.src).name
        with outputs.writing(out, "-o"):
            checkpoint.save(out, cfg=cfg, G=G, extra=extra)
        d = cfg.data
        print(f"wrote {out} (direction {d.direction}, preprocess {d.preprocess}, load_size {d.load_size}, "
              f"crop_size {d.crop_size})")
        return 0
    if Path(args.src).suffix.lower() in (".pth", ".pt"):  # a .pth to a .pth: its sidecar carried, when it has one
        sd_in = checkpoint.load_reference_pth(args.src)
        side = checkpoint.read_reference_sidecar(args.src)
        G, cfg = _reference_config(args, sd_in, side) if side else (_generator_from_flags(args, sd_in), None)
    else:
        G, cfg = checkpoint.load_generator(args.src)
    sd = keys.to_reference(G.state_dict(), G.num_downs)

    def write(tmp):  # the reference's own format (a plain state dict), marked by the zip comment only
        torch.save(sd, tmp)
        outputs.mark_zip(tmp, CONVERT_KIND)

    with outputs.writing(out, "-o"):
        checkpoint.atomic_write(out, write)
    print(f"wrote {out}")
    if cfg is not None:
        side_path = checkpoint.reference_sidecar_path(out)
        with outputs.writing(side_path, "-o"):
            checkpoint.write_reference_sidecar(cfg, out, args.src)
        print(f"wrote {side_path} (direction {cfg.data.direction}, preprocessing and architecture: read back by "
              "`fastp2p convert --to fastp2p`)")
    return 0


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's or an export's metadata (JSON)")
    p.add_argument("src", metavar="FILE",
                   help="the file to describe (required): a fastp2p .safetensors checkpoint, a reference .pth, an "
                        ".onnx export (or build-engine's .ort.onnx), an OpenVINO IR .xml (build-engine --backend "
                        "openvino), or a TensorRT .plan (read from its .plan.json sidecar)")
    p.set_defaults(func=cmd_info)


def _onnx_info(path: Path) -> dict:
    """What an ONNX file says about itself, its fastp2p metadata first; build-engine's ONNX Runtime sidecar too."""
    from .. import outputs
    from ..engines.onnx import describe_onnx
    from ..engines.onnxruntime import ORT_FORMAT, sidecar_path

    d = describe_onnx(path)
    meta = d.pop("fastp2p")
    info = {"format": "fastp2p ONNX export" if meta else "ONNX (not exported by fastp2p)"}
    if meta:
        from ..engines.onnx import check_meta

        info.update(meta)
        try:
            check_meta(meta, path)
        except UserError as e:  # printed, not refused: info is where one looks when a file is refused elsewhere
            info["metadata_problem"] = str(e)
    else:
        info["opset"] = d["opset_import"].get("ai.onnx")  # what fastp2p's metadata records for its own exports
        info["note"] = ("no fastp2p metadata (no fastp2p.format in metadata_props): mode, precision and "
                        "preprocessing unknown; export with `fastp2p export` to get them")
    info.update(d)
    side = outputs.json_object(sidecar_path(path))
    if side is not None and side.get("format") == ORT_FORMAT:
        info["onnxruntime_sidecar"] = {"file": str(sidecar_path(path)), **side}
    return info


def _plan_info(path: Path) -> dict:
    """A TensorRT plan's sidecar (the plan's bytes need TensorRT and its GPU to read, so they are not parsed)."""
    from ..engines.tensorrt import PLAN_FORMAT, sidecar_path

    side = sidecar_path(path)
    if not path.is_file():
        raise UserError(f"FILE {path}: not found")
    if not side.is_file():
        raise UserError(f"FILE {path}: no sidecar {side} beside it, and a plan's own bytes say nothing without "
                        "TensorRT; build the plan with `fastp2p build-engine` (it writes the sidecar), or run "
                        "`fastp2p info` on the .onnx it was built from")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # json.JSONDecodeError, UnicodeDecodeError (a binary file)
        raise UserError(f"{side}: unreadable sidecar of {path.name} ({type(e).__name__}); rebuild the plan with "
                        "`fastp2p build-engine`") from None
    if not isinstance(meta, dict) or meta.get("format") != PLAN_FORMAT:
        raise UserError(f"{side}: not a fastp2p TensorRT sidecar (no format {PLAN_FORMAT!r}); rebuild the plan with "
                        "`fastp2p build-engine`")
    return {"file": str(path), "file_size": path.stat().st_size, "sidecar": str(side),
            "note": "from the sidecar only: the plan's own bytes were not parsed (that takes TensorRT on the GPU "
                    "it was built for)", **meta}


def cmd_info(args) -> int:
    from .. import checkpoint

    path = Path(args.src)
    if path.is_dir():
        raise UserError(f"FILE {path}: is a folder; give a .safetensors, .pth, .onnx, .xml or .plan file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        print(json.dumps(_onnx_info(path), indent=2))
        return 0
    if suffix in (".plan", ".engine", ".trt"):
        print(json.dumps(_plan_info(path), indent=2))
        return 0
    if suffix == ".xml":  # an OpenVINO IR: its <rt_info> read by the XML parser, no OpenVINO needed
        from ..engines.openvino import describe_ir

        print(json.dumps(describe_ir(path), indent=2))
        return 0
    if path.suffix in (".pth", ".pt"):
        from ..models import keys

        sd = keys.strip_wrappers(checkpoint.load_reference_pth(path))
        try:
            depth = keys.num_downs_of_reference(sd)
            kind = {7: "unet_128", 8: "unet_256"}.get(depth, f"{depth}-level U-Net")
        except KeyError:
            kind = "not a reference U-Net generator"
        info = {"format": "reference .pth", "generator": kind, "tensors": len(sd),
                "parameters": sum(v.numel() for k, v in sd.items() if "running_" not in k and "num_batches" not in k)}
        side = checkpoint.read_reference_sidecar(path)
        if side is not None:  # what `convert --to reference` recorded beside it
            info["fastp2p_sidecar"] = {"file": str(checkpoint.reference_sidecar_path(path)), **side}
    else:
        meta, tensors = checkpoint.load(path)
        info = dict(meta)
        info["tensors"] = len(tensors)
        info["parameters"] = {p: sum(v.numel() for k, v in tensors.items() if k.startswith(p + ".")
                                     and "running_" not in k and "num_batches" not in k) for p in ("G", "D")}
    print(json.dumps(info, indent=2))
    return 0


