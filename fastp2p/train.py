"""The pix2pix trainer: the reference's optimization step exactly, made fast from the outside.

One iteration, as the reference's ``Pix2PixModel.optimize_parameters``:
    fake = G(A)
    D step: loss_D = 0.5 * [GAN(D(A, fake.detach()), fake) + GAN(D(A, B), real)];  Adam step on D
    G step: (D frozen) loss_G = GAN(D(A, fake), real) + lambda_L1 * L1(fake, B);      Adam step on G
Adam(lr, betas=(beta1, 0.999)) for both; the lr follows ``losses.lr_factor`` per epoch.

Speed (see ``fastp2p.perf`` for the transforms and their measured effect): fused Adam, one autocast context for
``--amp``, ``--compile`` of the step functions, no host syncs in the hot loop (losses are read every ``log_every``
steps), TF32 and cudnn.benchmark on CUDA around the trainer's own step (``SPEED_FLAGS``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, distributed, perf
from .config import Config
from .errors import UserError
from .losses import gan_loss, lr_factor
from .models import build_discriminator, build_generator

log = logging.getLogger("fastp2p.train")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively, else fp16 on CUDA; None (fp32) on a CPU without bf16 units."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if perf.cpu_has_native_bf16():
        return torch.bfloat16
    return None


# The fp32 path's speed settings on NVIDIA GPUs (TF32 tensor cores for matmuls and convolutions, cuDNN autotuning).
# The reference sets none of them, so its eager baseline runs on torch's defaults: matmul TF32 off, cuDNN conv TF32
# on, cudnn.benchmark off. Only the legacy setters are used: torch raises when they are mixed with the newer
# ``fp32_precision`` API, and the legacy ones keep both views in step.
SPEED_FLAGS = {"cuda.matmul.allow_tf32": True, "cudnn.allow_tf32": True, "cudnn.benchmark": True}


def _flag_owner(name: str):
    owner, attr = torch.backends, name.split(".")
    for part in attr[:-1]:
        owner = getattr(owner, part)
    return owner, attr[-1]


def current_backend_flags() -> dict:
    """The torch.backends flags of SPEED_FLAGS as they are now (what a benchmark row records)."""
    return {name: getattr(*_flag_owner(name)) for name in SPEED_FLAGS}


@contextlib.contextmanager
def backend_flags(flags: dict):
    """Set ``torch.backends`` flags (keys as in SPEED_FLAGS) for the duration of the block, then restore them."""
    old = {}
    try:
        for name, value in flags.items():
            owner, attr = _flag_owner(name)
            old[name] = getattr(owner, attr)
            setattr(owner, attr, value)
        yield
    finally:
        for name, value in old.items():
            setattr(*_flag_owner(name), value)


def _adam(params, cfg: Config, device: torch.device) -> torch.optim.Adam:
    t = cfg.train
    # fused=True: one kernel over all parameters instead of ~10 elementwise passes per tensor (CPU: G's optimizer
    # step 174 ms -> 29 ms on 2 cores, 54M parameters).
    return torch.optim.Adam(params, lr=t.lr, betas=(t.beta1, 0.999), fused=True)


@dataclass
class StepLosses:
    loss_D: torch.Tensor
    loss_G_GAN: torch.Tensor
    loss_G_L1: torch.Tensor


class Trainer:
    # What train_step returns: the losses dataclass, one field per term (fastp2p.distill's trainer adds its own).
    losses_type = StepLosses

    def __init__(self, cfg: Config, device: str | torch.device = "cpu", dist: distributed.Dist | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        # Multi-process (torchrun): the process group fit() joined, or one the caller made; else a no-op Dist().
        self.dist = dist if dist is not None else distributed.current(cfg.train.dist_timeout)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        # TF32 matmuls/convs and cudnn autotuning on CUDA, set around this trainer's own step only (backend_flags):
        # a reference-style eager baseline in the same process keeps torch's defaults.
        self.backend_flags = SPEED_FLAGS if self.device.type == "cuda" else {}
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        m = cfg.model
        self.G = build_generator(m.netG, m.input_nc, m.output_nc, m.ngf, m.norm, not m.no_dropout).to(self.device)
        self.D = build_discriminator(m.netD, m.input_nc + m.output_nc, m.ndf, m.n_layers_D, m.norm).to(self.device)
        if m.norm == "sync_batch" and self.dist.enabled:
            self.G, self.D = distributed.sync_batch_norm(self.G, self.D, self.device)
        self.dtype = amp_dtype(self.device) if cfg.train.amp else None
        if cfg.train.amp and self.dist.is_main:  # once per run: which precision --amp chose, and why
            if self.dtype is None:
                log.warning("--amp: this CPU has no native bf16 (avx512_bf16/AMX); training stays in fp32")
            elif self.device.type == "cuda":
                log.info("--amp: bf16 autocast (CUDA GPU with bf16)" if self.dtype == torch.bfloat16 else
                         "--amp: fp16 autocast + GradScaler (GPU without bf16)")
            else:
                log.info("--amp: bf16 autocast (this CPU has native bf16: avx512_bf16/AMX)")
        self.scale = self.dtype == torch.float16
        # One GradScaler per optimizer (fp16 only), as the reference-style two-optimizer GAN step needs.
        self.scaler_D = torch.amp.GradScaler(self.device.type, enabled=self.scale)
        self.scaler_G = torch.amp.GradScaler(self.device.type, enabled=self.scale)
        # Perf transforms in one fixed order (fastp2p.perf): channels-last -> fused kernels / GEMM convs -> compile.
        self.G_run, self.D_run = perf.apply_training_transforms(self.G, self.D, cfg, self.device)
        # The G step runs D through the plain module even under DDP. D is frozen there (only the gradient w.r.t. fake
        # is wanted), and a DDP forward would arm D's reducer for a backward that yields no D gradients: the next D
        # step then fails ("expected to have finished reduction in the prior iteration"). find_unused_parameters would
        # hide that at the price of a graph traversal per step; the plain module costs nothing, and D's weights are
        # the same object either way.
        self.D_frozen = self.D_run
        if self.dist.enabled:
            # DDP after the in-place perf transforms (it sees the final parameters and their channels-last strides)
            # and before torch.compile (the documented order: Dynamo's DDP optimizer splits graphs at DDP's buckets).
            self.G_run = distributed.wrap_ddp(self.G_run, self.device)
            self.D_run = distributed.wrap_ddp(self.D_run, self.device)
            distributed.seed_rank(cfg.train.seed, self.dist.rank)  # own dropout masks per rank (rank 0 keeps --seed)
        # --scale_lr: linear scaling for the world x batch_size global batch; off by default (the paper's lr).
        self.base_lr = cfg.train.lr * (self.dist.world_size if cfg.train.scale_lr else 1)
        self.steps_per_epoch: int | None = None  # set by fit(); kept in the train state to resume at another world size
        self.saved_layout: dict = {}
        self.opt_G = _adam(self.G.parameters(), cfg, self.device)
        self.opt_D = _adam(self.D.parameters(), cfg, self.device)
        self._d_loss = self._d_loss_eager
        self._g_loss = self._g_loss_eager
        if cfg.train.compile:
            # G's forward and both loss functions (D's forwards + losses); AOTAutograd compiles their backwards too.
            # The first step pays the compile (reported apart: summary "first_step_s").
            # --compile_mode: "max-autotune-no-cudagraphs" pairs with --cuda_graphs (fastp2p.graphs captures the whole
            # step); "reduce-overhead" lets inductor capture its own graphs per compiled region instead.
            # dynamic=False: a new batch shape (a partial last batch, another batch size in one benchmark process)
            # compiles its own static graph instead of turning on automatic-dynamic shapes, whose symbolic kernels
            # would then serve every later batch.
            mode = None if cfg.train.compile_mode in (None, "default") else cfg.train.compile_mode
            self.G_run = torch.compile(self.G_run, mode=mode, dynamic=False)
            self._d_loss = torch.compile(self._d_loss_eager, mode=mode, dynamic=False)
            self._g_loss = torch.compile(self._g_loss_eager, mode=mode, dynamic=False)
        self.step = 0
        self.epoch = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk (saved or resumed from), if any

    # -- the reference step ------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _d_loss_eager(self, A, B, fake):
        mode = self.cfg.train.gan_mode
        with self._autocast():
            pred_fake = self.D_run(torch.cat([A, fake.detach()], 1))
            pred_real = self.D_run(torch.cat([A, B], 1))
        return 0.5 * (gan_loss(pred_fake, False, mode) + gan_loss(pred_real, True, mode))

    def _g_loss_eager(self, A, B, fake):
        with self._autocast():
            pred_fake = self.D_frozen(torch.cat([A, fake], 1))
        loss_gan = gan_loss(pred_fake, True, self.cfg.train.gan_mode)
        loss_l1 = torch.nn.functional.l1_loss(fake.float(), B.float()) * self.cfg.train.lambda_L1
        return loss_gan, loss_l1

    def train_step(self, A: torch.Tensor, B: torch.Tensor) -> StepLosses:
        with backend_flags(self.backend_flags):
            return self._train_step(A, B)

    def _train_step(self, A: torch.Tensor, B: torch.Tensor) -> StepLosses:
        with self._autocast():
            fake = self.G_run(A)
        self.D.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        loss_D = self._d_loss(A, B, fake)
        self.scaler_D.scale(loss_D).backward()
        self.scaler_D.step(self.opt_D)
        self.scaler_D.update()
        # D is frozen for the G step: its weight gradients are never computed, only the gradient w.r.t. fake.
        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        # _g_loss returns (GAN, L1, *extra): pix2pix has no extra terms; a subclass's (fastp2p.distill) are added to
        # G's loss in order and returned as the further fields of losses_type.
        loss_G_GAN, loss_G_L1, *extra = self._g_loss(A, B, fake)
        loss_G = loss_G_GAN + loss_G_L1
        for term in extra:
            loss_G = loss_G + term
        self.scaler_G.scale(loss_G).backward()
        self.scaler_G.step(self.opt_G)
        self.scaler_G.update()
        self.step += 1
        self._last_fake = fake.detach()
        return self.losses_type(loss_D.detach(), loss_G_GAN.detach(), loss_G_L1.detach(), *(t.detach() for t in extra))

    def release_ddp(self) -> None:
        """Drop the DDP wrappers (``G_run`` / ``D_run`` become the plain modules, uncompiled) before leaving the
        process group: the trainer sits in a reference cycle (its bound loss methods), and a DDP module still alive
        at interpreter exit aborts the process ("terminate called without an active exception", seen with gloo)."""
        if self.dist.enabled:
            self.G_run, self.D_run = self.G, self.D_frozen

    # -- schedule ------------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> float:
        t = self.cfg.train
        self.epoch = epoch
        lr = self.base_lr * lr_factor(t.lr_policy, epoch, t.n_epochs, t.n_epochs_decay, t.lr_decay_iters)
        for opt in (self.opt_G, self.opt_D):
            for group in opt.param_groups:
                if torch.is_tensor(group["lr"]):  # --cuda_graphs: a device tensor the captured step reads
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        return lr

    # -- state ---------------------------------------------------------------------------------------------------------
    def train_state(self) -> dict:
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta: dict = {"python_random": _jsonable(random.getstate()), "step": self.step, "epoch": self.epoch,
                      "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                      "global_batch": self.cfg.train.batch_size * self.dist.world_size}
        for name, opt in (("opt_G", self.opt_G), ("opt_D", self.opt_D)):
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"{name}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            # A tensor lr (--cuda_graphs) is saved as the number it holds: checkpoints stay the same either way.
            meta[name] = {"param_groups": [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()}
                                           for g in sd["param_groups"]]}
        for name, sc in (("scaler_G", self.scaler_G), ("scaler_D", self.scaler_D)):
            meta[name] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in sc.state_dict().items()}
        return {"tensors": tensors, "meta": meta}

    def load_train_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        for name, opt in (("opt_G", self.opt_G), ("opt_D", self.opt_D)):
            state: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith(name + "."):
                    _, pid, field = k.split(".", 2)
                    state.setdefault(int(pid), {})[field] = v.to(self.device) if field != "step" else v
            opt.load_state_dict({"state": state, "param_groups": meta[name]["param_groups"]})
        for name, sc in (("scaler_G", self.scaler_G), ("scaler_D", self.scaler_D)):
            if meta.get(name):
                sc.load_state_dict(meta[name])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        random.setstate(_tuplify(meta["python_random"]))
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.saved_layout = {k: meta.get(k) for k in ("steps_per_epoch", "world_size", "global_batch")}

    def save(self, path: Path, extra: dict | None = None) -> Path:
        # The header's epoch is 1-based, as metrics.jsonl's rows and the summary count it (the epoch in progress, or
        # just completed at a boundary); the train state keeps the 0-based self.epoch that load_train_state resumes.
        out = checkpoint.save(path, cfg=self.cfg, G=self.G, D=self.D, step=self.step, epoch=self.epoch + 1,
                              train_state=self.train_state(), extra=extra)
        self.saved_step = self.step
        return out

    def load(self, path: Path) -> None:
        meta, tensors = checkpoint.load(path)
        _check_same_architecture(path, Config.from_dict(meta["config"]).model, self.cfg.model)
        self.G.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G.")})
        self.D.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("D.")})
        smeta, stensors = checkpoint.load_state(path, meta)
        self.load_train_state(smeta, stensors)
        self.saved_step = self.step


def _check_same_architecture(path: Path, saved, asked) -> None:
    """``--resume`` with flags that build other networks than the checkpoint's: name the flags, not a size dump."""
    def norm(v):  # sync_batch writes and reads batch norm's keys: the two interchange
        return "batch" if v == "sync_batch" else v

    differ = [f"--{f.name} {getattr(saved, f.name)} (this command: {getattr(asked, f.name)})"
              for f in dataclasses.fields(saved) if norm(getattr(saved, f.name)) != norm(getattr(asked, f.name))]
    if differ:
        raise UserError(f"--resume: {path} was trained with " + ", ".join(differ)
                        + "; pass the checkpoint's flags to continue it")


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# -- the training loop --
def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    t = cfg.train
    return t.max_steps if t.max_steps is not None else (t.n_epochs + t.n_epochs_decay) * steps_per_epoch


