"""docs/deploy.md: speed and quality of every deployment path side by side, with a picture.

    python -m fastp2p.bench.deploy --teacher runs/teacher/checkpoints/latest.safetensors \
        --student runs/student16/checkpoints/latest.safetensors --bench bench-infer.json [--data DIR] [--work DIR]

Quality (this script): the INT8 export of the teacher through `fastp2p export --precision int8 --calib <data>/train`
(its own quality gate on `<data>/val`), and the student, each scored against the fp32 teacher on the val split with
`fastp2p.gate.score_against_reference` (deterministic: eval mode as the bench rows, the same inputs); the
L1/PSNR/SSIM of each to the real targets beside them. Speed: the rows of a
`fastp2p bench infer --teacher T --students S --json` run (interleaved against the teacher's eager fp32 in one
process), read from ``--bench``. The picture: input | teacher fp32 | teacher INT8 | student | target on the first val
pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PATHS = (  # (model key in the bench rows, runtime, precision, what)
    ("unet_256-ngf64", "torch-eager", "fp32", "teacher, eager torch (the baseline)"),
    ("unet_256-ngf64", "fastp2p", "fp32", "teacher, fastp2p torch"),
    ("unet_256-ngf64", "fastp2p", "bf16", "teacher, fastp2p torch bf16"),
    ("unet_256-ngf64", "onnxruntime", "fp32", "teacher, ONNX Runtime"),
    ("unet_256-ngf64", "openvino", "fp32", "teacher, OpenVINO"),
    ("unet_256-ngf64", "openvino", "bf16", "teacher, OpenVINO bf16"),
    ("unet_256-ngf64", "onnxruntime", "int8", "teacher INT8, ONNX Runtime"),
    ("unet_256-ngf64", "openvino", "int8", "teacher INT8, OpenVINO"),
    ("unet_256-ngf32", "fastp2p", "bf16", "student ngf 32, fastp2p torch bf16"),
    ("unet_256-ngf32", "openvino", "int8", "student ngf 32 INT8, OpenVINO"),
    ("unet_256-ngf16", "fastp2p", "fp32", "student ngf 16, fastp2p torch"),
    ("unet_256-ngf16", "fastp2p", "bf16", "student ngf 16, fastp2p torch bf16"),
    ("unet_256-ngf16", "openvino", "fp32", "student ngf 16, OpenVINO"),
    ("unet_256-ngf16", "openvino", "int8", "student ngf 16 INT8, OpenVINO"),
)


def _row(rows: list[dict], model: str, runtime: str, precision: str, batch: int) -> dict | None:
    return next((r for r in rows if r.get("section") == "infer" and r.get("model") == model
                 and r.get("runtime") == runtime and r.get("precision") == precision and r.get("batch") == batch
                 and not r.get("skipped")), None)


def _speed(r: dict | None) -> tuple[str, str]:
    if r is None:
        return "-", "-"
    return f"{r['p50_ms']:.1f}", f"{r['speedup']:.2f}x"


def _q(s: dict | None, key: str, nd: int = 2) -> str:
    return "-" if s is None or s.get(key) is None else f"{s[key]:.{nd}f}"


def quality(args, work: Path, log=print) -> dict:
    from fastp2p.engines.onnx import read_onnx_meta

    from fastp2p.cli.main import main as cli
    from fastp2p.gate import score_against_reference

    val, train = args.data / "val", args.data / "train"
    int8 = work / "G.int8.onnx"
    res: dict = {}
    if (work / "quality.json").is_file() and int8.is_file() and not args.rescore:  # scored already: reuse
        return json.loads((work / "quality.json").read_text())
    if not int8.is_file():
        t0 = time.perf_counter()
        argv = ["export", str(args.teacher), "-o", str(int8), "--mode", "eval", "--precision", "int8", "--calib",
                str(train),
                "--gate_data", str(val), "--min_psnr", "0"]  # bar 0: this script records the score, it never refuses
        log("$ fastp2p " + " ".join(argv))
        if cli(argv) != 0:
            raise SystemExit("int8 export failed")
        res["int8_export_s"] = time.perf_counter() - t0
    res["int8_meta"] = {k: read_onnx_meta(int8).get(k) for k in ("quantization", "quality_gate")}
    res["int8"] = res["int8_meta"]["quality_gate"]  # the export's own gate: the same scores on the same val split
    log(f"scoring the student against the teacher on {val}")
    res["student"] = score_against_reference(args.student, args.teacher, val, batch_size=4, mode="eval")
    return res


def picture(args, work: Path, dst: Path, n: int = 4) -> None:
    """input | teacher | teacher INT8 | student | target, the first ``n`` val pairs, eval mode (as the bench)."""
    import torch
    from fastp2p.engines.runtime import open_runtime

    from fastp2p.scoring import folder_pairs

    nets = [("teacher fp32", open_runtime(args.teacher, mode="eval")),
            ("teacher INT8", open_runtime(work / "G.int8.onnx", backend="auto")),
            ("student ngf 16", open_runtime(args.student, mode="eval"))]
    m = nets[0][1].meta
    rows = []
    for pair in folder_pairs(args.data / "val", n)[1]:
        src, tgt = pair.load(m["direction"], m["crop_size"], m["input_nc"], m["output_nc"])
        outs = [net.frames(torch.from_numpy(src.copy())[None])[0].numpy() for _, net in nets]
        rows.append(np.concatenate([src, *outs, tgt], axis=1))
    grid = np.concatenate(rows, axis=0)
    head = 22
    img = Image.new("RGB", (grid.shape[1], grid.shape[0] + head), "white")
    img.paste(Image.fromarray(grid), (0, head))
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(["input (labels)", *[k for k, _ in nets], "target (photo)"]):
        draw.text((i * m["crop_size"] + 6, 5), name, fill="black")
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, quality=90)


def _argv(bench: dict) -> str:
    argv = bench.get("config", {}).get("argv")
    return "fastp2p " + " ".join(argv) if isinstance(argv, list) else "fastp2p bench infer"


def _openvino_version(env: dict) -> str:
    if env.get("openvino"):
        return env["openvino"]
    try:
        import openvino

        return openvino.__version__.split("-")[0]
    except ImportError:
        return "?"


def write_doc(args, q: dict, bench: dict, grid: Path, loaded: dict | None = None) -> None:
    rows = bench["rows"]
    env = bench.get("env", {})
    t, s = q["int8"], q["student"]
    lines = [
        "# Deployment: INT8 engines and distilled students, speed and quality side by side", "",
        "Regenerate: `fastp2p bench infer --teacher T --students S --json bench-infer.json` (speed), then "
        "`python -m fastp2p.bench.deploy --teacher T --student S --bench bench-infer.json` (quality, this page, the "
        "picture).", "",
        f"Speed: {env.get('cpu', 'CPU')} ({env.get('cores', '?')} cores), torch {env.get('torch', '?')}, "
        f"onnxruntime {env.get('onnxruntime', '?')}, openvino {_openvino_version(env)}; unet_256 at 256x256, eval "
        "mode, ms per call (p50 of interleaved calls), speedup against the teacher's eager fp32 torch in the same run "
        f"(`{_argv(bench)}`, {bench.get('time', '')}, quiet machine)"
        + ("" if loaded is None else f"; the last column: the same run beside one busy process (`{_argv(loaded)}`)")
        + ".", "",
        "Quality: facades val (100 pairs, labels -> photo), eval mode as the speed rows (running statistics folded, "
        "no dropout: deterministic); PSNR/SSIM against the fp32 teacher's outputs on the same inputs, and "
        f"L1/PSNR/SSIM against the real photos (the teacher's own: L1 {_q(t, 'reference_l1', 4)}, PSNR "
        f"{_q(t, 'reference_psnr')} dB, SSIM "
        f"{_q(t, 'reference_ssim', 3)}).", "",
        "| path | b1 ms | b1 vs eager | b8 ms | b8 vs eager | b8 img/s | PSNR vs teacher | L1 to targets |"
        + ("" if loaded is None else " b1 / b8 vs eager, 1 busy neighbour |"),
        "|---|---|---|---|---|---|---|---|" + ("" if loaded is None else "---|"),
    ]
    for model, runtime, prec, what in PATHS:
        r1, r8 = _row(rows, model, runtime, prec, 1), _row(rows, model, runtime, prec, 8)
        if r1 is None and r8 is None:
            continue
        sc = t if (model.endswith("ngf64") and prec == "int8") else s if model.endswith("ngf16") and \
            prec in ("fp32", "int8") else None
        teacher_fp32 = model.endswith("ngf64") and prec == "fp32"
        psnr = "(= teacher)" if teacher_fp32 else _q(sc, "psnr_ref") + " dB" \
            if sc is not None and not (model.endswith("ngf16") and prec == "int8") else "-"
        l1 = _q(t, "reference_l1", 4) if teacher_fp32 else _q(sc, "l1", 4) if sc is not None and psnr != "-" else "-"
        note = (r1 or r8).get("note") or ""
        if runtime == "fastp2p" and note:
            what = f"{what} ({note.split(',')[0]})"
        ms1, x1 = _speed(r1)
        ms8, x8 = _speed(r8)
        ips = f"{r8['img_per_s']:.1f}" if r8 else "-"
        extra = ""
        if loaded is not None:
            n1, n8 = (_row(loaded["rows"], model, runtime, prec, b) for b in (1, 8))
            extra = f" {_speed(n1)[1]} / {_speed(n8)[1]} |"
        lines.append(f"| {what} | {ms1} | {x1} | {ms8} | {x8} | {ips} | {psnr} | {l1} |{extra}")
    g = q["int8_meta"].get("quality_gate") or {}
    qz = q["int8_meta"].get("quantization") or {}
    lines += [
        "", "bf16 rows compute in bf16 from the fp32 weights: they differ from their fp32 rows by bf16 rounding only "
        "(max abs error against eager fp32 in the bench JSON, <= 2e-2; not scored here); the student's INT8 row is "
        "its speed only (a student INT8 file was not gated here).", "",
        f"- **INT8 teacher**: {qz.get('tool', 'onnxruntime.quantization')} static QDQ, {qz.get('method', 'minmax')}, "
        f"per-channel weights, symmetric int8 activations, calibrated on {qz.get('calib_images', '?')} facades train "
        f"images; its own export gate scored PSNR {_q(g, 'psnr_ref')} dB (worst image {_q(g, 'psnr_ref_min')}) "
        f"against the teacher on {g.get('images', '?')} val images. Target: >= 35 dB.",
        f"- **Student ngf 16** (`fastp2p distill`, {args.student_steps} steps, the teacher's budget): PSNR "
        f"{_q(s, 'psnr_ref')} dB against the teacher; L1 to the targets {_q(s, 'l1', 4)} vs the teacher's "
        f"{_q(s, 'reference_l1', 4)} ({(s['l1'] / s['reference_l1'] - 1) * 100:+.1f}%; target: within 10%).", "",
        f"![input, teacher fp32, teacher INT8, student ngf 16, target]({grid.name})", "",
        "Columns: label map (input) | teacher fp32 | teacher INT8 | student ngf 16 | photo (target), the first four "
        "val pairs.", ""]
    args.doc.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--student_steps", type=int, default=1600)
    p.add_argument("--bench", type=Path, required=True, help="a `fastp2p bench infer --json` file")
    p.add_argument("--bench_loaded", type=Path, default=None,
                   help="the same bench run with --neighbours 1 (a column of its speedups)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/facades")
    p.add_argument("--work", type=Path, default=Path("runs/deploy"))
    p.add_argument("--rescore", action="store_true", help="score again even if --work holds quality.json")
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs/deploy.md")
    args = p.parse_args(argv)
    if not (args.data / "val").is_dir():
        print(f"--data {args.data}: no val/ split there", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    q = quality(args, args.work)
    (args.work / "quality.json").write_text(json.dumps(q, indent=2) + "\n")
    grid = args.doc.parent / "deploy_samples.jpg"
    picture(args, args.work, grid)
    loaded = json.loads(args.bench_loaded.read_text()) if args.bench_loaded else None
    write_doc(args, q, json.loads(args.bench.read_text()), grid, loaded)
    print(f"wrote {args.doc} and {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
