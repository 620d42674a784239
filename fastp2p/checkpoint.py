"""Checkpoints: safetensors weights with the run's metadata (config, step, epoch, versions, preprocessing) in the file
header, a JSON sidecar for people, and a second safetensors file with the optimizer, grad-scaler and RNG state.

Every write is atomic (temp file in the same folder, fsync, ``os.replace``), so an interrupted save never leaves a
half-written checkpoint behind. Reference ``.pth`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Config, ModelConfig
from .errors import UserError
from .models import build_generator, keys
from .models.unet import NUM_DOWNS

FORMAT = "fastp2p-checkpoint-1"


def versions() -> dict:
    v = {"fastp2p": __version__, "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def preprocessing(cfg: Config) -> dict:
    """What an image must go through before G sees it (timm's ``pretrained_cfg`` habit)."""
    d = cfg.data
    return {"direction": d.direction, "preprocess": d.preprocess, "load_size": d.load_size, "crop_size": d.crop_size,
            "input_nc": cfg.model.input_nc, "output_nc": cfg.model.output_nc, "norm": cfg.model.norm,
            "normalize": {"mean": 0.5, "std": 0.5, "range": [-1, 1]}}


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path``: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _contiguous(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # safetensors stores dense row-major tensors: channels-last weights are written in the standard layout.
    return {prefix + k: v.detach().contiguous().cpu() for k, v in keys.strip_wrappers(sd).items()}


def save(path: str | Path, *, cfg: Config, G, D=None, step: int = 0, epoch: int = 0, train_state: dict | None = None,
         extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors: G and D weights + metadata), ``path.json`` (the same metadata) and, with
    ``train_state`` (tensors keyed by name, plus a ``meta`` dict of JSON values), ``path.state.safetensors``."""
    path = Path(path)
    tensors = _contiguous(G.state_dict(), "G.")
    if D is not None:
        tensors.update(_contiguous(D.state_dict(), "D."))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "step": step, "epoch": epoch, "versions": versions(),
            "preprocessing": preprocessing(cfg), **(extra or {})}
    header = {"fastp2p": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    if train_state is not None:
        state_tensors = {k: v.detach().contiguous().cpu() for k, v in train_state["tensors"].items()}
        state_meta = {"fastp2p_state": json.dumps(train_state.get("meta", {}))}
        atomic_write(state_path(path), lambda tmp: save_file(state_tensors, tmp, metadata=state_meta))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def state_path(path: Path) -> Path:
    return path.with_name(path.stem + ".state.safetensors")


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise UserError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "fastp2p" not in header:
        raise UserError(f"{path}: a safetensors file without fastp2p metadata; convert it with `fastp2p convert`")
    return json.loads(header["fastp2p"])


def load(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a fastp2p checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    meta = read_meta(path)
    return meta, load_file(str(path))


def load_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    sp = state_path(Path(path))
    if not sp.is_file():
        raise UserError(f"{sp}: training state missing next to {path}; cannot --resume exactly")
    with safe_open(str(sp), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("fastp2p_state", "{}"))
    return meta, load_file(str(sp))


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_reference_pth(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{path}: cannot read as a reference pix2pix .pth state dict ({why})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a plain state dict of tensors (expected the reference's latest_net_G.pth)")
    return sd


def generator_from_reference(sd: dict[str, torch.Tensor], model: ModelConfig, source: str = "checkpoint"):
    """Build our generator from a reference state dict, checking it matches ``--netG/--norm/--no_dropout``."""
    sd = keys.strip_wrappers(sd)
    try:
        depth = keys.num_downs_of_reference(sd)
    except KeyError as e:
        raise UserError(f"{source}: {e.args[0]}") from None
    if depth != NUM_DOWNS[model.netG]:
        actual = {v: k for k, v in NUM_DOWNS.items()}.get(depth, f"a {depth}-level U-Net")
        raise UserError(f"{source}: holds {actual}, not --netG {model.netG}; pass --netG {actual}")
    in_nc = sd["model.model.0.weight"].shape[1]
    out_nc = sd["model.model.3.weight"].shape[1]
    ngf = sd["model.model.0.weight"].shape[0]
    G = build_generator(model.netG, in_nc, out_nc, ngf, model.norm, not model.no_dropout, init=False)
    fill = {}
    if model.norm == "none":  # the reference builds --norm none without conv biases: zero biases are the same function
        fill = {k: torch.zeros_like(v) for k, v in G.state_dict().items() if k.endswith(".bias")}
    try:
        mapped = keys.from_reference(sd, depth, fill_bias=fill)
        G.load_state_dict(mapped, strict=True)
    except (KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:300]
        raise UserError(f"{source}: does not match --netG {model.netG} --norm {model.norm} ({msg}); "
                        "check --norm / --ngf") from None
    return G


def load_generator(path: str | Path, model: ModelConfig | None = None):
    """(G, Config or None) from a fastp2p ``.safetensors`` checkpoint or a reference ``.pth`` (then ``model`` describes
    the architecture, defaulting to the reference's unet_256 / batch / dropout on)."""
    path = Path(path)
    if path.suffix == ".pth" or path.suffix == ".pt":
        return generator_from_reference(load_reference_pth(path), model or ModelConfig(), str(path)), None
    meta, tensors = load(path)
    cfg = Config.from_dict(meta["config"])
    m = cfg.model
    G = build_generator(m.netG, m.input_nc, m.output_nc, m.ngf, m.norm, not m.no_dropout, init=False)
    try:
        G.load_state_dict(_sub(tensors, "G."), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: generator weights do not match its own config ({str(e).splitlines()[0]})") from None
    return G, cfg
