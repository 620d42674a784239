"""Data layer: reference pix2pix preprocessing, paired datasets (aligned A|B files, A/ + B/ folders, built-in
synthetic) and a deterministic multi-worker loader. See datasets.py for the item contract, loader.py for batches."""

from .backends import make_train_loader
from .datasets import AlignedDataset, Pair, PairDataset, TwoFolderDataset
from .loader import Batch, PairLoader, collate, make_loader
from .sources import build_dataset
from .synthetic import SyntheticDataset
from .transforms import apply, get_params

__all__ = [
    "AlignedDataset",
    "Batch",
    "Pair",
    "PairDataset",
    "PairLoader",
    "SyntheticDataset",
    "TwoFolderDataset",
    "apply",
    "build_dataset",
    "collate",
    "get_params",
    "make_loader",
    "make_train_loader",
]
