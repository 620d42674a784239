"""One ``Generator`` interface over torch (eager or ``torch.compile``), ONNX Runtime, OpenVINO and TensorRT.

    rt = open_runtime("G.plan")            # or G.onnx, G.safetensors, latest_net_G.pth
    y = rt(x)                              # float NCHW in [-1, 1] -> float32 NCHW in [-1, 1], on rt.device
    frames_out = rt.frames(frames_uint8)   # uint8 (N,)H,W,C -> uint8 N,H,W,C; pre/post-processing on rt.device
    rt.meta["crop_size"], rt.meta["direction"], rt.meta["input_nc"], rt.meta["mode"]

``open_runtime`` picks the backend by suffix: ``.safetensors`` / ``.pth`` / ``.pt`` -> torch, ``.onnx`` -> ONNX
Runtime (or OpenVINO with ``backend="openvino"``; ``backend="auto"``, the CLI's default, picks one by
``auto_backend``'s rule), ``.xml`` (an IR of ``build-engine --backend openvino``) -> OpenVINO, ``.plan`` / ``.engine``
-> TensorRT. An exported file has its mode
(and paper-mode dropout) baked in:
``mode`` / ``dropout`` left as None take it from the file; given and different, they raise a ``UserError`` that says
how to re-export. For checkpoints they choose the mode as ``translate`` does (default paper, dropout on).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fastp2p import outputs
from fastp2p.config import ModelConfig
from fastp2p.errors import UserError
from fastp2p.inference import MODES, to_model_input, to_uint8
from fastp2p.models.unet import size_problem

log = logging.getLogger("fastp2p.engines")

TORCH_SUFFIXES = (".safetensors", ".pth", ".pt")
ONNX_SUFFIXES = (".onnx",)
TRT_SUFFIXES = (".plan", ".engine", ".trt")
OPENVINO_SUFFIXES = (".xml",)  # an OpenVINO IR (G.xml + G.bin) of ``build-engine --backend openvino``
ONNX_BACKENDS = ("onnxruntime", "openvino")  # what runs an .onnx (``open_runtime(backend=...)``, ``--backend``)
BACKEND_CHOICES = ("auto", *ONNX_BACKENDS)  # ``--backend``: auto (the CLI's default) lets ``auto_backend`` choose
BACKEND_ENV = "FASTP2P_BACKEND"  # what ``auto`` picks when set (``auto_backend``, rule 0)
OPENVINO_OPTIONS = {"ov_precision": "--ov_precision", "ov_hint": "--ov_hint", "streams": "--streams"}


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
    """An exported .onnx, or a fastp2p IR .xml, compiled by OpenVINO on the CPU (``engines/openvino.py``: cache,
    precision, hints). precision / hint None: an IR's recorded build choice, else fp32 / latency."""

    backend = "openvino"

    def __init__(self, path, *, device="cpu", threads: int | None = None, precision: str | None = None,
                 hint: str | None = None, streams: int | None = None, cache_dir=None, onnx_meta: dict | None = None):
        from .openvino import OvGenerator

        if torch.device(device).type != "cpu":
            raise UserError(f"--backend openvino runs on the CPU here, not --device {device}; use --device cpu")
        self.impl = OvGenerator(path, precision=precision, hint=hint, threads=threads, streams=streams,
                                cache_dir=cache_dir, meta=onnx_meta)
        self.device = self.impl.device
        self.meta = _onnx_meta(self.backend, self.impl.onnx_meta, path)
        if self.impl.precision == "bf16" and self.meta["precision"] in ("fp32", "fp16"):
            self.meta["precision"] = "bf16"  # the file's weights, computed in bf16: say what actually runs
        self.meta["openvino"] = {"precision": self.impl.precision, "hint": self.impl.hint,
                                 "streams": self.impl.streams, "threads": self.impl.threads,
                                 "requests": len(self.impl.requests), "from_cache": self.impl.from_cache}

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


