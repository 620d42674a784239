"""Distillation: a narrower U-Net (same netG / norm / dropout, smaller ``ngf``) trained from a trained teacher.

The student's generator loss, per step (the D step is pix2pix's, on the student's fakes):

    loss_G = GAN(D(A, S(A)), real)                                       pix2pix's cGAN term
           + lambda_L1 * L1(S(A), B)                                     pix2pix's L1 to the real target
           + lambda_teacher * L1(S(A), T(A))                             the teacher's output as a second target
           + lambda_feat * sum_i MSE(adapter_i(S_i(A)), T_i(A))          intermediate features, 1x1 adapters

What it follows:
- GAN Compression (Li et al., "GAN Compression: Efficient Architectures for Interactive Conditional GANs", CVPR 2020;
  mit-han-lab/gan-compression ``distillers/``): on paired data the reconstruction term is L1 to the real B with the
  cGAN loss (``lambda_recon`` x L1(S(A), B) + GAN), the discriminator starts from the teacher's (``--restore_D_path``,
  our ``--discriminator teacher``) and keeps training against the student, the teacher runs frozen under no_grad, and
  the features are matched by ``MSE(adapter(S_act), T_act)`` with a learned 1x1 ``nn.Conv2d`` per layer from the
  student's to the teacher's channels, trained by G's optimizer and thrown away with the teacher.
- OMGD (Ren et al., "Online Multi-Granularity Distillation for GAN Compression", ICCV 2021; bytedance/OMGD): the
  teacher's output as a target of the student (OMGD uses SSIM / VGG-feature / style / TV losses on it; we use plain
  L1, the pix2pix objective's own metric), and the layers matched on a unet_256: OMGD's mapping layers are a_2, a_4
  and the up-path inputs ReLU(cat[a_4, u_5]), ReLU(cat[a_2, u_3]); our default ``down2,down4,up3,up5`` is the same set
  of tensors taken one by one (a_L: down level L's activation; u_L: up level L's output before dropout, see
  ``fastp2p.models.unet``). OMGD's ngf 64 -> 16 student is our default ``--ngf`` (a quarter of the teacher's).
Where we differ: OMGD trains its teachers online and drops the GAN and real-target terms for the student; GAN
Compression's students are ResNets found by search. Here the teacher is a fixed ``fastp2p train`` checkpoint, the
student is the same U-Net narrower, and its losses are pix2pix's plus the two distillation terms. D starts fresh
by default (``--discriminator teacher`` is GAN Compression's choice; the measurement behind the default is at
``config.DistillConfig.discriminator``).

The teacher targets are deterministic: the teacher runs in paper mode with its dropout off (``inference.with_mode``:
per-image statistics as at batch-1 pix2pix training, running statistics untouched) under the step's autocast.

Everything else is ``fastp2p.train.fit``'s loop (``DistillTrainer`` is a ``Trainer``): resume (adapters and their
Adam state are in the training state), Ctrl-C / SIGTERM saves, metrics.jsonl (the two distillation terms in a
``{"step": N, "distill": {...}}`` record after each loss row), TensorBoard, --eval_every, snapshots. The checkpoint is
an ordinary fastp2p checkpoint of the student (``Config.distill`` records the teacher and its sha256).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed
from .config import Config, DistillConfig, TrainConfig, override
from .errors import UserError, first_line
from .models import init_weights
from .models.unet import NUM_DOWNS
from .report import RunReporter
from .train import StepLosses, Trainer, _adam, fit

log = logging.getLogger("fastp2p.distill")

DISTILL_KEYS = ("loss_G_teacher", "loss_G_feat")
DISCRIMINATORS = ("teacher", "fresh")


@dataclass
class DistillStepLosses(StepLosses):
    loss_G_teacher: torch.Tensor  # lambda_teacher x L1(S(A), T(A))
    loss_G_feat: torch.Tensor  # lambda_feat x sum of the adapted feature MSEs


# -- the teacher -------------------------------------------------------------------------------------------------------
@dataclass
class Teacher:
    path: Path
    sha256: str
    cfg: Config
    G: nn.Module
    D: dict[str, torch.Tensor] | None  # its discriminator's weights (None: the checkpoint holds none)


def teacher_path(path: str | Path) -> Path:
    """``--teacher``: a fastp2p .safetensors checkpoint, or a run folder holding checkpoints/latest.safetensors."""
    p = Path(path)
    if p.is_dir():
        latest = p / "checkpoints" / "latest.safetensors"
        if latest.is_file():
            return latest
        raise UserError(f"--teacher {p}: a folder without checkpoints/latest.safetensors; give the teacher's "
                        ".safetensors checkpoint")
    suffix = p.suffix.lower()
    if suffix in (".pth", ".pt"):
        raise UserError(f"--teacher {p}: a reference .pth holds neither the architecture and preprocessing nor a "
                        "discriminator; convert it first (fastp2p convert with its --netG/--direction/... flags) and "
                        "pass the .safetensors, with --discriminator fresh")
    if suffix != ".safetensors":
        raise UserError(f"--teacher {p}: expected a fastp2p .safetensors checkpoint (what fastp2p train writes), not "
                        f"a {suffix or 'suffix-less'} file")
    if not p.is_file():
        raise UserError(f"--teacher not found: {p}")
    return p


def load_teacher(path: str | Path) -> Teacher:
    path = teacher_path(path)
    try:
        G, cfg = checkpoint.load_generator(path)
    except UserError as e:
        raise UserError(f"--teacher: {e}") from None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        D = {k[2:]: f.get_tensor(k) for k in f.keys() if k.startswith("D.")} or None
    return Teacher(path, checkpoint.file_hash(path), cfg, G, D)


# -- feature layers ----------------------------------------------------------------------------------------------------
_LAYER = re.compile(r"(down|up)(\d+)")


def parse_layers(spec: str, num_downs: int) -> tuple[str, ...]:
    """``"down2,up3"`` -> ("down2", "up3"), checked against the U-Net's depth (down1..n; up2..n: up1 is the output)."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    for name in names:
        m = _LAYER.fullmatch(name)
        if not m or not (1 if m[1] == "down" else 2) <= int(m[2]) <= num_downs:
            raise UserError(f"--feat_layers {spec}: {name!r} is not a layer of this {num_downs}-level U-Net; use "
                            f"down1..down{num_downs} (encoder activations) or up2..up{num_downs} (decoder outputs)")
    if len(set(names)) != len(names):
        raise UserError(f"--feat_layers {spec}: a layer is named twice")
    return names


