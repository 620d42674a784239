"""``fastp2p convert`` (reference .pth <-> fastp2p .safetensors) and ``fastp2p info`` (a checkpoint's metadata)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import UserError
from .args import add_arch, add_overwrite, arch_from, check_arch_flags


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="reference .pth <-> fastp2p .safetensors")
    p.add_argument("src", metavar="CHECKPOINT")
    p.add_argument("-o", "--out", required=True,
                   help="output file: G.safetensors (+ its .json sidecar), or with --to reference latest_net_G.pth")
    p.add_argument("--to", choices=("fastp2p", "reference"), default="fastp2p")
    add_overwrite(p, "earlier convert outputs (told by their fastp2p metadata; a .pth by its zip comment)")
    add_arch(p)
    p.set_defaults(func=cmd_convert)


CONVERT_KIND = "convert"  # see fastp2p.outputs: the marker of convert's files


def _convert_output_ours(path: Path) -> bool:
    """An earlier ``convert`` output at ``path``: a .pth with convert's zip comment, a safetensors checkpoint (or its
    .json sidecar) whose fastp2p metadata records the file it was converted from. A trained checkpoint is not."""
    from .. import checkpoint, outputs

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
    from .. import outputs

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

    from .. import checkpoint, outputs
    from ..config import Config
    from ..models import keys

    out = Path(args.out)
    if args.to == "fastp2p" and Path(args.src).suffix.lower() == ".safetensors":
        raise UserError(f"CHECKPOINT {args.src}: already a fastp2p checkpoint; convert it back with --to reference")
    if args.to == "reference":
        check_arch_flags(args, args.src, "CHECKPOINT")
    _check_convert_output(out, args)
    if args.to == "fastp2p":
        model = arch_from(args)
        G = checkpoint.generator_from_reference(checkpoint.load_reference_pth(args.src), model, args.src)
        cfg = Config(model=ModelConfig(netG=model.netG, norm=model.norm, no_dropout=model.no_dropout,
                                       ngf=G.down[0].out_channels, input_nc=G.down[0].in_channels,
                                       output_nc=G.up[0].out_channels))
        with outputs.writing(out, "-o"):
            checkpoint.save(out, cfg=cfg, G=G, extra={"source": str(args.src),
                                                       "source_sha256": checkpoint.file_hash(args.src)})
    else:
        G, cfg = checkpoint.load_generator(args.src, arch_from(args))
        sd = keys.to_reference(G.state_dict(), G.num_downs)

        def write(tmp):  # the reference's own format (a plain state dict), marked by the zip comment only
            torch.save(sd, tmp)
            outputs.mark_zip(tmp, CONVERT_KIND)

        with outputs.writing(out, "-o"):
            checkpoint.atomic_write(out, write)
    print(f"wrote {out}")
    return 0


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("src", metavar="CHECKPOINT")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .. import checkpoint

    path = Path(args.src)
    if path.is_dir():
        raise UserError(f"CHECKPOINT {path}: is a folder; give a .safetensors or .pth file")
    if path.suffix.lower() in (".onnx", ".plan", ".engine", ".trt"):
        raise UserError(f"CHECKPOINT {path}: an exported engine, not a checkpoint; `fastp2p info` reads fastp2p "
                        ".safetensors and reference .pth files")
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
    else:
        meta, tensors = checkpoint.load(path)
        info = dict(meta)
        info["tensors"] = len(tensors)
        info["parameters"] = {p: sum(v.numel() for k, v in tensors.items() if k.startswith(p + ".")
                                     and "running_" not in k and "num_batches" not in k) for p in ("G", "D")}
    print(json.dumps(info, indent=2))
    return 0