def auto_backend(path: str | Path, *, device: str | torch.device | None = None, options: dict | None = None
                 ) -> tuple[str, str, dict | None]:
    """``(backend, why, meta)``: what runs the .onnx ``path`` when no backend is named (``--backend auto``).

    The rule, first match wins (deterministic: no timing probe at open, which would cost seconds and vary with the
    load):

    1. not on the CPU -> onnxruntime (OpenVINO runs on the CPU here);
    2. an ONNX Runtime-optimized graph (``build-engine --backend onnxruntime``, told by its sidecar) -> onnxruntime
       (it holds com.microsoft fused ops that only ONNX Runtime reads);
    3. an OpenVINO option given (``options``: ov_precision, ov_hint, streams) -> openvino;
    4. ``$FASTP2P_BACKEND`` set to onnxruntime or openvino -> that one (a machine's own default; a test suite keeps
       its shared process on onnxruntime with it, see tests/test_openvino.py for why);
    5. openvino not installed -> onnxruntime;
    6. otherwise openvino, whatever the file's precision: int8 QDQ (OpenVINO runs its convolutions in int8 with
       VNNI; ONNX Runtime's CPU QDQ is slower than its own fp32), bf16 (ONNX Runtime's CPU provider cannot run it),
       fp32 and fp16 (OpenVINO measured faster, below).

    Measured (2026-12-02; 2-core AMD EPYC Zen 4: AVX-512 VNNI and BF16, no AMX; OpenVINO 2026.4, ONNX Runtime 1.32;
    unet_256 ngf 64, 256x256, eval-mode export, the INT8 file from engines/quantize.py on 16 facades val images; ms
    per image, medians of 15 (b1) / 6 (b8) interleaved calls, 2 threads, OpenVINO latency hint; the cores were shared
    with a training run and other jobs the whole time, so no quiet figures):

        load average (1 min)    2.4 (b1 / b8)   4.5-6.6 (b1 / b8)   6.7 + a busy process (b1 / b8)
        ONNX Runtime fp32       192 / 293       406 / 358           549 / 470
        OpenVINO fp32           149 / 249       347 / 296           437 / 365
        OpenVINO bf16           119 / 207       301 / 279           363 / 293
        ONNX Runtime int8       243 / 351       544 / 423           664 / 627
        OpenVINO int8           112 / 185       104 /  91           163 / 105

    (the first column's int8 file: a quantization with asymmetric activations, whose ConvTranspose layers OpenVINO
    ran in fp32). OpenVINO won every cell, by 1.2-1.3x in fp32 and 2-6x in int8, and opened faster (unet_256 from
    its cache 0.7 s against ONNX Runtime's 1.6 s; cold 3.2 vs 4.7 s). Issue 16's Intel Xeon table agrees except on a
    quiet machine in fp32, where ONNX Runtime led at batch 1 (70 vs 92 ms) and tied at batch 8 (75 vs 76): one rule
    for all precisions still, since a small CPU serving images rarely runs alone (decoding, encoding, other jobs),
    and there OpenVINO led on both CPUs (the Xeon under load: 219 vs 305 ms b1, 201 vs 239 b8). ``--backend
    onnxruntime`` or ``$FASTP2P_BACKEND`` override it. (Script: an ``OrtGenerator`` and ``OvGenerator`` per row, one
    call of each in turn per round, ``time.perf_counter`` around each.)

    ``meta``: the file's fastp2p metadata when the rule read it (handed on, so the file is parsed once), else None."""
    from .onnxruntime import ORT_FORMAT, sidecar_path
    from .openvino import openvino_installed

    path = Path(path)
    if torch.device(device or "cpu").type != "cpu":
        return "onnxruntime", f"--device {device}: OpenVINO runs on the CPU only", None
    if (outputs.json_object(sidecar_path(path)) or {}).get("format") == ORT_FORMAT:
        return "onnxruntime", "an ONNX Runtime-optimized graph (build-engine --backend onnxruntime)", None
    given = [flag for k, flag in OPENVINO_OPTIONS.items() if (options or {}).get(k) is not None]
    if given:
        return "openvino", f"{given[0]} given", None
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env and env != "auto":
        if env not in ONNX_BACKENDS:
            raise UserError(f"${BACKEND_ENV}={env}: choose one of {', '.join(BACKEND_CHOICES)} (or unset it)")
        return env, f"${BACKEND_ENV}={env}", None
    version = openvino_installed()
    if version is None:
        return "onnxruntime", "openvino is not installed; pip install 'fastp2p[openvino]' for it", None
    from .onnx import read_onnx_meta

    meta = read_onnx_meta(path)
    precision = meta.get("precision", "fp32")
    why = {"int8": "int8 QDQ file: OpenVINO runs it in int8",
           "bf16": "bf16 file: ONNX Runtime's CPU provider cannot run it"}.get(
        precision, f"{precision} file: OpenVINO measured faster on CPUs")
    return "openvino", f"{why}; openvino {'.'.join(version.split('.')[:2])} installed", meta


