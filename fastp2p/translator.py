"""``Translator``: uint8 video frames in, uint8 frames out, over any backend of ``fastp2p.engines.runtime``.

    tr = Translator("G.safetensors")                   # or G.onnx (ONNX Runtime), G.plan (TensorRT)
    out = tr(frames)                                   # uint8 N,H,W,C (numpy / torch / DLPack) -> same size
    for y in tr.stream(frame_iter, batch_size=8):      # batched, pipelined, in input order
        ...

Mode for video: built from a *checkpoint*, a Translator defaults to ``mode="eval"``: running batch-norm statistics and
no dropout, so a frame's output depends on that frame only and is deterministic, which is what keeps video from
flickering (the paper's test-time recipe, ``mode="paper"``, normalizes each frame with its own statistics and draws a
new dropout mask every call). Pass ``mode="paper"`` to get the reference's ``test.py`` behaviour. Exported engines have
their mode baked in and keep it.

Any frame size: ``fit="pad"`` (default) letterboxes (edge-replicate pad, after an aspect-preserving resize when the
engine takes one fixed size) to a size the model accepts; ``fit="resize"`` stretches to it. Either way the output is
cropped / resized back to the input's size. Models with dynamic height and width (checkpoints, ``--dynamic`` exports)
run at the frame's own resolution rounded up (pad) or to the nearest (resize) multiple of ``size_multiple``, unless
``size=`` sets a working box.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)

FITS = ("pad", "resize")
CHANNELS = ("rgb", "bgr")
_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _as_tensor(frames) -> tuple[torch.Tensor, str]:
    """frames -> (uint8 tensor, kind) where kind is how to give results back: numpy or torch."""
    if isinstance(frames, torch.Tensor):
        return frames, "torch"
    if isinstance(frames, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(frames)), "numpy"
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise UserError("frames: empty list")
        if isinstance(frames[0], torch.Tensor):
            return torch.stack(list(frames)), "torch"
        return torch.from_numpy(np.stack([np.asarray(f) for f in frames])), "numpy"
    if hasattr(frames, "__dlpack__"):
        return torch.from_dlpack(frames), "torch"
    raise UserError(f"frames must be a numpy array, a torch tensor or a DLPack tensor, got {type(frames).__name__}")


class Translator:
    """Translate uint8 H,W,C frames with a pix2pix generator (see the module doc).

    source: a checkpoint (.safetensors / reference .pth), an .onnx, an OpenVINO .xml, a TensorRT .plan, or an open
    ``Generator``. mode: None -> ``eval`` for checkpoints (temporal stability), the baked-in mode for exports.
    threads, backend, ov_precision, ov_hint, streams: how an .onnx / .xml runs (``open_runtime``).
    fit: "pad" | "resize". channels: "rgb" | "bgr" (input and output use the same order).
    size: working box (int or (h, w)); None -> native size for dynamic models, crop_size for fixed engines.
    """

    def __init__(self, source, *, device=None, mode: str | None = None, dropout: bool | None = None, model=None,
                 fit: str = "pad", channels: str = "rgb", size=None, crop_size: int | None = None,
                 direction: str | None = None, threads: int | None = None, backend: str | None = None,
                 ov_precision: str | None = None, ov_hint: str | None = None, streams: int | None = None):
        from .engines.runtime import TORCH_SUFFIXES, Generator, open_runtime

        if fit not in FITS:
            raise UserError(f"fit={fit!r}: choose one of {', '.join(FITS)}")
        if channels not in CHANNELS:
            raise UserError(f"channels={channels!r}: choose one of {', '.join(CHANNELS)}")
        if isinstance(source, Generator):
            self.runtime = source
        else:
            path = Path(source)
            if mode is None and path.suffix.lower() in TORCH_SUFFIXES:
                mode = "eval"
            self.runtime = open_runtime(path, device=device, mode=mode, dropout=dropout, model=model,
                                        crop_size=crop_size, direction=direction, threads=threads,
                                        backend=backend, ov_precision=ov_precision, ov_hint=ov_hint,
                                        streams=streams)
        self.meta = self.runtime.meta
        self.device = self.runtime.device
        self.fit, self.channels = fit, channels
        k = self.meta["size_multiple"]
        self.dynamic = bool(self.meta["dynamic_hw"]) or self.runtime.backend.startswith("torch")
        if size is not None:
            size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
            if size[0] % k or size[1] % k or min(size) < k:
                raise UserError(f"size={size}: height and width must be positive multiples of {k}")
            if not self.dynamic and size != (self.meta["crop_size"],) * 2:
                raise UserError(f"size={size}: this {self.runtime.backend} engine takes {self.meta['crop_size']}x"
                                f"{self.meta['crop_size']} only")
        self.size = size
        self.stats: dict = {}

    def __repr__(self) -> str:
        return f"Translator({self.runtime!r}, fit={self.fit}, channels={self.channels})"

    # ---- geometry -----------------------------------------------------------------------------------------------
    def plan(self, H: int, W: int) -> dict:
        """How an H x W frame reaches the model: {"scaled": (h, w), "padded": (h, w), "offset": (top, left)}."""
        k = self.meta["size_multiple"]
        box = self.size
        if box is None and not self.dynamic:
            box = (self.meta["crop_size"],) * 2
        if box is None:  # native resolution, aligned to the multiple
            if self.fit == "pad":
                th, tw = math.ceil(H / k) * k, math.ceil(W / k) * k
                return {"scaled": (H, W), "padded": (th, tw), "offset": ((th - H) // 2, (tw - W) // 2)}
            th, tw = max(k, round(H / k) * k), max(k, round(W / k) * k)
            return {"scaled": (th, tw), "padded": (th, tw), "offset": (0, 0)}
        if self.fit == "resize":
            return {"scaled": box, "padded": box, "offset": (0, 0)}
        s = min(box[0] / H, box[1] / W)
        h, w = min(box[0], max(1, round(H * s))), min(box[1], max(1, round(W * s)))
        return {"scaled": (h, w), "padded": box, "offset": ((box[0] - h) // 2, (box[1] - w) // 2)}

    # ---- stages -------------------------------------------------------------------------------------------------
    def prepare(self, frames) -> tuple[torch.Tensor, dict]:
        """uint8 N,H,W,C (or H,W,C) -> (float N,C,h,w in [-1, 1] on the device, plan); the host-to-device copy."""
        x, kind = _as_tensor(frames)
        single = x.dim() == 3
        if single:
            x = x[None]
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3, 4):
            raise UserError(f"frames must be uint8 H,W,C or N,H,W,C with 1, 3 or 4 channels, got {x.dtype} of "
                            f"shape {tuple(x.shape)}")
        N, H, W, C = x.shape
        in_device = x.device
        if C == 4:
            x = x[..., :3]
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if self.channels == "bgr" and x.shape[1] == 3:
            x = x.flip(1)
        nc = self.meta["input_nc"]
        if nc == 1 and x.shape[1] == 3:
            x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        elif nc == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        p = self.plan(H, W)
        if p["scaled"] != (H, W):
            x = F.interpolate(x, size=p["scaled"], mode="bilinear", antialias=True, align_corners=False)
        if p["padded"] != p["scaled"]:
            (ph, pw), (sh, sw), (top, left) = p["padded"], p["scaled"], p["offset"]
            x = F.pad(x, (left, pw - sw - left, top, ph - sh - top), mode="replicate")
        p.update(size=(H, W), kind=kind, single=single, in_device=in_device)
        return x.contiguous(), p

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime(x)

    def finish(self, y: torch.Tensor, p: dict, *, to_host: bool = True):
        """Model output -> uint8 N,H,W,C at the input's size (numpy for numpy input, else torch)."""
        (ph, pw), (sh, sw), (top, left), (H, W) = p["padded"], p["scaled"], p["offset"], p["size"]
        if (sh, sw) != (ph, pw):
            y = y[:, :, top:top + sh, left:left + sw]
        if (sh, sw) != (H, W):
            y = F.interpolate(y, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        if y.shape[1] == 1:
            y = y.expand(-1, 3, -1, -1)
        if self.channels == "bgr":
            y = y.flip(1)
        out = ((y.clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8).permute(0, 2, 3, 1)
        if p["kind"] == "numpy":
            out = out.cpu().contiguous().numpy()
        elif to_host or p["in_device"] != out.device:
            out = out.to(p["in_device"]).contiguous()
        return out[0] if p["single"] else out

    def __call__(self, frames):
        """A batch of uint8 H,W,C frames (N,H,W,C, a list of same-size frames, or one H,W,C frame) -> the same
        shape, translated. numpy in -> numpy out; torch / DLPack in -> torch out on the input's device."""
        x, p = self.prepare(frames)
        return self.finish(self.infer(x), p)

    # ---- streaming ----------------------------------------------------------------------------------------------
    def stream(self, frames: Iterable, *, batch_size: int = 8, max_latency_ms: float | None = None,
               queue_batches: int = 2) -> Iterator[np.ndarray]:
        """Translate an iterable of uint8 H,W,C frames, yielding uint8 H,W,C numpy frames in input order.

        Four stages run concurrently, joined by bounded queues (back-pressure: at most about
        ``(5 + 2 * queue_batches) * batch_size + 1`` frames are read but not yet yielded, whatever the source's length):
        reading the source (decoding), batching + host-to-device copy + pre-processing, inference + post-processing
        + device-to-host copy, and the consumer of this generator (encoding). A partial batch goes out when
        ``max_latency_ms`` passes without the batch filling up (None: only at a size change or the end). An
        exception raised by the source surfaces here after every frame read before it has been yielded."""
        if batch_size < 1:
            raise UserError(f"--batch_size {batch_size}: must be >= 1")
        stop = threading.Event()
        q_in: queue.Queue = queue.Queue(maxsize=2 * batch_size)
        q_x: queue.Queue = queue.Queue(maxsize=queue_batches)
        q_y: queue.Queue = queue.Queue(maxsize=queue_batches)
        stats = self.stats = {"read": 0, "yielded": 0, "max_in_flight": 0, "batches": 0}
        latency = None if max_latency_ms is None else max_latency_ms / 1000.0

        def put(q: queue.Queue, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader():
            try:
                for f in frames:
                    stats["read"] += 1
                    stats["max_in_flight"] = max(stats["max_in_flight"], stats["read"] - stats["yielded"])
                    if not put(q_in, f):
                        return
                put(q_in, _END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, in order
                put(q_in, _Failure(e))

        def batcher():
            pending: list = []
            tail = None
            deadline = 0.0
            try:
                while not stop.is_set():
                    timeout = 0.1
                    if pending and latency is not None:
                        timeout = max(0.0, deadline - time.perf_counter())
                    try:
                        item = q_in.get(timeout=timeout)
                    except queue.Empty:
                        if pending and latency is not None and time.perf_counter() >= deadline:
                            put(q_x, self.prepare(pending))
                            pending = []
                        continue
                    if item is _END or isinstance(item, _Failure):
                        tail = item
                        break
                    shape = np.shape(item)
                    if pending and shape != np.shape(pending[0]):
                        put(q_x, self.prepare(pending))
                        pending = []
                    if not pending:
                        deadline = time.perf_counter() + (latency or 0.0)
                    pending.append(item)
                    if len(pending) >= batch_size:
                        put(q_x, self.prepare(pending))
                        pending = []
                if pending:
                    put(q_x, self.prepare(pending))
            except BaseException as e:  # noqa: BLE001
                tail = _Failure(e)
            put(q_x, tail if tail is not None else _END)

        def worker():
            while not stop.is_set():
                try:
                    item = q_x.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END or isinstance(item, _Failure):
                    put(q_y, item)
                    return
                try:
                    x, p = item
                    p = dict(p, kind="numpy", single=False)
                    y = self.finish(self.infer(x), p)
                    stats["batches"] += 1
                except BaseException as e:  # noqa: BLE001
                    put(q_y, _Failure(e))
                    return
                put(q_y, y)

        threads = [threading.Thread(target=t, name=f"fastp2p-{t.__name__}", daemon=True)
                   for t in (reader, batcher, worker)]
        for t in threads:
            t.start()
        try:
            while True:
                item = q_y.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                for f in item:
                    stats["yielded"] += 1
                    yield f
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)

