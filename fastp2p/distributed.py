"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, ``torch.distributed`` joins them,
``DistributedDataParallel`` averages the gradients.

Launch (``fastp2p train --nproc N`` runs the first line for you, see ``launch``)::

    torchrun --nproc_per_node N -m fastp2p train ...                       # one machine, N processes (N GPUs)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host:29500 --rdzv_id job1 \\
        -m fastp2p train ...                                               # the same command on each of 2 machines

Each process reads its place from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins one
process group: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. What changes with ``WORLD_SIZE``
> 1 (``fastp2p.train`` does the wiring):

- G and D are each wrapped in ``DistributedDataParallel``; every rank draws its own slice of the same per-epoch
  permutation (``make_loader(shard_id=rank, num_shards=world)``), so one step trains on ``world x --batch_size``
  images and every rank ends the step with the same weights. The losses are means over the batch, so DDP's averaging
  of the ranks' gradients gives exactly the gradient of the big batch.
- ``--lr`` stays the paper's 2e-4 unless ``--scale_lr`` (linear scaling by the world size, for a bigger global batch;
  pix2pix's GAN + Adam recipe was not tuned for it, so it is opt-in).
- Rank 0 alone writes ``config.json``, checkpoints, samples, ``metrics.jsonl`` and ``summary.json``; the logged losses
  are averaged over the ranks; at every checkpoint all ranks compare a fingerprint of their weights, so ranks that
  drifted apart (the "ranks train independently" failure) stop the job instead of silently saving rank 0's model.