def open_runtime(path: str | Path, *, device: str | torch.device | None = None, mode: str | None = None,
                 dropout: bool | None = None, model: ModelConfig | None = None, compile: bool = False,
                 threads: int | None = None, providers=None, cuda_graph: bool = False,
                 crop_size: int | None = None, direction: str | None = None,
                 backend: str | None = None, ov_precision: str | None = None, ov_hint: str | None = None,
                 streams: int | None = None) -> Generator:
    """A ``Generator`` for ``path``, chosen by suffix (see the module doc).

    device: "cpu" / "cuda" (default: cuda for TensorRT plans, else cpu). mode, dropout: checkpoints only choose them;
    for exports they must match what was baked in (None: take it). model: architecture of a reference ``.pth``.
    compile: ``torch.compile`` (torch backend). threads: ONNX Runtime and OpenVINO (None: one per core this process
    may run on). providers: ONNX Runtime. cuda_graph: TensorRT. crop_size, direction: override a checkpoint's
    preprocessing (torch backend). backend: what runs an .onnx: "onnxruntime" (None: the default), "openvino", or
    "auto" (``auto_backend``'s rule, said in one log line); refused for any other file but "auto" (and "openvino" for
    an .xml). ov_precision ("fp32" | "bf16"), ov_hint ("latency" | "throughput"), streams: OpenVINO only (None: fp32,
    latency, OpenVINO's choice; an IR: what its build recorded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--engine: file not found: {path}")
    suffix = path.suffix.lower()
    if backend is not None and backend not in BACKEND_CHOICES:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if suffix in OPENVINO_SUFFIXES and backend == "onnxruntime":
        raise UserError(f"--backend onnxruntime: {path} is an OpenVINO IR, which runs on OpenVINO; give the .onnx it "
                        "was built from for ONNX Runtime, or leave --backend out")
    if backend not in (None, "auto") and suffix not in (*ONNX_SUFFIXES, *OPENVINO_SUFFIXES):
        raise UserError(f"--backend {backend}: only for an .onnx --engine, not {path}; leave --backend out")
    ov_options = {"ov_precision": ov_precision, "ov_hint": ov_hint, "streams": streams}
    ov_meta = None
    if suffix in ONNX_SUFFIXES and backend == "auto" and providers is not None:
        backend = "onnxruntime"  # ONNX Runtime providers asked for by name
    if suffix in ONNX_SUFFIXES and backend == "auto":
        backend, why, ov_meta = auto_backend(path, device=device, options=ov_options)
        if torch.device(device or "cpu").type == "cpu":
            other = "onnxruntime" if backend == "openvino" else "openvino"
            log.info("backend %s (auto: %s) -- pass --backend %s to override", backend, why, other)
    runs_ov = suffix in OPENVINO_SUFFIXES or (suffix in ONNX_SUFFIXES and backend == "openvino")
    unused = [OPENVINO_OPTIONS[k] for k, v in ov_options.items() if v is not None and not runs_ov]
    if unused:
        raise UserError(f"{unused[0]}: an OpenVINO option, but {path} runs on "
                        f"{'ONNX Runtime' if suffix in ONNX_SUFFIXES else 'another backend'}; use it with "
                        "--backend openvino (an .onnx) or an OpenVINO .xml, or leave it out")
    if suffix in TORCH_SUFFIXES:
        return TorchGenerator.from_checkpoint(path, model=model, mode=mode, dropout=dropout, device=device or "cpu",
                                              compile=compile, crop_size=crop_size, direction=direction)
    if runs_ov:
        rt: Generator = OpenVINOGenerator(path, device=device or "cpu", threads=threads, precision=ov_precision,
                                          hint=ov_hint, streams=streams, onnx_meta=ov_meta)
    elif suffix in ONNX_SUFFIXES:
        rt = OnnxRuntimeGenerator(path, device=device or "cpu", threads=threads, providers=providers)
    elif suffix in TRT_SUFFIXES:
        rt = TensorRTGenerator(path, device=device or "cuda", cuda_graph=cuda_graph)
    else:
        raise UserError(f"--engine {path}: unknown kind of file; expected .safetensors/.pth (torch), .onnx (ONNX "
                        "Runtime or OpenVINO), .xml (OpenVINO IR) or .plan (TensorRT)")
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
