"""Video benchmark: end-to-end frames/s of ``translate_video`` against inference-only frames/s, same frames, same
backend, same ``Translator``.

    python -m fastp2p.bench.video [--quick] [--backend torch|onnxruntime] [--size 256x256] [--frames 48]
                                  [--batch_size 8] [--ngf 64] [--rounds 3] [--device cpu|cuda] [--json PATH]

inference-only: the decoded frames sit in memory as uint8 H,W,C; the clock covers ``Translator.__call__`` on batches
of ``--batch_size`` (host-to-device, pre-processing, the generator, post-processing, device-to-host): what a frame
costs with no decoding or encoding at all. It runs once from the main thread and once from a worker thread each round
and the faster counts (torch on CPU was measured up to ~1.4x faster from a non-main thread here, which would otherwise
flatter the threaded end-to-end run). end-to-end: ``translate_video`` on the H.264 file (PyAV decode, RGB
conversion, the same batches through ``Translator.stream``, yuv420p conversion, libx264 encode, mux). Rounds
interleave the two; medians are reported. Target (issue 6): end-to-end >= 80% of inference-only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_video(path: Path, n: int, w: int, h: int, fps: int = 25) -> Path:
    import av

    from fastp2p.video import video_codec

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    out = av.open(str(path), "w")
    s = out.add_stream(video_codec(), rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):  # a slowly scrolling block pattern: a realistic amount of motion for the encoder
        f = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))[:h, :w]
        out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
    out.mux(s.encode(None))
    out.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastp2p.bench.video", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run: ngf 32, 24 frames, 2 rounds")
    ap.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    ap.add_argument("--size", default="256x256", help="video WxH (default 256x256, the model's crop size)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.ngf, args.frames, args.rounds = 32, 24, 2

    import av

    from fastp2p.checkpoint import save
    from fastp2p.config import Config, DataConfig, ModelConfig
    from fastp2p.models import build_generator
    from fastp2p.translator import Translator
    from fastp2p.video import parse_size, translate_video, video_codec

    w, h = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="fastp2p-bench-video-"))
    torch.manual_seed(0)
    cfg = Config(ModelConfig(netG="unet_256", ngf=args.ngf), DataConfig(crop_size=256))
    ckpt = save(work / "G.safetensors", cfg=cfg, G=build_generator("unet_256", ngf=args.ngf))
    src = ckpt
    if args.backend == "onnxruntime":
        from fastp2p.engines.onnx import export_onnx

        src = export_onnx(ckpt, work / "G.onnx", mode="eval", dynamic=True)
    tr = Translator(src, device=args.device)
    video = make_video(work / "in.mp4", args.frames, w, h)
    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    n = len(frames)
    batches = [np.stack(frames[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
    tr(batches[0])  # warm-up

    def sync():
        if tr.device.type == "cuda":
            torch.cuda.synchronize()

    def infer_all(out: list):
        sync()
        t = time.perf_counter()
        for b in batches:
            tr(b)
        sync()
        out.append(time.perf_counter() - t)

    import threading

    infer_main_s, infer_thread_s, infer_s, e2e_s = [], [], [], []
    for _ in range(args.rounds):
        # inference-only, twice: from the main thread and from a worker thread (where Translator.stream runs the
        # model; on some machines torch is measurably faster there); the baseline is the faster of the two
        infer_all(infer_main_s)
        th = threading.Thread(target=infer_all, args=(infer_thread_s,))
        th.start()
        th.join()
        infer_s.append(min(infer_main_s[-1], infer_thread_s[-1]))
        t = time.perf_counter()
        translate_video(video, work / "out.mp4", translator=tr, batch_size=args.batch_size, progress=False)
        e2e_s.append(time.perf_counter() - t)
    with av.open(str(work / "out.mp4")) as c:
        assert c.streams.video[0].frames == n, "frame count not preserved"
    fps_inf = n / statistics.median(infer_s)
    fps_e2e = n / statistics.median(e2e_s)
    res = {
        "bench": "video", "backend": tr.runtime.backend, "device": str(tr.device), "mode": tr.meta["mode"],
        "model": f"unet_256 ngf={args.ngf}", "size": f"{w}x{h}", "frames": n, "batch_size": args.batch_size,
        "codec": video_codec(), "rounds": args.rounds, "inference_only_s": infer_s,
        "inference_only_main_thread_s": infer_main_s, "inference_only_worker_thread_s": infer_thread_s,
        "end_to_end_s": e2e_s,
        "inference_only_fps": round(fps_inf, 2), "end_to_end_fps": round(fps_e2e, 2),
        "ratio": round(fps_e2e / fps_inf, 3), "target_ratio": 0.8,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    }
    print("| backend | size | frames | batch | inference-only fps | end-to-end fps | e2e / inference |",
          file=sys.stderr)
    print("| --- | --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    print(f"| {res['backend']} ({res['device']}, {res['model']}) | {res['size']} | {n} | {args.batch_size} | "
          f"{fps_inf:.2f} | {fps_e2e:.2f} | {res['ratio']:.0%} (target 80%) |", file=sys.stderr)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
