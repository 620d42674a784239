"""One ``Generator`` interface over torch (eager or ``torch.compile``), ONNX Runtime, OpenVINO and TensorRT.

    rt = open_runtime("G.plan")            # or G.onnx, G.safetensors, latest_net_G.pth
    y = rt(x)                              # float NCHW in [-1, 1] -> float32 NCHW in [-1, 1], on rt.device
    frames_out = rt.frames(frames_uint8)   # uint8 (N,)H,W,C -> uint8 N,H,W,C; pre/post-processing on rt.device
    rt.meta["crop_size"], rt.meta["direction"], rt.meta["input_nc"], rt.meta["mode"]

``open_runtime`` picks the backend by suffix: ``.safetensors`` / ``.pth`` / ``.pt`` -> torch, ``.onnx`` -> ONNX
Runtime (or OpenVINO with ``backend="openvino"``), ``.plan`` / ``.engine`` -> TensorRT. An exported file has its mode
(and paper-mode dropout) baked in:
``mode`` / ``dropout`` left as None take it from the file; given and different, they raise a ``UserError`` that says
how to re-export. For checkpoints they choose the mode as ``translate`` does (default paper, dropout on).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastp2p.config import ModelConfig
from fastp2p.errors import UserError
from fastp2p.inference import MODES, to_model_input, to_uint8
from fastp2p.models.unet import size_problem

TORCH_SUFFIXES = (".safetensors", ".pth", ".pt")
ONNX_SUFFIXES = (".onnx",)
TRT_SUFFIXES = (".plan", ".engine", ".trt")
ONNX_BACKENDS = ("onnxruntime", "openvino")  # what runs an .onnx (``open_runtime(backend=...)``, ``--backend``)


def _flat_meta(*, backend: str, mode: str, dropout: bool, precision: str, preprocessing: dict, arch: dict,
               dynamic_hw: bool, checkpoint_sha256: str = "", source: str = "") -> dict:
    return {"backend": backend, "mode": mode, "dropout": bool(dropout), "precision": precision,
            "crop_size": int(preprocessing["crop_size"]), "direction": preprocessing.get("direction", "AtoB"),
            "input_nc": int(arch["input_nc"]), "output_nc": int(arch["output_nc"]),
            "size_multiple": 2 ** int(arch["num_downs"]), "dynamic_hw": bool(dynamic_hw),
            "preprocessing": preprocessing, "arch": arch, "checkpoint_sha256": checkpoint_sha256, "source": source}


class Generator:
    """Base class: ``__call__`` checks the batch, runs the backend (``_run``) and returns float32."""

    backend = "base"
    meta: dict
    device: torch.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self._run(x).float()

    def _run(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        m = self.meta
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise UserError(f"the generator takes a float N,C,H,W tensor in [-1, 1], got "
                            f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
        N, C, H, W = x.shape
        if C != m["input_nc"]:
            raise UserError(f"input has {C} channels, the generator takes {m['input_nc']}")
        if m["dynamic_hw"] or self.backend == "torch":
            if H % m["size_multiple"] or W % m["size_multiple"]:
                raise UserError(f"input is {H}x{W}: height and width must be multiples of {m['size_multiple']}")
        elif (H, W) != (m["crop_size"], m["crop_size"]):
            raise UserError(f"input is {H}x{W}, but this {self.backend} engine takes {m['crop_size']}x"
                            f"{m['crop_size']} only (re-export with --dynamic for other sizes)")

    def frames(self, frames, *, resize: bool = False) -> torch.Tensor:
        """uint8 (N,)H,W,C frames (numpy or torch) -> uint8 N,H,W,C on ``self.device``. ``resize=True`` resizes
        frames of another size to ``crop_size`` (bicubic, antialiased) on the device first."""
        x = torch.as_tensor(frames)
        if x.dtype != torch.uint8 or x.dim() not in (3, 4):
            raise UserError(f"frames must be uint8 H,W,C or N,H,W,C, got {x.dtype} of shape {tuple(x.shape)}")
        x = to_model_input(x.to(self.device, non_blocking=True))
        s = self.meta["crop_size"]
        if resize and tuple(x.shape[2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp_(-1, 1)
        return to_uint8(self(x))

    def __repr__(self) -> str:
        m = self.meta
        return (f"{type(self).__name__}({m.get('source', '')!r}, {self.backend}, {m['mode']} mode, {m['precision']}, "
                f"device={self.device})")


class TorchGenerator(Generator):
    backend = "torch"

    def __init__(self, G, *, meta: dict, device: str | torch.device = "cpu", compile: bool = False):
        from fastp2p.inference import with_mode

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        self.meta = meta
        self.module = with_mode(G, meta["mode"], dropout=meta["dropout"], inplace=True).to(self.device)
        self.compiled = compile
        self.fn = torch.compile(self.module, dynamic=False) if compile else self.module
        if compile:
            self.backend = "torch-compile"
            meta["backend"] = self.backend

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(x.to(self.device, torch.float32))

    @classmethod
    def from_checkpoint(cls, path, *, model: ModelConfig | None = None, mode: str | None = None,
                        dropout: bool | None = None, device="cpu", compile: bool = False, crop_size=None,
                        direction=None) -> TorchGenerator:
        from .onnx import load_source

        mode = mode or "paper"
        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        dropout = (mode == "paper") if dropout is None else (bool(dropout) and mode == "paper")
        src = load_source(path, model, crop_size=crop_size, direction=direction)
        meta = _flat_meta(backend="torch", mode=mode, dropout=dropout, precision="fp32",
                          preprocessing=src.preprocessing, arch=src.arch, dynamic_hw=True,
                          checkpoint_sha256=src.sha256, source=str(path))
        return cls(src.G, meta=meta, device=device, compile=compile)


def _check_baked(path: Path, meta: dict, mode: str | None, dropout: bool | None) -> None:
    if mode is not None and mode != meta["mode"]:
        raise UserError(f"{path} was exported in {meta['mode']} mode, not --mode {mode}; re-export it with "
                        f"`fastp2p export CKPT --mode {mode}` or leave --mode out")
    if dropout is not None and meta["mode"] == "paper" and bool(dropout) != meta["dropout"]:
        hint = "--paper_dropout" if dropout else "without --paper_dropout"
        raise UserError(f"{path} was exported with paper-mode dropout {'on' if meta['dropout'] else 'off'}; "
                        f"re-export it {hint} to change that")


def _onnx_meta(backend: str, m: dict, path) -> dict:
    """The flat meta of an exported .onnx (its fastp2p metadata ``m``), the same for every backend that runs it."""
    return _flat_meta(backend=backend, mode=m["mode"], dropout=m.get("dropout") == "on",
                      precision=m.get("precision", "fp32"), preprocessing=m["preprocessing"], arch=m["arch"],
                      dynamic_hw=bool(m.get("dynamic_hw")), checkpoint_sha256=m.get("checkpoint_sha256", ""),
                      source=str(path))


class OnnxRuntimeGenerator(Generator):
    backend = "onnxruntime"

    def __init__(self, path, *, device="cpu", threads: int | None = None, providers=None, tensorrt_ep=False,
                 spin: bool = False):
        from .onnxruntime import OrtGenerator

        self.impl = OrtGenerator(path, device=device, threads=threads, providers=providers, tensorrt_ep=tensorrt_ep,
                                 spin=spin)
        self.device = self.impl.device
        self.meta = _onnx_meta(self.backend, self.impl.onnx_meta, path)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)


class OpenVINOGenerator(Generator):
    """An exported .onnx compiled by OpenVINO on the CPU (``engines/openvino.py``: cache, precision, hints)."""

    backend = "openvino"

    def __init__(self, path, *, device="cpu", threads: int | None = None, precision: str = "fp32",
                 hint: str = "latency", streams: int | None = None, cache_dir=None):
        from .openvino import OvGenerator

        if torch.device(device).type != "cpu":
            raise UserError(f"--backend openvino runs on the CPU here, not --device {device}; use --device cpu")
        self.impl = OvGenerator(path, precision=precision, hint=hint, threads=threads, streams=streams,
                                cache_dir=cache_dir)
        self.device = self.impl.device
        self.meta = _onnx_meta(self.backend, self.impl.onnx_meta, path)
        if precision == "bf16":  # the file's fp32 weights, computed in bf16: say what actually runs
            self.meta["precision"] = "bf16"

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)


class TensorRTGenerator(Generator):
    backend = "tensorrt"

    def __init__(self, path, *, device="cuda", cuda_graph: bool = False, verbose: bool = False):
        from .tensorrt import TrtGenerator

        device = torch.device(device)
        if device.type != "cuda":
            raise UserError(f"{path}: a TensorRT engine runs on a CUDA GPU; pass --device cuda (or use the .onnx "
                            "export on the CPU)")
        self.impl = TrtGenerator(path, device=device, cuda_graph=cuda_graph, verbose=verbose)
        self.device = self.impl.device
        m = self.impl.meta
        self.meta = _flat_meta(backend=self.backend, mode=m["mode"], dropout=m.get("dropout") == "on",
                               precision=m.get("precision", "fp32"), preprocessing=m["preprocessing"],
                               arch=m["arch"], dynamic_hw=bool(m.get("dynamic_hw")),
                               checkpoint_sha256=m.get("checkpoint_sha256", ""), source=str(path))
        self.meta["profile"] = self.impl.profile

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        lo, hi = self.impl.profile[0], self.impl.profile[2]
        if not all(a <= b <= c for a, b, c in zip(lo, x.shape, hi, strict=True)):
            raise UserError(f"input shape {tuple(x.shape)} is outside the engine's profile (min {lo}, max {hi}); "
                            "rebuild it with a wider --batch")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)


def open_runtime(path: str | Path, *, device: str | torch.device | None = None, mode: str | None = None,
                 dropout: bool | None = None, model: ModelConfig | None = None, compile: bool = False,
                 threads: int | None = None, providers=None, cuda_graph: bool = False,
                 crop_size: int | None = None, direction: str | None = None,
                 backend: str | None = None) -> Generator:
    """A ``Generator`` for ``path``, chosen by suffix (see the module doc).

    device: "cpu" / "cuda" (default: cuda for TensorRT plans, else cpu). mode, dropout: checkpoints only choose them;
    for exports they must match what was baked in (None: take it). model: architecture of a reference ``.pth``.
    compile: ``torch.compile`` (torch backend). threads, providers: ONNX Runtime. cuda_graph: TensorRT.
    crop_size, direction: override a checkpoint's preprocessing (torch backend). backend: what runs an .onnx,
    "onnxruntime" (None: the default) or "openvino"; refused for any other file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--engine: file not found: {path}")
    suffix = path.suffix.lower()
    if backend is not None and backend not in ONNX_BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(ONNX_BACKENDS)}")
    if backend is not None and suffix not in ONNX_SUFFIXES:
        raise UserError(f"--backend {backend}: only for an .onnx --engine, not {path}; leave --backend out")
    if suffix in TORCH_SUFFIXES:
        return TorchGenerator.from_checkpoint(path, model=model, mode=mode, dropout=dropout, device=device or "cpu",
                                              compile=compile, crop_size=crop_size, direction=direction)
    if suffix in ONNX_SUFFIXES and backend == "openvino":
        rt: Generator = OpenVINOGenerator(path, device=device or "cpu", threads=threads)
    elif suffix in ONNX_SUFFIXES:
        rt = OnnxRuntimeGenerator(path, device=device or "cpu", threads=threads, providers=providers)
    elif suffix in TRT_SUFFIXES:
        rt = TensorRTGenerator(path, device=device or "cuda", cuda_graph=cuda_graph)
    else:
        raise UserError(f"--engine {path}: unknown kind of file; expected .safetensors/.pth (torch), .onnx (ONNX "
                        "Runtime) or .plan (TensorRT)")
    _check_baked(path, rt.meta, mode, dropout)
    if crop_size is not None and not rt.meta["dynamic_hw"] and crop_size != rt.meta["crop_size"]:
        raise UserError(f"--crop_size {crop_size}: {path} takes {rt.meta['crop_size']}x{rt.meta['crop_size']} only; "
                        "re-export with --dynamic for other sizes")
    if crop_size is not None:
        why = size_problem(crop_size, int(rt.meta["arch"]["num_downs"]))
        if why:
            raise UserError(why)
        rt.meta["crop_size"] = int(crop_size)
    if direction is not None:
        rt.meta["direction"] = direction
    return rt