def fit(cfg: Config, progress: bool = True, wandb: bool = False, *, trainer_factory=None,
        reporter_factory=None) -> dict:
    """Train per ``cfg`` into ``<out>/<name>/``; returns the run summary. Ctrl-C or SIGTERM saves a checkpoint at the
    current step boundary and returns (``summary["interrupted"]`` names the signal). ``wandb``: also log to a Weights
    & Biases run (``--wandb``). ``trainer_factory(cfg, device, dist=...)`` / ``reporter_factory(run_dir, cfg, total,
    ...)``: another trainer or reporter with the same interface (None: ``Trainer`` / ``report.RunReporter``), so a
    subclass (``fastp2p.distill``) gets this loop's resume, signals, logging, evaluation and snapshots unchanged."""
    from . import data as data_mod
    from .report import RunReporter, check_loggers, trim_metrics

    run_dir = Path(cfg.train.out) / cfg.train.name
    ckpt = run_dir / "checkpoints" / "latest.safetensors"
    if cfg.train.resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt}; drop --resume to start a new run")
    check_loggers(cfg.train.tensorboard, wandb)  # on every rank, before any work: all stop, not rank 0 alone
    # Under torchrun (WORLD_SIZE > 1): join the process group; this rank trains on cuda:LOCAL_RANK or the CPU, on its
    # shard of the data, and rank 0 alone writes files (fastp2p.distributed).
    dctx = distributed.setup(cfg.train.device, cfg.train.dist_timeout)
    trainer = (trainer_factory or Trainer)(cfg, dctx.device(cfg.train.device), dist=dctx)
    if dctx.is_main:  # what a killed save left behind never blocks a fresh start or a resume (one warning line)
        checkpoint.clean_leftovers(ckpt)
    if cfg.train.resume:
        trainer.load(ckpt)
    elif ckpt.is_file():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    if dctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        # Rows logged after the checkpoint (a run killed before its next save) are for steps about to be redone.
        dropped = trim_metrics(run_dir / "metrics.jsonl", trainer.step)
        if dropped:
            log.warning("%s: dropped %d row(s) past step %d, logged by a run that stopped before saving them",
                        run_dir / "metrics.jsonl", dropped, trainer.step)

    dataset = data_mod.build_dataset(cfg.data, cfg.model.input_nc, cfg.model.output_nc, seed=cfg.train.seed)
    # --loader dali|torch|gpu-cache (fastp2p.data.backends). DALI batches are valid until the next one is requested:
    # the loop below uses each batch within its step and keeps none.
    loader = data_mod.make_train_loader(cfg, dataset, trainer.device, shard_id=dctx.rank, num_shards=dctx.world_size)

    def release() -> None:  # the loader's workers, then DDP's wrappers before the process group goes
        loader.close()
        trainer.release_ddp()
        dctx.close()

    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"--data: no pairs to train on in {cfg.data.data}")
    if cfg.data.preprocess == "none":  # images keep their own size, which only the data can tell: check the first
        from .models.unet import size_problem

        first, m = dataset[0], 2 ** trainer.G.num_downs
        h, w = first.A.shape[-2:]
        if any(size_problem(int(side), trainer.G.num_downs) for side in (h, w)):
            raise UserError(f"{first.path}: a {w}x{h} image, but with --preprocess none --netG {cfg.model.netG} "
                            f"takes sides that are multiples of {m} only ({m}, {2 * m}, ...); resize the images or "
                            "use another --preprocess")
    total = total_steps(cfg, steps_per_epoch)
    trainer.steps_per_epoch = steps_per_epoch
    if cfg.train.resume:
        # Another world size (or batch size) than the checkpoint's: keep its epoch and the images seen in it, renumber
        # the step (distributed.resume_step). Ranks > 0 reseed: they loaded rank 0's RNG state.
        trainer.step = distributed.resume_step(trainer.step, trainer.epoch, trainer.saved_layout, steps_per_epoch,
                                               cfg.train.batch_size * dctx.world_size)
        distributed.seed_rank(cfg.train.seed, dctx.rank, trainer.step)
        if trainer.step >= total:  # nothing to train: leave the checkpoint and the summary as they are
            release()
            if dctx.is_main:
                log.warning("--resume: %s is at step %d and this run ends at step %d (--max_steps or the schedule): "
                            "nothing to train; raise --max_steps to continue", ckpt, trainer.step, total)
            return {"steps": trainer.step, "epoch": trainer.epoch + 1, "trained_steps": 0, "interrupted": None,
                    "checkpoint": str(ckpt), "run_dir": str(run_dir), "rank": dctx.rank}
    # --eval_every: validation scores into metrics.jsonl, on the main process only (fastp2p.scoring.TrainEval)
    from .scoring import TrainEval

    evaluator = TrainEval.from_config(cfg) if dctx.is_main else None
    if dctx.is_main:  # logs the ranks' mean losses and the img/s of all ranks together (and TensorBoard / wandb)
        reporter = (reporter_factory or RunReporter)(run_dir, cfg, total, progress=progress, start_step=trainer.step,
                                                     world_size=dctx.world_size, wandb=wandb)
    else:
        reporter = distributed.NullReporter(dctx.rank, trainer.step)

    def save() -> None:
        if trainer.saved_step == trainer.step:  # the final save right after a periodic one, or nothing trained
            return
        # Every rank compares its weights with the others' (a collective, so all ranks save at the same steps); rank 0
        # alone writes. DDP keeps the replicas equal, so rank 0's G and D are the model.
        dctx.check_replicas(trainer.G, trainer.D)
        if dctx.is_main:
            trainer.save(ckpt)
        trainer.saved_step = trainer.step

    def snapshot() -> None:
        """At the end of every --save_epoch_freq-th epoch (1-based: epochs completed), the reference's
        <epoch>_net_G/D.pth as checkpoints/<epoch>.safetensors (weights only), pruned to --keep_last. Rank 0 alone:
        DDP keeps the replicas equal (and save() checks it)."""
        done, freq = trainer.step // steps_per_epoch, cfg.train.save_epoch_freq
        if dctx.is_main and freq and trainer.step % steps_per_epoch == 0 and done % freq == 0:
            checkpoint.save_snapshot(ckpt.parent, done, cfg=cfg, G=trainer.G, D=trainer.D, step=trainer.step,
                                     keep_last=cfg.train.keep_last)

    # --cuda_graphs (default on with CUDA where the step can be graphed): one graph replay per step, after the loaded
    # checkpoint (the graphs read parameters and optimizer state in place) and before the first step.
    from .graphs import step_function

    try:
        train_step = step_function(trainer, cfg.train.cuda_graphs)
    except UserError:
        release()
        raise

    # Ctrl-C / SIGTERM: finish the step in flight, then save a checkpoint at that step boundary (so --resume is
    # exact) and stop. A second signal aborts at once; the last checkpoint stays intact (a save is one transaction).
    # DataLoader workers ignore both signals (fastp2p.data.loader), so a SIGTERM sent to the whole process group
    # (Slurm, Kubernetes, `timeout`) reaches this handler alone and the workers live until the loader is closed.
    stop: dict[str, str | None] = {"sig": None}

    def on_signal(signum, frame):
        if stop["sig"] is not None:
            raise KeyboardInterrupt
        stop["sig"] = signal.Signals(signum).name
        if dctx.is_main:  # one stop message for the job, not one per rank
            log.warning("%s: stopping after this step and saving a checkpoint (again to abort without saving)",
                        stop["sig"])

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    first_step_s = None
    try:
        while trainer.step < total and stop["sig"] is None:
            epoch = trainer.step // steps_per_epoch
            lr = trainer.set_epoch(epoch)
            start = trainer.step - epoch * steps_per_epoch  # resume mid-epoch at the exact batch
            t0 = time.perf_counter()
            for A, B in loader.epoch(epoch, start=start):
                t_got = time.perf_counter()
                A = A.to(trainer.device, non_blocking=True)
                B = B.to(trainer.device, non_blocking=True)
                losses = train_step(A, B)
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_got
                losses = dctx.mean_losses(losses)  # one small all-reduce on the device, no host sync
                reporter.step(trainer, losses, A, B, lr, wait_s=t_got - t0)
                if evaluator is not None and trainer.step % cfg.train.eval_every == 0:
                    reporter.log_eval(trainer.step, evaluator(trainer.G, trainer.device))
                if trainer.step % cfg.train.save_every == 0:
                    save()
                snapshot()
                if dctx.enabled and dctx.any_rank(stop["sig"] is not None):  # all ranks stop at the same step
                    stop["sig"] = stop["sig"] or "signal on another rank"
                if trainer.step >= total or stop["sig"] is not None:
                    break
                t0 = time.perf_counter()
        if evaluator is not None and stop["sig"] is None and trainer.step % cfg.train.eval_every:
            reporter.log_eval(trainer.step, evaluator(trainer.G, trainer.device))  # the final weights too
        save()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        release()
    interrupted = stop["sig"]
    summary = reporter.close(trainer, bad_files=getattr(dataset, "bad_files", []), interrupted=interrupted)
    summary["checkpoint"] = str(ckpt)
    summary["first_step_s"] = first_step_s  # includes --compile's compile time; metrics.jsonl windows after it do not
    if not math.isfinite(summary.get("loss_G_L1", 0.0)):
        log.warning("training diverged: final loss is not finite")
    return summary