- Dropout and other random draws use a per-rank seed (rank 0 keeps ``--seed``'s stream, so one process is unchanged).
- ``--resume`` at the same world size is exact (data position, weights, optimizer; ranks > 0 reseed dropout from the
  step); at another world size or batch size it keeps the epoch and the images seen in it (``resume_step``).
- A rank that dies or hangs fails the job: gloo sees the peer's socket close at once; a silent hang hits the process
  group timeout (``--dist_timeout``, seconds); on NCCL ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` tears the process down
  instead of leaving it stuck in a kernel. torchrun then stops the other ranks and exits non-zero, and the surviving
  ranks print one line naming the lost contact.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field, fields
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger("fastp2p.distributed")

DEFAULT_TIMEOUT_S = 600


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers ({e}); launch with torchrun") from None
    return rank, world, local


@dataclass
class Dist:
    """This process's place in the job. ``world_size == 1`` (the default): no process group, every call a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owned: bool = False  # this object created the process group, so ``close`` destroys it
    cpu_group: object = field(default=None, repr=False)  # gloo group for host-side control values (None: default)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, kind: str) -> torch.device:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` (one GPU per process), else ``kind``."""
        if kind == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(kind)

    # -- collectives (no-ops in a single process) ---------------------------------------------------------------------
    def all_reduce_mean(self, values: dict) -> dict:
        """The mean over the ranks of each value (floats or 0-d tensors), in one collective. Tensors stay on their
        device (no host sync); floats come back as floats."""
        if not self.enabled or not values:
            return dict(values)
        tensors = [v for v in values.values() if torch.is_tensor(v)]
        device = tensors[0].device if tensors else self._collective_device()
        packed = torch.stack([v.detach().float().reshape(()).to(device) if torch.is_tensor(v)
                              else torch.tensor(float(v), device=device) for v in values.values()])
        dist.all_reduce(packed)  # SUM then divide: ReduceOp.AVG exists on NCCL only, not on gloo
        packed /= self.world_size
        return {k: (packed[i] if torch.is_tensor(v) else float(packed[i])) for i, (k, v) in enumerate(values.items())}

    def mean_losses(self, losses):
        """A copy of a losses dataclass (``fastp2p.train.StepLosses``) holding each loss's mean over the ranks."""
        if not self.enabled:
            return losses
        return type(losses)(**self.all_reduce_mean({f.name: getattr(losses, f.name) for f in fields(losses)}))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: lets all ranks agree to stop at the same step (a signal
        reaches them at different steps; a rank that stops alone would leave the others waiting in a collective).
        A host-side gloo all-reduce of one int (~0.1 ms), so the GPU stream is never synchronized for it."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def check_replicas(self, *modules: torch.nn.Module) -> None:
        """Raise when the ranks' parameters differ: a float64 sum and sum of squares per module, compared across the
        ranks (min vs max). DDP keeps replicas bitwise equal (the same all-reduced gradients, the same optimizer), so
        any difference means the ranks are training separate models."""
        if not self.enabled:
            return
        fp = []
        for m in modules:
            with torch.no_grad():
                ps = [p.detach().double() for p in m.parameters()]
                fp += [sum(p.sum() for p in ps), sum((p * p).sum() for p in ps)]
        v = torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in fp])
        both = torch.cat([v, -v])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.cpu_group)
        hi, lo = both[: len(v)], -both[len(v):]
        if not torch.allclose(hi, lo, rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"rank {self.rank}: the ranks hold different weights (parameter fingerprints "
                               f"{lo.tolist()} .. {hi.tolist()}); DDP replicas drifted apart, this is a bug")

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        """Leave the process group if this object made it (a group made by the caller stays)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            # Free what still refers to the group (DDP modules in reference cycles) now: one left for interpreter
            # exit aborts the process (std::terminate in gloo's teardown).
            gc.collect()
        self.owned = False


def is_main() -> bool:
    """True outside a process group and on rank 0: the process that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def current(timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """The process group already joined (by ``setup`` or by the caller), or a one-process ``Dist()``. Collective on
    NCCL (it makes the gloo control group): every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist(timeout_s=timeout_s)
    backend = dist.get_backend()
    # NCCL holds device tensors only; small host-side control values (stop flags, weight fingerprints) go over gloo.
    cpu = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend,
                timeout_s, owned=False, cpu_group=cpu)


def setup(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the job torchrun started (``WORLD_SIZE > 1``): NCCL with ``device="cuda"`` (``cuda:LOCAL_RANK``), gloo
    with "cpu"; the returned ``Dist`` owns the group (``close`` destroys it). A process group the caller made is used
    as it is; outside torchrun a ``Dist()`` whose collectives are no-ops."""
    if dist.is_available() and dist.is_initialized():
        return current(timeout_s)
    rank, world, local = env_world()
    if world <= 1:
        return Dist(timeout_s=timeout_s)
    if not dist.is_available():
        raise UserError("torchrun: this torch build has no torch.distributed; run a single process (no torchrun)")
    kwargs = {}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu (gloo)")
        if local >= torch.cuda.device_count():
            raise UserError(f"--nproc_per_node: local rank {local} has no GPU (this machine has "
                            f"{torch.cuda.device_count()}); start at most one process per GPU")
        torch.cuda.set_device(local)
        # A collective that fails or passes the timeout aborts the communicator and ends the process, instead of
        # leaving it spinning in a NCCL kernel forever (the default in older torch releases).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s), **kwargs)
    d = current(timeout_s)
    d.owned = True
    log.debug("rank %d/%d (local %d) joined the %s group", rank, world, local, d.backend)
    return d


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` as the trainer uses it.

    ``gradient_as_bucket_view``: the gradients live in DDP's all-reduce buckets (no copy in or out, one less copy of
    every gradient in memory); DDP lays each bucket view out with its parameter's strides, so channels-last weights
    keep channels-last gradients. ``broadcast_buffers=False``: batch-norm running statistics stay per rank (with
    ``--norm batch`` each rank normalizes its own images, the pix2pix meaning at batch 1; the checkpoint keeps rank
    0's), which saves a broadcast before every forward, three per step. Under ``--compile`` Dynamo's DDP optimizer
    splits the compiled graphs at bucket boundaries so the all-reduces still overlap the backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.13 names the per-forward buffer sync forward_sync_buffers (broadcast_buffers is deprecated there).
    new = "forward_sync_buffers" in inspect.signature(DDP).parameters
    sync = "forward_sync_buffers" if new else "broadcast_buffers"
    return DDP(module, device_ids=ids, output_device=device.index if ids else None, gradient_as_bucket_view=True,
               **{sync: False})


def sync_batch_norm(G: torch.nn.Module, D: torch.nn.Module, device: torch.device):
    """``--norm sync_batch`` in a multi-process run: every ``BatchNorm2d`` becomes a ``SyncBatchNorm`` (statistics
    over the whole global batch; same parameter and buffer names, so checkpoints interchange with ``--norm batch``).
    Done before the perf transforms, so the fused norm kernels (which compute per-rank statistics) leave them alone."""
    if device.type != "cuda":
        raise UserError("--norm sync_batch: SyncBatchNorm runs on CUDA only; on CPU use --norm batch (per-rank "
                        "statistics)")
    convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    return convert(G), convert(D)


class NullReporter:
    """The reporter of ranks other than 0: they write nothing (rank 0's ``RunReporter`` logs the ranks' mean)."""

    def __init__(self, rank: int, start_step: int = 0):
        self.rank, self.start_step = rank, start_step
        self.last: dict = {}

    def step(self, *args, **kwargs) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        pass

    def log_eval(self, *args, **kwargs) -> None:
        pass

    def close(self, trainer, bad_files=(), interrupted: str | None = None) -> dict:
        return {"rank": self.rank, "steps": trainer.step, "epoch": trainer.epoch + 1, "interrupted": interrupted}


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of ``rank``'s random stream (dropout): rank 0 keeps ``seed`` (a one-process run is unchanged)."""
    if rank == 0 and step == 0:
        return int(seed)
    from .data.datasets import derive_seed

    return derive_seed(seed, rank, step)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Reseed torch (CPU and CUDA) and ``random`` for ``rank``; rank 0 is left alone."""
    if rank == 0:
        return
    s = rank_seed(seed, rank, step)
    torch.manual_seed(s)
    random.seed(s)


def resume_step(step: int, epoch: int, saved: dict, steps_per_epoch: int, global_batch: int) -> int:
    """The step to resume at when the world size (or batch size) changed since the checkpoint.

    The step counter counts optimizer steps, and one step consumes ``world x batch`` images, so with another world
    size the same step number would land in another epoch (and another point of the lr schedule). The epoch and the
    images already seen in it are kept instead: resume in the same epoch at batch ``seen // new_global_batch``
    (rounded down: at most one global batch of that epoch is seen twice), and renumber the step to match. ``saved``
    holds the checkpoint's ``steps_per_epoch`` and ``global_batch`` (absent in older checkpoints: returns ``step``)."""
    spe0, gb0 = saved.get("steps_per_epoch"), saved.get("global_batch")
    if not spe0 or not gb0 or (spe0 == steps_per_epoch and gb0 == global_batch):
        return step
    seen = (step - epoch * spe0) * gb0
    return epoch * steps_per_epoch + min(steps_per_epoch, seen // global_batch)


def describe_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or hung; None for other errors."""
    rank, world, _ = env_world()  # from the environment: fit() has left the process group by the time this runs
    if world <= 1:
        return None
    text = " ".join(str(e).split())
    # torch raises DistError subclasses (DistBackendError, DistNetworkError) or, from gloo's transport, RuntimeErrors
    # whose text names gloo ("[.../gloo/transport/tcp/pair.cc] Read error ... Connection reset by peer").
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(e, dist_error) or (isinstance(e, RuntimeError) and ("gloo" in text or "nccl" in text.lower()))):
        return None
    return (f"rank {rank}: lost contact with the other ranks during a collective (a rank died, or stopped answering "
            f"for --dist_timeout); that rank's own output above says why; torch: {text[:300]}")


# -- the launcher ------------------------------------------------------------------------------------------------------
def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(argv: list[str], nproc: int) -> int:
    """``fastp2p train --nproc N``: run torchrun (``python -m torch.distributed.run --standalone --nproc_per_node N
    -m fastp2p <argv without --nproc>``, through ``run_torchrun``) and return its exit code.

    Each rank gets ``cores / N`` CPU threads unless ``OMP_NUM_THREADS`` is set (torchrun alone would give each one
    thread; cores: this process's affinity, ``fastp2p.perf.available_cores``). torchrun runs in its own session and
    a Ctrl-C (or SIGTERM) here is passed on to it once, so every rank sees exactly one signal: they agree on a step,
    save and stop, and the exit code is 128 + the signal (130, 143). From a terminal, plain torchrun's ranks would get
    the terminal's SIGINT and torchrun's forwarded one, and the second aborts without the final save."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        raise UserError("--nproc: already running under torchrun; drop --nproc (torchrun's --nproc_per_node sets it)")
    from .perf import WAIT_ENV, available_cores, thread_plan

    cmd = [sys.executable, "-m", "fastp2p.distributed", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "fastp2p", *strip_nproc(argv)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(thread_plan(0, available_cores(), nproc)[0]))
    # Short OpenMP spin-waits: N ranks' spinning threads would starve each other (fastp2p.perf.WAIT_ENV).
    for k, v in WAIT_ENV.items():
        env.setdefault(k, v)
    log.info("launching %d processes: torchrun %s", nproc, " ".join(cmd[3:]))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward_term(signum, frame):  # `timeout`, Slurm, Kubernetes: without it torchrun would outlive this process
        proc.send_signal(signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, forward_term) if _main_thread() else None
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)  # once per Ctrl-C; a second Ctrl-C aborts the ranks without a save
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _QuietStop(logging.Filter):
    """Drops torchrun's two log lines about forwarding a stop signal to the ranks (the ranks say it themselves);
    anything else, including "unable to shutdown ... forcefully exiting", still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not ("death signal" in msg or "closing signal" in msg)


def run_torchrun(argv: list[str]) -> int:
    """torchrun's ``main`` (``torch.distributed.run``) with a stop signal made an exit code: torchrun forwards a
    SIGINT / SIGTERM it receives to every rank, waits for them (they save and exit), then raises ``SignalException``,
    which plain torchrun prints as a traceback; here that is exit code 128 + the signal instead."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_QuietStop())
    try:
        torchrun(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":  # `python -m fastp2p.distributed <torchrun arguments>`: what `launch` runs
    sys.exit(run_torchrun(sys.argv[1:]))
