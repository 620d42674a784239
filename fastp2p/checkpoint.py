"""Checkpoints: safetensors weights with the run's metadata (config, step, epoch, versions, preprocessing) in the file
header, a JSON sidecar for people, and a second safetensors file with the optimizer, grad-scaler and RNG state.

A save is one transaction, committed by one rename. The training state goes first, to a file named for this save
(``latest.state.<step>-<token>.safetensors``); then the weights file, whose header names that state file and carries
its token, replaces ``latest.safetensors`` (temp file in the same folder, fsync, ``os.replace``, fsync of the folder):
that rename is the commit. Only then are the JSON sidecar rewritten and the previous save's state file deleted. So a
kill at any instant leaves the previous complete checkpoint or the new one: the weights file always names a state
file that exists and belongs to it, and whatever a killed save left behind (temp files, a state file that no weights
file names, a sidecar of another step) is found by ``leftovers`` and cleaned by ``clean_leftovers``. A full disk is
checked before anything is written (and caught at the write): one line naming the folder and the bytes needed, the
previous checkpoint untouched. Reference ``.pth`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Config, ModelConfig
from .errors import UserError, first_line
from .models import build_generator, keys
from .models.unet import NUM_DOWNS

FORMAT = "fastp2p-checkpoint-1"
log = logging.getLogger("fastp2p.checkpoint")


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
    """``write(tmp_path)`` then fsync and rename over ``path``: readers see the old file or the new one, never half.
    A full disk (or quota) becomes a ``UserError`` naming ``path``; the temp file is removed either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(Path(tmp))
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{path}: no space left on the device while writing it ({_free_text(path.parent)}); "
                            "free some space and run again") from None
        raise
    except BaseException:
        _unlink(Path(tmp))
        raise
    _fsync_dir(path.parent)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (ext4/xfs after a power cut; a kill needs none).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        return "free space unknown"


def _contiguous(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # safetensors stores dense row-major tensors: channels-last weights are written in the standard layout.
    return {prefix + k: v.detach().contiguous().cpu() for k, v in keys.strip_wrappers(sd).items()}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _check_space(folder: Path, need: int) -> None:
    """Refuse a save that cannot fit before writing a byte of it (the previous checkpoint stays as it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder}: not enough space for the checkpoint: it needs {need / 1e6:.1f} MB, "
                        f"{free / 1e6:.1f} MB free; free some space (the previous checkpoint there is intact)")


STATE_GLOB = "*.state*.safetensors"


def save(path: str | Path, *, cfg: Config, G, D=None, step: int = 0, epoch: int = 0, train_state: dict | None = None,
         extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors: G and D weights + metadata), ``path.json`` (the same metadata) and, with
    ``train_state`` (tensors keyed by name, plus a ``meta`` dict of JSON values), the training state file that the
    weights header names: one transaction, committed by the rename of ``path`` (see the module docstring)."""
    path = Path(path)
    tensors = _contiguous(G.state_dict(), "G.")
    if D is not None:
        tensors.update(_contiguous(D.state_dict(), "D."))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "step": step, "epoch": epoch, "versions": versions(),
            "preprocessing": preprocessing(cfg), **(extra or {})}
    state_tensors, new_state = {}, None
    if train_state is not None:
        state_tensors = {k: v.detach().contiguous().cpu() for k, v in train_state["tensors"].items()}
        token = uuid.uuid4().hex[:12]
        new_state = path.with_name(f"{path.stem}.state.{step:07d}-{token}.safetensors")
        meta["train_state"] = {"file": new_state.name, "token": token}
    # Room for the new files beside the old ones (the old state file is deleted only after the commit), plus headers.
    _check_space(path.parent, _nbytes(tensors) + _nbytes(state_tensors) + (1 << 20))
    header = {"fastp2p": json.dumps(meta)}
    if new_state is not None:
        state_meta = {"fastp2p_state": json.dumps(train_state.get("meta", {})), "token": meta["train_state"]["token"]}
        atomic_write(new_state, lambda tmp: save_file(state_tensors, tmp, metadata=state_meta))
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))  # the commit
    except BaseException:
        if new_state is not None:
            _unlink(new_state)  # named by no weights file: the previous checkpoint stays whole
        raise
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    for old in path.parent.glob(path.stem + STATE_GLOB[1:]):
        if old != new_state:
            _unlink(old)  # the previous save's state (or a pre-transaction ``<stem>.state.safetensors``)
    return path