def _split(name: str) -> tuple[str, int]:
    m = _LAYER.fullmatch(name)
    return m[1], int(m[2])


def layer_module(G: nn.Module, name: str) -> nn.Module:
    """The module whose output is the activation ``name``: a_L is down_act[L-1]'s output (LeakyReLU, or the Identity
    left by a fused norm+activation), u_L before dropout is up_norm[L-1]'s (fastp2p.models.unet's data flow)."""
    kind, level = _split(name)
    return G.down_act[level - 1] if kind == "down" else G.up_norm[level - 1]


def layer_channels(ngf: int, name: str) -> int:
    """Channels of the activation ``name`` in a U-Net with ``ngf`` filters (widths ngf * min(2^i, 8)): a_L has down
    level L's width, u_L the width of the level it joins (L - 1)."""
    kind, level = _split(name)
    return ngf * min(2 ** (level - 1 if kind == "down" else level - 2), 8)


def _capture(store: dict, name: str):
    def hook(module, inputs, output):
        store[name] = output
    return hook


# -- the student's config ----------------------------------------------------------------------------------------------
def student_config(teacher: str | Path, ngf: int | None = None, **flags) -> Config:
    """The config of a student of the checkpoint ``teacher``: the teacher's architecture, D and GAN mode with ``ngf``
    filters (default: a quarter of the teacher's, OMGD's 64 -> 16), its data folder and preprocessing (direction,
    preprocess, load / crop size, layout, phase), the default preset's training recipe, run name ``distill-ngf<N>``.
    ``flags`` override fields as ``config.override`` does; DistillConfig's fields (``lambda_teacher``,
    ``lambda_feat``, ``discriminator``, ``feat_layers``) go there. The teacher's sha256 is recorded."""
    t = load_teacher(teacher)
    tm = t.cfg.model
    ngf = ngf if ngf is not None else max(1, tm.ngf // 4)
    if ngf >= tm.ngf:
        raise UserError(f"--ngf {ngf}: the teacher {t.path} has ngf {tm.ngf}; a student is narrower: give --ngf "
                        f"below {tm.ngf} (e.g. {max(1, tm.ngf // 4)} or {max(1, tm.ngf // 2)})")
    dfields = {f.name for f in dataclasses.fields(DistillConfig)}
    dflags = {k: flags.pop(k) for k in list(flags) if k in dfields and flags[k] is not None}
    model = dataclasses.replace(tm, ngf=ngf, norm="batch" if tm.norm == "sync_batch" else tm.norm)
    td = t.cfg.data
    data = dataclasses.replace(Config().data, **{k: getattr(td, k) for k in ("data", "layout", "phase", "direction",
                                                                              "preprocess", "load_size", "crop_size")})
    if flags.get("data") is None and td.data is not None and not Path(td.data).exists():
        raise UserError(f"--data: the teacher's training data {td.data} is not there (a path relative to where it "
                        "was trained?); pass --data")
    # cuda_graphs off: fastp2p.graphs.GraphedStep replays a StepLosses of pix2pix's three fields only.
    train = TrainConfig(name=f"distill-ngf{ngf}", gan_mode=t.cfg.train.gan_mode, cuda_graphs=False)
    distill = DistillConfig(teacher=str(t.path), teacher_sha256=t.sha256, teacher_ngf=tm.ngf, **dflags)
    _check_distill(distill)
    parse_layers(distill.feat_layers, NUM_DOWNS[model.netG])  # a bad --feat_layers before anything is built
    if distill.discriminator == "teacher" and t.D is None:
        raise UserError(f"--discriminator teacher: {t.path} holds no discriminator weights (a converted .pth?); pass "
                        "--discriminator fresh")
    cfg = override(Config(model, data, train, distill), **flags)
    if cfg.train.cuda_graphs:
        raise UserError("--cuda_graphs: not available for distill yet (the graphed step replays pix2pix's three "
                        "losses only); drop it")
    return cfg


def _check_distill(d: DistillConfig) -> None:
    if d.discriminator not in DISCRIMINATORS:
        raise UserError(f"--discriminator {d.discriminator}: choose one of {', '.join(DISCRIMINATORS)}")
    for name in ("lambda_teacher", "lambda_feat"):
        v = getattr(d, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise UserError(f"--{name} {v}: give a finite number >= 0")


# -- the trainer -------------------------------------------------------------------------------------------------------
class DistillTrainer(Trainer):
    """``Trainer`` with the teacher (frozen, paper mode without dropout), the 1x1 adapters (in G's optimizer and the
    training state, never in the generator's weights) and the two distillation terms in G's loss."""

    losses_type = DistillStepLosses

    def __init__(self, cfg: Config, device: str | torch.device = "cpu", dist: distributed.Dist | None = None):
        dc = cfg.distill
        if dc is None or not dc.teacher:
            raise UserError("distill: the config names no teacher (--teacher)")
        _check_distill(dc)
        dist = dist if dist is not None else distributed.current(cfg.train.dist_timeout)
        if dist.enabled:  # the adapters sit outside DDP: their gradients would not be averaged over the ranks
            raise UserError("distill: one process only (no torchrun / --nproc)")
        teacher = load_teacher(dc.teacher)
        if dc.teacher_sha256 and teacher.sha256 != dc.teacher_sha256:
            raise UserError(f"--teacher {teacher.path}: not the teacher this run was distilled from (its sha256 "
                            f"{teacher.sha256[:12]}... differs from the recorded {dc.teacher_sha256[:12]}...); pass "
                            "that teacher, or start a new run (another --name)")
        _check_student_of(teacher, cfg)
        super().__init__(cfg, device, dist)
        if dc.discriminator == "teacher":
            if teacher.D is None:
                raise UserError(f"--discriminator teacher: {teacher.path} holds no discriminator weights (a converted "
                                ".pth?); pass --discriminator fresh")
            try:
                self.D.load_state_dict(teacher.D)
            except RuntimeError as e:
                raise UserError(f"--teacher {teacher.path}: its discriminator does not match its own config "
                                f"({first_line(e)}); pass --discriminator fresh") from None
        self.teacher_path = teacher.path
        self.T = self._teacher_module(teacher.G)
        self.layers = parse_layers(dc.feat_layers, self.G.num_downs) if dc.lambda_feat > 0 else ()
        # pix2pix's normal(0, 0.02) init, as GAN Compression's adapters (init_net)
        self.adapters = init_weights(nn.ModuleList(
            nn.Conv2d(layer_channels(cfg.model.ngf, n), layer_channels(teacher.cfg.model.ngf, n), 1)
            for n in self.layers)).to(self.device)
        self._s_feats: dict[str, torch.Tensor] = {}
        self._t_feats: dict[str, torch.Tensor] = {}
        for name in self.layers:
            layer_module(self.G, name).register_forward_hook(_capture(self._s_feats, name))
            layer_module(self.T, name).register_forward_hook(_capture(self._t_feats, name))
        if self.layers:  # G's optimizer trains the adapters too (GAN Compression: one Adam over G and the adapters)
            self.opt_G = _adam(itertools.chain(self.G.parameters(), self.adapters.parameters()), cfg, self.device)
        self._last_teacher: torch.Tensor | None = None
        n_t, n_s = (sum(p.numel() for p in g.parameters()) for g in (self.T, self.G))
        log.info("distill: student ngf %d (%.2fM parameters) from teacher %s ngf %d (%.2fM); D: %s; features: %s",
                 cfg.model.ngf, n_s / 1e6, teacher.path, teacher.cfg.model.ngf, n_t / 1e6,
                 "the teacher's" if dc.discriminator == "teacher" else "fresh", ",".join(self.layers) or "none")

    def _teacher_module(self, G: nn.Module) -> nn.Module:
        from . import perf
        from .inference import with_mode

        T = with_mode(G, "paper", dropout=False, inplace=True).to(self.device)
        t = self.cfg.train
        if t.channels_last if t.channels_last is not None else self.device.type == "cuda":
            perf.apply_channels_last(T)
        return T

    def _g_loss_eager(self, A, B, fake):
        loss_gan, loss_l1 = super()._g_loss_eager(A, B, fake)
        dc = self.cfg.distill
        zero = torch.zeros((), device=fake.device)
        if dc.lambda_teacher == 0 and not self.layers:
            return loss_gan, loss_l1, zero, zero
        with torch.no_grad(), self._autocast():
            target = self.T(A)
        self._last_teacher = target
        loss_teacher = F.l1_loss(fake.float(), target.float()) * dc.lambda_teacher if dc.lambda_teacher else zero
        loss_feat = zero
        if self.layers:
            with self._autocast():
                adapted = [a(self._s_feats[n]) for a, n in zip(self.adapters, self.layers, strict=True)]
            loss_feat = sum(F.mse_loss(s.float(), self._t_feats[n].float()) for s, n in
                            zip(adapted, self.layers, strict=True)) * dc.lambda_feat
        return loss_gan, loss_l1, loss_teacher, loss_feat

    # -- state: the adapters ride in the training state (not in the weights file, which stays G + D) ----------------
    def train_state(self) -> dict:
        state = super().train_state()
        state["tensors"].update({f"adapter.{k}": v for k, v in self.adapters.state_dict().items()})
        return state

    def load_train_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self.layers:
            sd = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
            try:
                self.adapters.load_state_dict(sd)
            except RuntimeError as e:
                raise UserError(f"--resume: the saved adapters do not match --feat_layers "
                                f"{self.cfg.distill.feat_layers} ({first_line(e)})") from None
        super().load_train_state(meta, tensors)

    def load(self, path: Path) -> None:
        saved = Config.from_dict(checkpoint.read_meta(path)["config"]).distill
        if saved is None:
            raise UserError(f"--resume: {path} is a `fastp2p train` run, not a distillation; choose another --name")
        dc = self.cfg.distill
        if saved.teacher_sha256 != dc.teacher_sha256:
            raise UserError(f"--resume: {path} was distilled from another teacher ({saved.teacher}, sha256 "
                            f"{str(saved.teacher_sha256)[:12]}...) than --teacher {dc.teacher}; pass that teacher")
        differ = [f"--{f.name} {getattr(saved, f.name)} (this command: {getattr(dc, f.name)})"
                  for f in dataclasses.fields(dc) if f.name not in ("teacher", "teacher_sha256")
                  and getattr(saved, f.name) != getattr(dc, f.name)]
        if differ:
            raise UserError(f"--resume: {path} was distilled with " + ", ".join(differ)
                            + "; pass the run's own settings to continue it")
        super().load(path)


def _check_student_of(t: Teacher, cfg: Config) -> None:
    """Same topology as the teacher (netG, norm, dropout, channels), narrower."""
    tm, m = t.cfg.model, cfg.model

    def norm(v):
        return "batch" if v == "sync_batch" else v

    differ = [f"--{k} {getattr(m, k)} (the teacher's: {getattr(tm, k)})"
              for k in ("netG", "norm", "no_dropout", "input_nc", "output_nc", "netD", "n_layers_D", "ndf")
              if norm(getattr(m, k)) != norm(getattr(tm, k))
              and not (k in ("ndf", "n_layers_D", "netD") and cfg.distill.discriminator == "fresh")]
    if differ:
        raise UserError("distill: the student must have the teacher's architecture apart from --ngf: "
                        + ", ".join(differ))
    if m.ngf >= tm.ngf:
        raise UserError(f"--ngf {m.ngf}: the teacher {t.path} has ngf {tm.ngf}; a student is narrower: give --ngf "
                        f"below {tm.ngf}")
    if m.netG not in NUM_DOWNS:
        raise UserError(f"--netG {m.netG}: distill takes a U-Net teacher ({', '.join(NUM_DOWNS)})")


# -- metrics -----------------------------------------------------------------------------------------------------------
class DistillReporter(RunReporter):
    """``RunReporter`` plus the distillation terms: after each loss row of metrics.jsonl a record ``{"step": N,
    "distill": {"loss_G_teacher": ..., "loss_G_feat": ...}}`` (means over the same steps; the "eval" records' shape,
    so readers of loss rows skip it), TensorBoard scalars train/loss_G_teacher and train/loss_G_feat, and the last
    values in the summary."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dsum: dict[str, torch.Tensor | None] = dict.fromkeys(DISTILL_KEYS)
        self._dn = 0
        self.last_distill: dict = {}

    def step(self, trainer, losses, A, B, lr: float, wait_s: float) -> None:
        for k in DISTILL_KEYS:  # on the device: read at log points only, as the other losses
            v = getattr(losses, k)
            self._dsum[k] = v if self._dsum[k] is None else self._dsum[k] + v
        self._dn += 1
        super().step(trainer, losses, A, B, lr, wait_s)

    def log(self, trainer, lr: float) -> None:
        super().log(trainer, lr)
        if self._dn == 0:
            return
        rec = {k: float(self._dsum[k]) / self._dn for k in DISTILL_KEYS}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": trainer.step, "distill": rec}) + "\n")
        self._scalars(trainer.step, {f"train/{k}": v for k, v in rec.items()})
        self.last_distill = rec
        self._dsum, self._dn = dict.fromkeys(DISTILL_KEYS), 0

    def close(self, trainer, bad_files=(), interrupted: str | None = None) -> dict:
        summary = super().close(trainer, bad_files=bad_files, interrupted=interrupted)
        summary.update(self.last_distill)
        summary["teacher"] = str(trainer.teacher_path)
        with open(self.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary


# -- entry points ------------------------------------------------------------------------------------------------------
def distill(cfg: Config, progress: bool = True, wandb: bool = False) -> dict:
    """Distill per ``cfg`` (``student_config``) into ``<out>/<name>/``: ``fastp2p.train.fit`` with the distillation
    trainer and reporter; returns the run summary (``summary["checkpoint"]``: the student's latest.safetensors)."""
    if cfg.distill is None:
        raise UserError("distill: the config has no distill section; build it with fastp2p.distill.student_config")
    return fit(cfg, progress=progress, wandb=wandb, trainer_factory=DistillTrainer, reporter_factory=DistillReporter)


def record_scores(ckpt: str | Path, scores: dict, key: str = "quality") -> None:
    """Add ``scores`` (JSON values: the quality gate's result) to the metadata of the checkpoint ``ckpt`` under
    ``key``, in its header and its JSON sidecar. The tensors, the training state it names and everything else in
    the header stay as they are (``--resume`` still continues it); one atomic rewrite, as every save."""
    from safetensors.torch import load_file, save_file

    ckpt = Path(ckpt)
    meta = checkpoint.read_meta(ckpt)
    meta[key] = scores
    tensors = load_file(str(ckpt))
    header = {"fastp2p": json.dumps(meta)}
    checkpoint.atomic_write(ckpt, lambda tmp: save_file(tensors, tmp, metadata=header))
    checkpoint.atomic_write(ckpt.with_suffix(".json"),
                            lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
