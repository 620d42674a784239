"""Loader selection (``--loader dali|torch|gpu-cache``); what the backends share lives in plan.py.

Every backend yields the same batch contract as ``PairLoader`` (see loader.py): ``(A, B)`` float tensors in [-1, 1],
``A`` the source with ``input_nc`` channels, ``B`` the target; ``len(loader)`` batches per epoch; ``loader.epoch(e,
start=k)`` resumes mid-epoch; ``loader.bad_files``; ``loader.close()``. They also share the *content* of an epoch:
the order is ``EpochSampler(n, seed, shuffle).order(epoch)`` and the jitter of the item at index ``i`` is
``get_params(..., random.Random(derive_seed(seed, epoch, i)))``, so for one (seed, epoch) the torch, DALI and
gpu-cache loaders produce the same pairs with the same crops and flips, in the same batches (pixels differ only by the
resize implementation: see tests/test_dali.py for the tolerance).

Auto selection (``DataConfig.loader = None``): ``dali`` when training on CUDA with DALI installed and the dataset is
made of image files, else ``torch``. ``gpu-cache`` is never picked automatically: it holds the whole decoded dataset
in device memory, which only the user can judge (facades: 400 pairs x 256x512x3 = 157 MB).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from ..config import Config
from ..errors import UserError
from .datasets import PairDataset
from .plan import file_backed

LOADERS = ("dali", "torch", "gpu-cache")
log = logging.getLogger("fastp2p.data")
DALI_INSTALL = 'pip install -c constraints-cpu.txt -e ".[dali]" (or: pip install nvidia-dali-cuda130)'


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dali_load_error() -> str | None:
    """Why DALI, though installed, cannot be imported here (its wheel loads CUDA libraries at import, e.g.
    ``ImportError: libcudart.so.13: cannot open shared object file``), as one line; None when it imports."""
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.pipeline  # noqa: F401
    except (ImportError, OSError) as e:  # missing or mismatched CUDA runtime, a broken install
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return None


def require_dali() -> None:
    """``UserError`` naming --loader dali when DALI is not installed or cannot be loaded (checked before any work)."""
    if not dali_available():
        raise UserError(f"--loader dali: NVIDIA DALI is not installed; install it with {DALI_INSTALL}, "
                        f"or use --loader torch")
    why = dali_load_error()
    if why is not None:
        raise UserError(f"--loader dali: NVIDIA DALI is installed but could not be loaded ({why}); use --loader "
                        "torch, or install the DALI build for this machine's CUDA")


def resolve_loader(name: str | None, device: torch.device, dataset: PairDataset | None = None) -> str:
    """The backend ``--loader name`` means on ``device`` (``None``: auto, see the module docstring)."""
    if name is None:
        if device.type == "cuda" and dali_available() and (dataset is None or file_backed(dataset)):
            why = dali_load_error()
            if why is None:
                return "dali"
            log.warning("NVIDIA DALI is installed but could not be loaded (%s); using --loader torch", why)
        return "torch"
    if name not in LOADERS:
        raise UserError(f"--loader: unknown loader {name!r}; choose one of {', '.join(LOADERS)}")
    if name == "dali":
        require_dali()
        if dataset is not None and not file_backed(dataset):
            raise UserError("--loader dali: the built-in synthetic dataset has no image files for DALI to read; "
                            "pass --data, or use --loader torch / gpu-cache")
    return name


def output_channels_last(cfg: Config, device: torch.device) -> bool:
    """Whether batches should come channels-last: the trainer's own rule (``--channels_last``, default on for CUDA)."""
    cl = cfg.train.channels_last
    return device.type == "cuda" if cl is None else bool(cl)


def make_train_loader(cfg: Config, dataset: PairDataset, device: str | torch.device, shard_id: int = 0,
                      num_shards: int = 1):
    """The training loader ``cfg.data.loader`` selects, over ``dataset``, yielding batches for ``device``.

    ``shard_id``/``num_shards`` (multi-GPU): this process's share of every epoch. torch: ``make_loader``'s sharding;
    dali/gpu-cache: each shard gets ``ceil(n / num_shards)`` pairs per epoch (see ``epoch_slice``)."""
    from .loader import make_loader

    device = torch.device(device)
    t, d = cfg.train, cfg.data
    name = resolve_loader(d.loader, device, dataset)
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
    if name == "torch":
        # make_loader takes shard arguments only in multi-process runs (they are new there, see loader.py).
        shards = {"shard_id": shard_id, "num_shards": num_shards} if num_shards > 1 else {}
        return make_loader(dataset, t.batch_size, d.num_workers, t.seed, device=device.type, **shards)
    channels_last = output_channels_last(cfg, device)
    if name == "dali":
        from .dali import DaliLoader

        return DaliLoader(dataset, t.batch_size, t.seed, device=device, num_threads=max(1, d.num_workers),
                          shard_id=shard_id, num_shards=num_shards, channels_last=channels_last)
    from .gpu_cache import GpuCacheLoader

    return GpuCacheLoader(dataset, t.batch_size, t.seed, device=device, shard_id=shard_id, num_shards=num_shards,
                          channels_last=channels_last)