def state_path(path: Path, meta: dict | None = None) -> Path:
    """The training state file of the checkpoint ``path`` (named in its header; older checkpoints:
    ``<stem>.state.safetensors`` beside it)."""
    ts = (meta or {}).get("train_state")
    if isinstance(ts, dict) and isinstance(ts.get("file"), str):
        return path.with_name(Path(ts["file"]).name)
    return path.with_name(path.stem + ".state.safetensors")


def leftovers(path: str | Path) -> list[Path]:
    """Files beside the checkpoint ``path`` that an interrupted save left behind: temp files, state files that its
    weights header does not name (all of them when ``path`` does not exist)."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return []
    found = sorted(folder.glob(f".{path.stem}*.tmp"))
    keep = None
    if path.is_file():
        try:
            keep = state_path(path, read_meta(path))
        except UserError:
            return found  # an unreadable checkpoint is the user's to look at; --resume says what is wrong with it
    found += sorted(p for p in folder.glob(path.stem + STATE_GLOB[1:]) if p != keep)
    return found


def clean_leftovers(path: str | Path) -> list[Path]:
    """Delete ``leftovers(path)`` (one warning line naming them) and rewrite a JSON sidecar that does not describe
    the weights file (a save killed between its commit and the sidecar). Returns the deleted files."""
    path = Path(path)
    junk = leftovers(path)
    if junk:
        log.warning("%s: removing what an interrupted save left behind: %s", path.parent,
                    ", ".join(p.name for p in junk))
        for p in junk:
            _unlink(p)
    sidecar = path.with_suffix(".json")
    try:
        meta = read_meta(path) if path.is_file() else None
    except UserError:
        meta = None
    if meta is not None:
        try:
            stale = json.loads(sidecar.read_text()) != meta
        except (OSError, ValueError):
            stale = True
        if stale:
            atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return junk


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise UserError(f"{path}: not a readable safetensors checkpoint ({first_line(e)})") from None
    if "fastp2p" not in header:
        raise UserError(f"{path}: a safetensors file without fastp2p metadata; convert it with `fastp2p convert`")
    try:
        meta = json.loads(header["fastp2p"])
    except ValueError as e:
        raise UserError(f"{path}: its fastp2p metadata is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UserError(f"{path}: its fastp2p metadata has no config; not a fastp2p checkpoint (or a damaged one)")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # truncated or damaged data after a readable header
        raise UserError(f"{path}: cannot read its tensors ({first_line(e)}); the file is damaged") from None


def load(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a fastp2p checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    meta = read_meta(path)
    return meta, _load_tensors(path)


def load_state(path: str | Path, meta: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The training state saved with the checkpoint ``path`` (``meta``: its header, if already read)."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    sp = state_path(path, meta)
    if not sp.is_file():
        raise UserError(f"{sp}: training state missing next to {path}; cannot --resume exactly")
    try:
        with safe_open(str(sp), framework="pt") as f:
            header = f.metadata() or {}
        smeta = json.loads(header.get("fastp2p_state", "{}"))
    except Exception as e:
        raise UserError(f"{sp}: training state unreadable ({first_line(e)}); cannot --resume exactly") from None
    token = (meta.get("train_state") or {}).get("token")
    if token is not None and header.get("token") != token:
        raise UserError(f"{sp}: training state of another save than {path}; cannot --resume exactly")
    return smeta, _load_tensors(sp)


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
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save's zip archive, or the legacy pickle format
        raise UserError(f"{path}: not a torch .pth file (expected the reference's latest_net_G.pth)")
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
        msg = first_line(e, 300)
        raise UserError(f"{source}: does not match --netG {model.netG} --norm {model.norm} ({msg}); "
                        "check --norm / --ngf") from None
    return G


def load_generator(path: str | Path, model: ModelConfig | None = None):
    """(G, Config or None) from a fastp2p ``.safetensors`` checkpoint or a reference ``.pth`` (then ``model`` describes
    the architecture, defaulting to the reference's unet_256 / batch / dropout on)."""
    path = Path(path)
    if path.suffix.lower() in (".pth", ".pt"):
        return generator_from_reference(load_reference_pth(path), model or ModelConfig(), str(path)), None
    meta, tensors = load(path)
    cfg = Config.from_dict(meta["config"])
    m = cfg.model
    G = build_generator(m.netG, m.input_nc, m.output_nc, m.ngf, m.norm, not m.no_dropout, init=False)
    try:
        G.load_state_dict(_sub(tensors, "G."), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: generator weights do not match its own config ({first_line(e, 10**6)})") from None
    return G, cfg
