"""Video files and raw-frame pipes through a ``Translator``.

    translate_video("in.mp4", "out.mp4", checkpoint="G.safetensors")      # PyAV decode -> translate -> encode
    fastp2p pipe --size 640x360 --engine G.onnx  < frames.rgb > out.rgb     # raw RGB24 frames, logs on stderr

``translate_video`` keeps the frame count and the frame rate (the output is constant-rate at the input's average
rate), passes audio through untouched (packets remuxed, not re-encoded), and writes H.264 (libx264 when PyAV's FFmpeg
has it, else MPEG-4 Part 2) in yuv420p; an odd width or height loses its last column / row (yuv420p needs even
sizes). A decode error or a truncated file raises a ``DataError`` naming the file, after every frame translated
before the fault has been encoded and the output closed properly.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import outputs
from .errors import DataError, UserError
from .images import check_frame_size, limit_of, too_many

log = logging.getLogger(__name__)
KIND = "translate"  # the container's comment tag marks an earlier output (``fastp2p.outputs``)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv",
                            ".wmv"})


def is_video_path(path) -> bool:
    """The rule ``fastp2p translate`` uses: an existing file whose suffix (any case) is in ``VIDEO_SUFFIXES``."""
    p = Path(path)
    return p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()


def _av():
    try:
        import av
    except ImportError:
        raise UserError("video needs PyAV: pip install 'fastp2p[video]' (or pip install av)") from None
    return av


def video_codec() -> str:
    av = _av()
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def is_our_video(path) -> bool:
    """An earlier ``translate_video`` output: its container's comment tag is ``fastp2p translate`` (mp4, mov, mkv,
    webm and avi keep it; .ts / .mpg have no tags, so replacing one of those needs --overwrite)."""
    av = _av()
    try:
        with av.open(str(path)) as c:
            tags = {str(k).lower(): v for k, v in c.metadata.items()}
    except Exception:  # noqa: BLE001 - anything PyAV cannot open is not ours
        return False
    return tags.get("comment") == outputs.marker(KIND)


def _translator(checkpoint, engine, *, mode, device, model, **kw):
    from .translator import Translator

    if (checkpoint is None) == (engine is None):
        raise UserError("give exactly one of --checkpoint or --engine")
    return Translator(checkpoint if checkpoint is not None else engine, mode=mode, device=device, model=model, **kw)


def _open_input(av, path: Path):
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        inp = av.open(str(path))
    except av.error.FFmpegError as e:
        raise DataError(path, f"cannot open as a video ({e.strerror or e})") from None
    if not inp.streams.video:
        inp.close()
        raise DataError(path, "has no video stream")
    return inp


def _expected_frames(inp, vin, rate) -> int | None:
    """Frames the headers promise: the stream's frame count, else its duration x rate, else (video only) the
    container's duration x rate. None when nothing says."""
    if vin.frames:
        return int(vin.frames)
    if vin.duration and vin.time_base:
        return round(float(vin.duration * vin.time_base) * float(rate))
    if inp.duration and len(inp.streams) == 1:
        return round(inp.duration / 1e6 * float(rate))
    return None


