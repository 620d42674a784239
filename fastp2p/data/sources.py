"""Which dataset a ``DataConfig`` describes: the built-in synthetic pairs, aligned A|B files or A/ + B/ folders."""

from __future__ import annotations

from ..config import DataConfig
from .datasets import AlignedDataset, PairDataset, TwoFolderDataset, check_data_config, resolve_root
from .synthetic import SyntheticDataset


def build_dataset(cfg: DataConfig, input_nc: int = 3, output_nc: int = 3, seed: int = 0) -> PairDataset:
    """The dataset ``cfg`` describes: the built-in synthetic pairs when ``cfg.data`` is None, else an aligned or
    two-folder dataset (see ``resolve_root``). ``seed`` drives the per-item jitter (see the module docstring)."""
    check_data_config(cfg, input_nc, output_nc)
    if cfg.data is None:
        return SyntheticDataset(cfg, input_nc, output_nc, seed)
    root, layout = resolve_root(cfg)
    if layout == "folders":
        return TwoFolderDataset(root, cfg, input_nc, output_nc, seed)
    return AlignedDataset(root, cfg, input_nc, output_nc, seed)

