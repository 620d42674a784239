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

Per-epoch snapshots (``<epoch>.safetensors``, weights only, as the reference's ``<epoch>_net_G.pth``) are single
atomic files beside ``latest``; they are not leftovers (only their temp files are). The header's ``epoch`` is
1-based, the ``epoch`` of ``metrics.jsonl`` at the same step; the training state keeps the 0-based one it resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
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
    # A killed snapshot save (``<epoch>.safetensors`` / ``<epoch>.json``) leaves its temp file too; the snapshots
    # themselves are complete files (one rename each), never leftovers.
    found += sorted(p for p in folder.glob(".*.tmp") if _SNAPSHOT_TMP.match(p.name) and p not in found)
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


# -- per-epoch snapshots (the reference's <epoch>_net_G.pth / <epoch>_net_D.pth) ---------------------------------------
SNAPSHOT = "epoch"  # the header's "snapshot" value: what marks a file as one fit wrote (and may prune)
_SNAPSHOT_NAME = re.compile(r"^(\d+)\.safetensors$")
_SNAPSHOT_TMP = re.compile(r"^\.\d+\.(safetensors|json)\..*\.tmp$")
EPOCH_NAME = re.compile(r"^(latest|\d+|iter_\d+)$")  # what --epoch takes (iter_N: the reference's --save_by_iter)


def snapshot_path(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"{int(epoch)}.safetensors"


def snapshots(folder: str | Path) -> dict[int, Path]:
    """``{epoch: path}`` of the per-epoch snapshots in a run's ``checkpoints/`` folder, oldest first: files named
    ``<epoch>.safetensors`` whose header marks them as fastp2p snapshots (anything else there is left alone)."""
    found = {}
    for p in Path(folder).glob("*.safetensors"):
        m = _SNAPSHOT_NAME.match(p.name)
        if not m:
            continue
        try:
            ours = read_meta(p).get("snapshot") == SNAPSHOT
        except UserError:
            ours = False
        if ours:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def save_snapshot(folder: str | Path, epoch: int, *, cfg: Config, G, D=None, step: int = 0,
                  keep_last: int | None = None) -> Path:
    """``<folder>/<epoch>.safetensors``: G and D weights with the run's metadata, no optimizer state (a snapshot is
    for translate / eval / export; --resume continues from latest.safetensors). Atomic like every save. With
    ``keep_last``, older snapshots beyond the newest ``keep_last`` are deleted (with their .json sidecars)."""
    path = save(snapshot_path(folder, epoch), cfg=cfg, G=G, D=D, step=step, epoch=epoch,
                extra={"snapshot": SNAPSHOT})
    if keep_last:
        for old in list(snapshots(folder).values())[:-keep_last]:
            _unlink(old)
            _unlink(old.with_suffix(".json"))
    return path


def run_checkpoint(root: str | Path, name: str, epoch: str = "latest") -> Path:
    """The checkpoint of epoch ``epoch`` (a number, or ``latest``) of the run ``<root>/<name>``: fastp2p's
    ``checkpoints/<epoch>.safetensors`` (``latest.safetensors``), else a reference-trained ``<epoch>_net_G.pth``.
    Missing: one line naming the path tried and the epochs that are there."""
    epoch = str(epoch)
    if not EPOCH_NAME.match(epoch):
        raise UserError(f"--epoch {epoch}: expected an epoch number or latest")
    run = Path(root) / name
    ours = run / "checkpoints" / f"{epoch}.safetensors"
    theirs = run / f"{epoch}_net_G.pth"
    for p in (ours, theirs):
        if p.is_file():
            return p
    have = [str(e) for e in snapshots(run / "checkpoints")]
    if (run / "checkpoints" / "latest.safetensors").is_file():
        have.append("latest")
    have += sorted({p.name[: -len("_net_G.pth")] for p in run.glob("*_net_G.pth")} - set(have),
                   key=lambda e: (not e.isdigit(), int(e) if e.isdigit() else 0, e))
    where = (f"available epochs: {', '.join(have)}" if have else
             f"{run} holds no checkpoints; check --name / --checkpoints_dir")
    raise UserError(f"--epoch {epoch}: no checkpoint at {ours} (nor a reference {theirs}); {where}")


def read_state_meta(path: str | Path, meta: dict | None = None) -> dict:
    """The JSON part of the training state of checkpoint ``path`` (step, 0-based epoch, steps_per_epoch, ...), read
    from the state file's header without loading its tensors; ``{}`` when it cannot be read."""
    path = Path(path)
    try:
        with safe_open(str(state_path(path, meta if meta is not None else read_meta(path))), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("fastp2p_state", "{}"))
    except Exception:  # missing or damaged: --resume reports it, naming the file
        return {}


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


# ---------------------------------------------------------------------------------------------------------------------
# the sidecar ``convert --to reference`` writes beside a .pth
# ---------------------------------------------------------------------------------------------------------------------
REFERENCE_SIDECAR_FORMAT = "fastp2p-reference-sidecar-1"


def reference_sidecar_path(pth: str | Path) -> Path:
    """``latest_net_G.pth`` -> ``latest_net_G.fastp2p.json``: a name the reference's tools never read (they load
    ``<epoch>_net_<G|D>.pth`` only), so the .pth stays a plain reference file."""
    pth = Path(pth)
    return pth.with_name(pth.stem + ".fastp2p.json")


def reference_sidecar(cfg: Config, pth: str | Path, source: str | Path) -> dict:
    """What a reference .pth cannot hold: the fastp2p config (direction, preprocessing, sizes, architecture)."""
    return {"format": REFERENCE_SIDECAR_FORMAT, "written_by": f"fastp2p {__version__} convert", "pth": Path(pth).name,
            "pth_sha256": file_hash(pth), "source": Path(source).name, "config": cfg.to_dict(),
            "preprocessing": preprocessing(cfg)}


def write_reference_sidecar(cfg: Config, pth: str | Path, source: str | Path) -> Path:
    side = reference_sidecar_path(pth)
    text = json.dumps(reference_sidecar(cfg, pth, source), indent=2) + "\n"
    atomic_write(side, lambda tmp: Path(tmp).write_text(text))
    return side


def read_reference_sidecar(pth: str | Path) -> dict | None:
    """The sidecar of ``pth`` (None when there is none, or when it describes another file than ``pth``: one warning
    line). A damaged one is a ``UserError`` naming it."""
    pth = Path(pth)
    side = reference_sidecar_path(pth)
    if not side.is_file():
        return None
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{side}: unreadable fastp2p sidecar of {pth.name} ({first_line(e)}); fix or remove it "
                        "(then pass --direction / --crop_size / --load_size / --preprocess)") from None
    if not isinstance(d, dict) or d.get("format") != REFERENCE_SIDECAR_FORMAT or not isinstance(d.get("config"), dict):
        raise UserError(f"{side}: not a fastp2p convert sidecar (no format {REFERENCE_SIDECAR_FORMAT!r} / config); "
                        "fix or remove it")
    try:
        Config.from_dict(d["config"])
    except (AttributeError, TypeError) as e:  # a hand-edited section that is not an object, or an unknown shape
        raise UserError(f"{side}: its config is not a fastp2p config ({first_line(e)}); fix or remove it") from None
    if d.get("pth_sha256") and pth.is_file() and d["pth_sha256"] != file_hash(pth):
        log.warning("%s: describes another version of %s (sha256 differs: the .pth changed since convert wrote "
                    "it); ignoring it", side, pth.name)
        return None
    return d