def translate_video(in_path, out_path, *, checkpoint=None, engine=None, batch_size: int = 8, mode=None, device=None,
                    progress: bool = True, model=None, fit: str = "pad", max_latency_ms: float | None = None,
                    translator=None, codec: str | None = None, crf: int = 18, overwrite: bool = False,
                    max_pixels: int | None = None, backend: str | None = None,
                    runtime_options: dict | None = None) -> Path:
    """Translate the video ``in_path`` into ``out_path`` (a file, or a folder: ``<folder>/<stem>.mp4``).

    checkpoint / engine: exactly one (or an open ``translator``). mode: None -> eval for checkpoints (see
    ``fastp2p.translator``). An existing output is replaced only if an earlier one (``is_our_video``) or with
    ``overwrite``; never the input. A frame size over ``max_pixels`` (default ``fastp2p.config.DEFAULT_MAX_PIXELS``)
    is a ``DataError`` before anything is decoded. ``backend``, ``runtime_options`` (threads, ov_precision, ov_hint,
    streams): how an ``engine`` runs (``fastp2p.engines.runtime.open_runtime``). Returns the output path."""
    av = _av()
    in_path = Path(in_path)
    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix.lower() not in VIDEO_SUFFIXES:
        outputs.output_dir(out_path, "-o", inputs=[in_path])
        out_path = out_path / f"{in_path.stem}.mp4"
    outputs.output_file(out_path, "-o", kind=KIND, ours=is_our_video, inputs=[in_path, checkpoint, engine],
                        overwrite=overwrite)
    tr = translator or _translator(checkpoint, engine, mode=mode, device=device, model=model, fit=fit,
                                   backend=backend, **(runtime_options or {}))
    inp = _open_input(av, in_path)
    vin = inp.streams.video[0]
    vin.thread_type = "AUTO"
    ain = inp.streams.audio[0] if inp.streams.audio else None
    W, H = vin.codec_context.width, vin.codec_context.height
    limit = limit_of(max_pixels)
    if W * H > limit:
        inp.close()
        raise too_many(in_path, W, H, limit)
    W2, H2 = W - W % 2, H - H % 2
    if W2 < 2 or H2 < 2:
        inp.close()
        raise DataError(in_path, f"video is {W}x{H}; too small to encode")
    rate = vin.average_rate or vin.guessed_rate or Fraction(25)
    total = vin.frames or None
    try:
        with outputs.writing(out_path, "-o"):
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out = av.open(str(out_path), "w")
    except UserError:
        inp.close()
        raise
    out.metadata["comment"] = outputs.marker(KIND)
    name = codec or video_codec()
    vout = out.add_stream(name, rate=rate)
    vout.width, vout.height, vout.pix_fmt = W2, H2, "yuv420p"
    vout.codec_context.time_base = Fraction(1) / rate
    if name == "libx264":
        vout.options = {"crf": str(crf), "preset": "veryfast"}
    elif name == "mpeg4":
        vout.bit_rate = max(1_000_000, W2 * H2 * 8)
    aout = None
    if ain is not None:
        try:
            aout = out.add_stream_from_template(ain)
        except Exception as e:  # noqa: BLE001 - audio is best effort: the container may not take that codec
            log.warning("%s: audio stream (%s) not passed through: %s", in_path, ain.codec_context.name, e)
    audio: collections.deque = collections.deque()
    streams = [vin] + ([ain] if aout is not None else [])

    expected = _expected_frames(inp, vin, rate)

    def frames():
        decoded = 0
        try:
            for packet in inp.demux(*streams):
                if packet.stream.type == "audio":
                    if packet.dts is not None:
                        audio.append(packet)
                    continue
                for frame in packet.decode():
                    decoded += 1
                    yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise DataError(in_path, f"decoding failed after {decoded} frame(s) ({e.strerror or e})") from None
        if expected and decoded < expected - max(2, expected // 50):
            raise DataError(in_path, f"truncated: its header promises about {expected} frames, only {decoded} "
                                     "could be decoded")

    def mux_audio():
        while audio:
            pkt = audio.popleft()
            pkt.stream = aout
            out.mux(pkt)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc=in_path.name, file=sys.stderr, dynamic_ncols=True)
    n = 0
    error: BaseException | None = None
    t0 = time.perf_counter()
    try:
        for y in tr.stream(frames(), batch_size=batch_size, max_latency_ms=max_latency_ms):
            if y.shape[0] != H2 or y.shape[1] != W2:
                y = y[:H2, :W2]
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(y), format="rgb24")
            vf.pts = n
            vf.time_base = vout.codec_context.time_base
            out.mux(vout.encode(vf))
            n += 1
            if bar is not None:
                bar.update(1)
            if aout is not None:
                mux_audio()
    except BaseException as e:
        error = e
    finally:
        try:
            out.mux(vout.encode(None))
            if aout is not None:
                mux_audio()
        finally:
            out.close()
            inp.close()
            if bar is not None:
                bar.close()
    if error is not None:
        if isinstance(error, DataError):
            raise DataError(in_path, f"{error.problem}; the {n} frame(s) translated before it were written to "
                                     f"{out_path}") from None
        raise error
    if total and n != total:
        log.warning("%s: header says %d frames, decoded %d", in_path, total, n)
    dt = time.perf_counter() - t0
    log.info("%s -> %s: %d frames in %.1fs (%.1f frames/s)", in_path, out_path, n, dt, n / max(dt, 1e-9))
    return out_path


# ---- raw-frame pipe ------------------------------------------------------------------------------------------------

def parse_size(text: str, max_pixels: int | None = None) -> tuple[int, int]:
    """'WxH' -> (W, H), both positive and W x H at most ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``: a frame
    buffer is allocated from it); else a ``UserError`` naming --size."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX:]\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. --size 640x360")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 1 or h < 1:
        raise UserError(f"--size {text}: width and height must be positive")
    check_frame_size(w, h, max_pixels, f"--size {text}")
    return w, h


def read_raw_frames(stream, width: int, height: int, *, name: str = "<stdin>"):
    """Yield uint8 H,W,3 frames read from a binary stream of raw RGB24; a short last frame raises ``DataError``."""
    size = width * height * 3
    while True:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            k = stream.readinto(view[got:]) if hasattr(stream, "readinto") else None
            if k is None:
                chunk = stream.read(size - got)
                k = len(chunk)
                view[got:got + k] = chunk
            if not k:
                break
            got += k
        if got == 0:
            return
        if got < size:
            raise DataError(name, f"last frame is partial: {got} of {size} bytes (a {width}x{height} RGB24 frame); "
                                  "check --size")
        yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)


def run_pipe(translator, width: int, height: int, *, stdin=None, stdout=None, batch_size: int = 4,
             max_latency_ms: float | None = 100.0) -> int:
    """Raw RGB24 frames on ``stdin`` -> translated raw RGB24 frames on ``stdout``; returns the frame count. Frames
    translated before an error are written and flushed before it is raised."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    n = 0
    try:
        for y in translator.stream(read_raw_frames(stdin, width, height), batch_size=batch_size,
                                   max_latency_ms=max_latency_ms):
            stdout.write(np.ascontiguousarray(y).data)
            n += 1
            if translator.stats.get("yielded", 0) >= translator.stats.get("read", 0):
                stdout.flush()  # nothing else in flight: let a live consumer see it now
    except DataError as e:
        raise DataError(e.path, f"{e.problem}; the {n} frame(s) before it were written") from None
    except BrokenPipeError:
        _silence_stdout(stdout)
        raise UserError(f"stdout was closed by the reader after {n} frame(s)") from None
    finally:
        try:
            stdout.flush()
        except BrokenPipeError:
            _silence_stdout(stdout)
    return n


def _silence_stdout(stdout) -> None:
    # the reader is gone: point fd 1 at /dev/null so the interpreter's exit-time flush does not fail again
    import os

    try:
        if stdout is sys.stdout.buffer:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
