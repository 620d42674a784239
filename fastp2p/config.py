"""Run configuration: frozen dataclasses plus named presets. CLI flags only override fields
(``dataclasses.replace``); the whole config is saved in every checkpoint and every benchmark row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError

# Largest image (width x height) any command opens: PIL's own default Image.MAX_IMAGE_PIXELS (about 89.5 M pixels, e.g.
# 9459 x 9459; ~270 MB decoded as RGB). A header claiming more is refused before any pixel is decoded, naming the file
# and --max_pixels (how decompression bombs, a few KB claiming 30000 x 30000, are stopped).
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class ModelConfig:
    netG: str = "unet_256"
    netD: str = "basic"
    n_layers_D: int = 3
    ngf: int = 64
    ndf: int = 64
    norm: str = "batch"
    no_dropout: bool = False
    input_nc: int = 3
    output_nc: int = 3


@dataclass(frozen=True)
class DataConfig:
    data: str | None = None  # None: the built-in synthetic paired dataset
    layout: str = "auto"  # auto | aligned | folders
    phase: str = "train"  # sub-folder tried under data/ (the pix2pix layout: data/train/*.jpg)
    direction: str = "AtoB"
    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    no_flip: bool = False
    skip_bad: bool = False
    num_workers: int = 2
    loader: str | None = None  # dali | torch | gpu-cache; None: dali on CUDA when installed, else torch
    synthetic_size: int = 64  # how many pairs the built-in dataset holds
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are a DataError naming the file (--max_pixels)


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs"
    name: str = "pix2pix"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 1
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_L1: float = 100.0
    gan_mode: str = "vanilla"
    lr_policy: str = "linear"
    n_epochs: int = 100
    n_epochs_decay: int = 100
    lr_decay_iters: int = 50
    max_steps: int | None = None
    amp: bool = False
    compile: bool = False
    # torch.compile mode: None = inductor's default; "max-autotune-no-cudagraphs" (tuned kernels, our own graph
    # capture), or "reduce-overhead" (inductor's CUDA graph trees instead of --cuda_graphs)
    compile_mode: str | None = None
    cuda_graphs: bool | None = None  # None: on with CUDA where the step can be graphed (fastp2p.graphs)
    channels_last: bool | None = None  # None: on for CUDA, off on CPU (measured slower there, see fastp2p.perf)
    kernels: str | None = None  # triton | torch; None: triton when CUDA and Triton are present, torch otherwise
    # Multi-process (torchrun, fastp2p.distributed): lr x world size when set (the global batch is world x batch_size;
    # off by default: the paper's lr), and the seconds a collective may wait on a silent rank before the job fails.
    scale_lr: bool = False
    dist_timeout: float = 600.0
    log_every: int = 50
    sample_every: int = 500
    save_every: int = 1000
    # Per-epoch weight snapshots, as the reference's <epoch>_net_G.pth: checkpoints/<epoch>.safetensors every N epochs
    # (0: none); keep_last: only the newest N of them (None: all, as the reference).
    save_epoch_freq: int = 5
    keep_last: int | None = None
    tensorboard: bool | None = None  # None: on when the tensorboard package is installed
    resume: bool = False
    eval_every: int | None = None  # score G on a validation split every N steps (fastp2p.scoring.TrainEval)
    eval_data: str | None = None  # None: the val/ split beside --data (the synthetic val phase without --data)
    eval_max_images: int = 50  # pairs per evaluation: keeps it cheap


@dataclass(frozen=True)
class DistillConfig:
    """``fastp2p distill`` (fastp2p.distill): a student trained from a teacher checkpoint. ``Config.distill`` is None
    for ordinary training, so those runs and their checkpoints are unchanged."""

    teacher: str | None = None  # the teacher's .safetensors checkpoint
    teacher_sha256: str | None = None  # of that file: --resume with another teacher is refused
    teacher_ngf: int | None = None
    # fresh: a newly initialized D; teacher: start from the teacher checkpoint's D (GAN Compression). Fresh by
    # default: at 200 steps of a facades ngf-16 student it scored 19.40 dB vs the teacher and L1 0.1697 to the targets
    # against 18.58 dB / 0.1734 with the teacher's D, which over-powered the fresh student early (loss_D 0.0009).
    discriminator: str = "fresh"
    lambda_teacher: float = 100.0  # weight of L1(student output, teacher output)
    lambda_feat: float = 1.0  # weight of the summed feature MSEs through the 1x1 adapters
    # U-Net activations matched through the adapters, 1-based levels as in fastp2p.models.unet: down<L> = a_L,
    # up<L> = u_L before dropout (comma-separated: a string keeps the frozen config hashable and its JSON exact)
    feat_layers: str = "down2,down4,up3,up5"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        def build(kls, sub):
            names = {f.name for f in dataclasses.fields(kls)}
            return kls(**{k: v for k, v in (sub or {}).items() if k in names})
        distill = build(DistillConfig, d["distill"]) if isinstance(d.get("distill"), dict) else None
        return cls(build(ModelConfig, d.get("model")), build(DataConfig, d.get("data")),
                   build(TrainConfig, d.get("train")), distill)


# Named presets. "facades" is the paper's recipe for CMP Facades labels->photo; "debug" is a tiny net that trains on
# the built-in synthetic data in a few minutes on 2 CPU cores.
PRESETS: dict[str, Config] = {
    "default": Config(),
    "facades": Config(
        ModelConfig(),
        DataConfig(direction="BtoA"),
        TrainConfig(name="facades", n_epochs=100, n_epochs_decay=100),
    ),
    "debug": Config(
        ModelConfig(netG="unet_128", ngf=16, ndf=16),
        DataConfig(load_size=143, crop_size=128, synthetic_size=64, num_workers=1),
        TrainConfig(name="debug", n_epochs=10, n_epochs_decay=10, log_every=20, sample_every=200, save_every=500),
    ),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"--preset: unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def override(cfg: Config, **flags) -> Config:
    """Apply flat CLI flags (``None`` = not given) to whichever section owns the field."""
    sections = {name: getattr(cfg, name) for name in ("model", "data", "train")}
    changes: dict[str, dict] = {name: {} for name in sections}
    owners = {f.name: name for name, sec in sections.items() for f in dataclasses.fields(sec)}
    for k, v in flags.items():
        if v is None:
            continue
        if k not in owners:
            raise KeyError(f"no config field named {k!r}")
        changes[owners[k]][k] = v
    return Config(**{name: dataclasses.replace(sec, **changes[name]) for name, sec in sections.items()},
                  distill=cfg.distill)
