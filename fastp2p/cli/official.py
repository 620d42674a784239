"""The official repo's ``train.py`` / ``test.py`` options (junyanz/pytorch-CycleGAN-and-pix2pix) on fastp2p's commands.

Users come with scripts and muscle memory: ``fastp2p train`` takes train.py's command line, ``fastp2p eval`` test.py's
(it writes the images and an index.html, as test.py does), and translate / eval / export pick a checkpoint the
reference's way (``--name``, ``--epoch N|latest``, ``--checkpoints_dir``). Each option is one of:

- an alias of a fastp2p flag (``dest=`` that flag's): ``--dataroot`` = ``--data``, ``--continue_train`` = ``--resume``;
- translated by ``apply_train`` / ``apply_test`` / ``apply_translate`` / ``apply_selection`` (one call at the top of
  each ``cmd_*``): counts in images -> steps, ``--gpu_ids`` -> device / processes, ``--phase`` -> the split;
- refused with one line when it would change results in a way fastp2p does not implement (``--pool_size 50``);
- accepted with one warning line when it has no effect on results (visdom's ``--display_*``).

Every option the reference has and fastp2p translates is kept under ``official_*`` dests and removed from the
namespace by the ``apply_*`` call, so the commands see only their own flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from ..errors import UserError
from .args import non_negative, positive

log = logging.getLogger("fastp2p.official")
TITLE = "official pix2pix options (junyanz/pytorch-CycleGAN-and-pix2pix)"
PREFIX = "official_"

# The reference's values that fastp2p implements (its pix2pix model sets pool_size 0, gan_mode vanilla; init_weights
# draws N(0, 0.02)): any other value would change results, so it is refused with one line.
IMPLEMENTED = {"init_type": "normal", "init_gain": 0.02, "pool_size": 0, "load_iter": 0, "max_dataset_size": math.inf,
               "aspect_ratio": 1.0}
WHY = {
    "init_type": "fastp2p initialises as the reference's default, normal (N(0, --init_gain 0.02))",
    "init_gain": "fastp2p initialises with the reference's default gain 0.02",
    "pool_size": "fastp2p trains pix2pix without an image pool (the reference's pix2pix sets --pool_size 0)",
    "load_iter": "fastp2p keeps per-epoch snapshots, not per-iteration ones; pick one with --epoch N",
    "max_dataset_size": "fastp2p uses the whole split; put a subset of the images in a folder of their own",
    "aspect_ratio": "fastp2p writes square outputs at the model's size",
    "serial_batches": "fastp2p always shuffles the training pairs (the reference's default)",
    "save_by_iter": "fastp2p keeps latest.safetensors (--save_every N steps) and per-epoch snapshots "
                    "(--save_epoch_freq); there are no per-iteration files",
}
# Options with no effect on results: accepted, named in one warning line with what fastp2p offers instead.
VISUAL = ("display_id", "display_server", "display_port", "display_env", "display_ncols", "display_winsize",
          "update_html_freq", "no_html")
INSTEAD = ("fastp2p has no visdom/HTML display: it writes samples/*.png, metrics.jsonl, loss_curve.png and "
           "TensorBoard events (--tensorboard)")


def _store(g, flag: str, help: str, **kw) -> None:
    """A reference option that fastp2p translates: dest ``official_<name>``, default None (= not given)."""
    kw.setdefault("metavar", flag[2:].upper())
    g.add_argument(flag, dest=PREFIX + flag[2:], default=None, help=help, **kw)


def _flag(g, flag: str, help: str) -> None:
    g.add_argument(flag, dest=PREFIX + flag[2:], action="store_true", default=None, help=help)


def _alias(g, flag: str, dest: str, target: str, help: str = "", **kw) -> None:
    """Another name for an existing flag: same dest; SUPPRESS keeps that flag's own default."""
    g.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=f"= {target}{f' ({help})' if help else ''}", **kw)


def _finite_or_inf(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    return x


def _common(g, *, train: bool) -> None:
    """Options train.py and test.py share (BaseOptions) that the fastp2p command does not already have."""
    _store(g, "--gpu_ids", metavar="IDS",
           help="-1: the CPU (--device cpu); 0: that GPU (--device cuda with CUDA_VISIBLE_DEVICES=0); "
                + ("0,1: those GPUs, one process each (--nproc 2 --device cuda)" if train else
                   "one GPU only (inference runs on one device)") + " (default: fastp2p's --device)")
    _store(g, "--model", help="pix2pix only (fastp2p trains and runs pix2pix" + ("" if train else
                                                                               "; test = a pix2pix generator") + ")")
    _store(g, "--dataset_mode", help="aligned only (A|B pairs: fastp2p's own layout)" if train else
           "aligned (eval's pairs)")
    _store(g, "--init_type", help="normal only (the reference's and fastp2p's init)" if train else
           "no effect at test time")
    _store(g, "--init_gain", type=float, help="0.02 only" if train else "no effect at test time")
    _store(g, "--max_dataset_size", type=_finite_or_inf, help="inf only (fastp2p uses the whole split)")
    _store(g, "--load_iter", type=non_negative, help="0 only (fastp2p keeps per-epoch snapshots: --epoch N)")
    _flag(g, "--serial_batches", "refused: fastp2p shuffles, as the reference's default" if train else
          "no effect (test.py forces it; eval reads the split in order)")
    _store(g, "--display_winsize", type=int, help="no effect (visdom/HTML display size)")
    if train:
        _alias(g, "--use_wandb", "wandb", "--wandb", "Weights & Biases logging", action="store_true")
    else:
        _flag(g, "--use_wandb", "no effect at test time")
    _store(g, "--wandb_project_name", help="no effect (fastp2p train --wandb logs to project fastp2p)")
    _store(g, "--suffix", help="no effect (the run folder is <checkpoints_dir>/<name>: put the suffix in --name)")
    _alias(g, "--verbose", "verbose", "fastp2p -v", "debug logging", action="store_true")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """``fastp2p train``: --save_epoch_freq / --keep_last (fastp2p features) and train.py's options."""
    p.add_argument("--save_epoch_freq", type=non_negative, default=None,
                   help="at the end of every N-th epoch keep a weights snapshot checkpoints/<epoch>.safetensors "
                        "(G and D, no optimizer state), as the reference's <epoch>_net_G.pth; 0: none (default 5, "
                        "the reference's)")
    p.add_argument("--keep_last", type=positive, default=None,
                   help="keep only the newest N per-epoch snapshots, deleting older ones (never latest.safetensors; "
                        "default: keep all, as the reference)")
    g = p.add_argument_group(TITLE, "train.py's command line works as is: aliases of fastp2p flags, translated "
                                    "options, and (one warning line) options with no effect here")
    _alias(g, "--dataroot", "data", "--data", "the dataset root; its <phase>/ split is used", metavar="DIR")
    _alias(g, "--checkpoints_dir", "out", "--out", "the run folder is <checkpoints_dir>/<name>", metavar="DIR")
    _alias(g, "--continue_train", "resume", "--resume", "continues from checkpoints/latest.safetensors",
           action="store_true")
    _alias(g, "--num_threads", "num_workers", "--num_workers", type=non_negative, metavar="N")
    _alias(g, "--phase", "phase", "the split folder under --data", "default train", metavar="SPLIT")
    _alias(g, "--niter", "n_epochs", "--n_epochs", "its older name", type=non_negative, metavar="N")
    _alias(g, "--niter_decay", "n_epochs_decay", "--n_epochs_decay", "its older name", type=non_negative,
           metavar="N")
    _common(g, train=True)
    for flag, ours in (("--print_freq", "--log_every"), ("--display_freq", "--sample_every"),
                       ("--save_latest_freq", "--save_every")):
        _store(g, flag, type=positive, metavar="IMAGES",
               help=f"counted in images, as the reference (total_iters += batch_size): {ours} max(1, N // "
                    "--batch_size) steps")
    _store(g, "--epoch_count", type=int, metavar="N",
           help="1 for a new run; with --continue_train the checkpoint's own epoch is used (a warning when N "
                "differs)")
    _store(g, "--epoch", metavar="latest", help="with --continue_train: latest only (latest.safetensors holds the "
                                                "optimizer state; snapshots hold weights only)")
    _alias(g, "--which_epoch", PREFIX + "epoch", "--epoch", "its older name", metavar="latest")
    _store(g, "--pool_size", type=non_negative, help="0 only (the reference's pix2pix default: no image pool)")
    _flag(g, "--save_by_iter", "refused: snapshots are per epoch (--save_epoch_freq)")
    for name in VISUAL:
        if name == "no_html":
            _flag(g, "--no_html", "no effect (there is no HTML page while training)")
        elif name != "display_winsize":
            _store(g, f"--{name}", help="no effect (visdom display; fastp2p: samples/, metrics.jsonl, TensorBoard)")


def add_selection_flags(p: argparse.ArgumentParser, dest: str = "checkpoint") -> None:
    """translate / eval / export: pick a run's checkpoint by --name and --epoch instead of giving its path (``dest``:
    the flag or positional it fills, which stops being required)."""
    for group in p._mutually_exclusive_groups:  # --checkpoint | --engine: one of them, or --name
        if any(a.dest == dest for a in group._group_actions):
            group.required = False
    for a in p._actions:  # export's CHECKPOINT positional becomes optional
        if a.dest == dest and not a.option_strings:
            a.nargs, a.required, a.default = "?", False, None
    g = p.add_argument_group("checkpoint by run and epoch (the official repo's way)",
                             "without a checkpoint file: <checkpoints_dir>/<name>/checkpoints/<epoch>.safetensors, "
                             "or a reference run's <checkpoints_dir>/<name>/<epoch>_net_G.pth")
    _store(g, "--name", help="the run's name (its folder under --checkpoints_dir)")
    _store(g, "--epoch", metavar="N|latest", help="a per-epoch snapshot (fastp2p train --save_epoch_freq) or latest "
                                                  "(default latest)")
    _alias(g, "--which_epoch", PREFIX + "epoch", "--epoch", "its older name", metavar="N|latest")
    _store(g, "--checkpoints_dir", metavar="DIR", help="where runs are (default runs, fastp2p train's --out)")


def add_test_flags(p: argparse.ArgumentParser) -> None:
    """``fastp2p eval``: test.py's options (eval writes the images and index.html, as test.py does)."""
    add_selection_flags(p)
    for a in p._actions:  # --data or --dataroot
        if a.dest == "data":
            a.required = False
    g = p.add_argument_group(TITLE, "test.py's command line works as is, with fastp2p eval in place of "
                                    "python test.py")
    _store(g, "--dataroot", metavar="DIR",
           help="the dataset root, read as test.py does: its <phase>/ split (default test), at most --num_test "
                "(default 50) pairs, results in <results_dir>/<name>/<phase>_<epoch>/")
    _store(g, "--phase", metavar="SPLIT", help="the split folder under --data / --dataroot (default: --data as "
                                                "given; test with --dataroot)")
    _store(g, "--results_dir", metavar="DIR",
           help="output <results_dir>/<name>/<phase>_<epoch>/ (index.html, images/), as test.py (default results "
                "with --dataroot, else -o)")
    _store(g, "--num_test", type=positive, metavar="N", help="= --max_images (default 50 with --dataroot)")
    _flag(g, "--eval", "= --mode eval (running statistics, no dropout); without it paper mode, test.py's default")
    _store(g, "--aspect_ratio", type=float, help="1 only (outputs are square, at the model's size)")
    _store(g, "--load_size", type=positive, help="the model's --crop_size only (test.py's default load_size = "
                                                 "crop_size: no crop)")
    _store(g, "--preprocess", help="resize_and_crop only (test-time: a resize to --crop_size)")
    _common(g, train=False)
    _alias(g, "--ntest", PREFIX + "num_test", "--num_test", "its older name", type=positive, metavar="N")
    _alias(g, "--how_many", PREFIX + "num_test", "--num_test", "its older name", type=positive, metavar="N")
    for flag in ("--num_threads", "--ndf", "--netD", "--n_layers_D", "--input_nc", "--output_nc",
                 "--display_id"):
        _store(g, flag, help="no effect at test time")
    _flag(g, "--no_flip", "no effect (test.py forces it; eval never flips)")


def add_translate_flags(p: argparse.ArgumentParser) -> None:
    """``fastp2p translate``: checkpoint selection and test.py's --model / --dataset_mode / --gpu_ids."""
    add_selection_flags(p)
    g = p.add_argument_group(TITLE)
    _store(g, "--model", help="pix2pix or test (a pix2pix generator)")
    _store(g, "--dataset_mode", help="aligned (= --layout aligned) or single (= --layout single)")
    _store(g, "--gpu_ids", metavar="IDS", help="-1: --device cpu; 0: --device cuda on that GPU (one GPU only)")


# -- applying them -----------------------------------------------------------------------------------------------------
def _take(args) -> dict:
    """Remove the ``official_*`` values from ``args`` (the command's config sees only its own flags)."""
    got = {}
    for k in [k for k in vars(args) if k.startswith(PREFIX)]:
        got[k[len(PREFIX):]] = getattr(args, k)
        delattr(args, k)
    return got


def _check_model(model: str | None, accepted=("pix2pix",)) -> None:
    if model is not None and model not in accepted:
        raise UserError(f"--model {model}: fastp2p trains and runs pix2pix only; use --model pix2pix (or leave "
                        "--model out)")


def _check_dataset_mode(mode: str | None, accepted=("aligned",)) -> None:
    if mode is not None and mode not in accepted:
        raise UserError(f"--dataset_mode {mode}: here fastp2p reads {' or '.join(accepted)} images "
                        "(A|B pairs side by side, or A/ and B/ folders); use --dataset_mode aligned")


def _refuse(o: dict, names) -> None:
    for name in names:
        v = o.get(name)
        if v is None or v is False:
            continue
        if name in IMPLEMENTED and v == IMPLEMENTED[name]:
            continue
        shown = f"--{name}" if v is True else f"--{name} {v:g}" if isinstance(v, float) else f"--{name} {v}"
        raise UserError(f"{shown}: not implemented, and it would change results ({WHY[name]}); leave it out")


def _warn_no_effect(o: dict, names, instead: str) -> None:
    given = [f"--{n}" for n in names if o.get(n) not in (None, False)]
    if given:
        log.warning("%s: no effect in fastp2p (accepted for the official repo's scripts); %s", ", ".join(given),
                    instead)


def _gpu_list(value: str) -> list[int]:
    """The reference's --gpu_ids: comma-separated numbers; negative ones are dropped (-1 alone: the CPU)."""
    try:
        ids = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--gpu_ids {value}: expected GPU numbers separated by commas (0 or 0,1), or -1 for the "
                        "CPU") from None
    ids = [i for i in ids if i >= 0]
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpu_ids {value}: a GPU is named twice")
    return ids


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _select_gpus(ids: list[int], value: str) -> None:
    """CUDA_VISIBLE_DEVICES = those GPUs (numbered as this process sees them), set before torch initialises CUDA, so
    cuda:0 is the first of them, as the reference's torch.cuda.set_device(gpu_ids[0]); then check they exist."""
    import torch

    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in old.split(",")] if old and old.strip() else None
    if visible is not None and max(ids) >= len(visible):
        raise UserError(f"--gpu_ids {value}: CUDA_VISIBLE_DEVICES={old} shows {len(visible)} GPU(s), numbered 0 to "
                        f"{len(visible) - 1} here")
    new = ",".join(visible[i] for i in ids) if visible is not None else ",".join(map(str, ids))
    if torch.cuda.is_initialized() and new != old:
        raise UserError(f"--gpu_ids {value}: CUDA is already initialised in this process; set "
                        f"CUDA_VISIBLE_DEVICES={new} before starting it")
    os.environ["CUDA_VISIBLE_DEVICES"] = new
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < len(ids):
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
        where = "no CUDA device is available here" if have == 0 else f"only {have} of these GPUs exist here"
        raise UserError(f"--gpu_ids {value}: {where}; use --gpu_ids -1 for the CPU")


def _device_from_gpus(args, value: str, *, several: bool) -> list[int]:
    """--gpu_ids -> args.device (contradicting --device: one line); returns the GPU ids."""
    ids = _gpu_list(value)
    want = "cuda" if ids else "cpu"
    if getattr(args, "device", None) not in (None, want):
        raise UserError(f"--gpu_ids {value} and --device {args.device} contradict each other; give one of them")
    if len(ids) > 1 and not several:
        raise UserError(f"--gpu_ids {value}: this command runs on one GPU; give one id (e.g. --gpu_ids {ids[0]})")
    args.device = want
    return ids


def apply_train(args) -> None:
    """Translate train.py's options in ``args`` to fastp2p's flags (warnings and refusals: one line each)."""
    from ..config import preset

    o = _take(args)
    _check_model(o.get("model"))
    _check_dataset_mode(o.get("dataset_mode"))
    _refuse(o, ("serial_batches", "max_dataset_size", "init_type", "init_gain", "pool_size", "save_by_iter",
                "load_iter"))
    _warn_no_effect(o, VISUAL, INSTEAD)
    _warn_no_effect(o, ("wandb_project_name", "suffix"),
                    "fastp2p train --wandb logs to Weights & Biases; the run folder is <checkpoints_dir>/<name>")
    base = preset(args.preset)
    batch = args.batch_size or base.train.batch_size
    for name, dest in (("print_freq", "log_every"), ("display_freq", "sample_every"),
                       ("save_latest_freq", "save_every")):
        n = o.get(name)
        if n is None:
            continue
        steps = max(1, n // batch)
        if getattr(args, dest) not in (None, steps):
            raise UserError(f"--{name} {n} and --{dest} {getattr(args, dest)}: the same setting twice (--{name} "
                            f"counts images: {steps} step(s) at --batch_size {batch}); give one of them")
        setattr(args, dest, steps)
    _train_epochs(args, o, base)
    if o.get("gpu_ids") is not None:
        _train_gpus(args, o["gpu_ids"])


def _train_epochs(args, o: dict, base) -> None:
    count, epoch = o.get("epoch_count"), o.get("epoch")
    if epoch is not None:
        from ..checkpoint import EPOCH_NAME

        if not EPOCH_NAME.match(epoch):
            raise UserError(f"--epoch {epoch}: expected an epoch number or latest")
    if not args.resume:
        if count not in (None, 1):
            raise UserError(f"--epoch_count {count}: fastp2p starts a new run at epoch 1 (the lr schedule counts from "
                            "there); drop it, or add --continue_train to continue a run from its checkpoint")
        _warn_no_effect({"epoch": epoch if epoch not in (None, "latest") else None}, ("epoch",),
                        "without --continue_train nothing is loaded (as in the reference)")
        return
    if epoch not in (None, "latest"):
        raise UserError(f"--epoch {epoch}: --continue_train resumes from latest.safetensors, the one checkpoint with "
                        "the optimizer state (per-epoch snapshots hold weights only); drop --epoch")
    if count is None:
        return
    from .. import checkpoint

    run = Path(args.out or base.train.out) / (args.name or base.train.name)
    ckpt = run / "checkpoints" / "latest.safetensors"
    if not ckpt.is_file():
        return  # fit says there is nothing to continue, naming the path
    state = checkpoint.read_state_meta(ckpt)
    if "epoch" not in state:
        return  # unreadable: --resume reports it, naming the file
    spe = state.get("steps_per_epoch")
    done = bool(spe) and state.get("step", 0) >= (state["epoch"] + 1) * spe  # saved at the end of its epoch
    nxt = state["epoch"] + 1 + int(done)  # the 1-based epoch the run continues in
    if count != nxt:
        log.warning("--epoch_count %d: ignored; --continue_train continues %s in epoch %d (the checkpoint's own "
                    "count, which keeps the lr schedule and the data order exact)", count, ckpt, nxt)


def _train_gpus(args, value: str) -> None:
    ids = _device_from_gpus(args, value, several=True)
    if not ids:
        return
    n = len(ids)
    if args.nproc not in (None, n) or (n == 1 and args.nproc not in (None, 1)):
        raise UserError(f"--gpu_ids {value} and --nproc {args.nproc} contradict each other (one process per GPU); "
                        "give one of them")
    if _under_torchrun():
        # A rank of the job --gpu_ids started (or of a torchrun by hand): the launcher chose the GPUs already
        # (CUDA_VISIBLE_DEVICES is inherited) and each rank takes cuda:LOCAL_RANK.
        world = int(os.environ["WORLD_SIZE"])
        if n != world:
            raise UserError(f"--gpu_ids {value}: {n} GPU(s) for {world} torchrun processes; give one GPU per process")
        return
    _select_gpus(ids, value)
    if n > 1:
        args.nproc = n  # cmd_train's torchrun path, as --nproc N
        if getattr(args, "argv", None) is None:  # called without main() (tests)
            args.argv = list(sys.argv[1:])


def _select(args, o: dict, dest: str, flag: str) -> None:
    """--name / --epoch / --checkpoints_dir -> ``args.<dest>`` when no checkpoint (or engine) was given."""
    name, epoch, root = o.get("name"), o.get("epoch"), o.get("checkpoints_dir")
    if getattr(args, dest, None) is not None or getattr(args, "engine", None) is not None:
        given = [f for f, v in (("--name", name), ("--epoch", epoch), ("--checkpoints_dir", root)) if v is not None]
        if given:
            raise UserError(f"{given[0]}: picks a checkpoint in a run folder, and {flag} already names one; give one "
                            "of them")
        return
    if name is None:
        if epoch is not None or root is not None:
            raise UserError(f"--{'epoch' if epoch is not None else 'checkpoints_dir'}: needs --name (the run folder "
                            "<checkpoints_dir>/<name>)")
        raise UserError(f"{flag} is required: a checkpoint file, or --name NAME [--epoch N] for a run's checkpoint "
                        "under --checkpoints_dir (default runs)")
    from ..checkpoint import run_checkpoint

    path = run_checkpoint(root or "runs", name, epoch or "latest")
    log.info("--name %s --epoch %s: %s", name, epoch or "latest", path)
    setattr(args, dest, str(path))


def apply_selection(args, dest: str = "checkpoint", flag: str = "--checkpoint") -> dict:
    """export (and the others): the checkpoint picked by --name / --epoch; returns the official values taken."""
    o = _take(args)
    _select(args, o, dest, flag)
    return o


def apply_translate(args) -> None:
    o = apply_selection(args, "checkpoint", "--checkpoint or --engine")
    _check_model(o.get("model"), ("pix2pix", "test"))
    mode = o.get("dataset_mode")
    _check_dataset_mode(mode, ("aligned", "single"))
    if mode is not None:
        if args.layout not in ("auto", mode):
            raise UserError(f"--dataset_mode {mode} and --layout {args.layout} contradict each other; give one")
        args.layout = mode
    _inference_gpu(args, o.get("gpu_ids"))


def _inference_gpu(args, value: str | None) -> None:
    ids = _device_from_gpus(args, value, several=False) if value is not None else []
    if ids:
        _select_gpus(ids, value)


def apply_test(args) -> None:
    """Translate test.py's options in ``args`` (eval's) to eval's flags."""
    o = apply_selection(args, "checkpoint", "--checkpoint or --engine")
    _check_model(o.get("model"))
    _check_dataset_mode(o.get("dataset_mode"))
    _refuse(o, ("max_dataset_size", "load_iter", "aspect_ratio"))
    _warn_no_effect(o, ("display_id", "display_winsize", "use_wandb", "wandb_project_name", "suffix", "num_threads",
                        "serial_batches", "no_flip", "init_type", "init_gain", "ndf", "netD", "n_layers_D",
                        "input_nc", "output_nc"),
                    "eval reads the split in order, unflipped, on one device, and writes index.html + images/")
    if o.get("preprocess") not in (None, "resize_and_crop"):
        raise UserError(f"--preprocess {o['preprocess']}: eval resizes each image to the model's --crop_size "
                        "(test.py's default resize_and_crop with load_size = crop_size); leave --preprocess out")
    if o.get("load_size") is not None and o["load_size"] != (args.crop_size or _model_crop(args)):
        raise UserError(f"--load_size {o['load_size']}: eval resizes to the model's crop size "
                        f"({args.crop_size or _model_crop(args)}; test.py's default load_size = crop_size, no crop); "
                        "leave --load_size out")
    _inference_gpu(args, o.get("gpu_ids"))
    if o.get("eval"):
        if args.mode not in (None, "eval"):
            raise UserError(f"--eval and --mode {args.mode} contradict each other; give one of them")
        args.mode = "eval"
    # --dataroot reads the dataset as test.py does: its --phase split (default test), --num_test pairs (default 50),
    # results in <results_dir>/<name>/<phase>_<epoch>/ (default results/).
    dataroot = o.get("dataroot")
    if dataroot is not None and args.data is not None:
        raise UserError("--dataroot and --data: the same setting twice; give one of them")
    if dataroot is None and args.data is None:
        raise UserError("--data is required (or the official repo's --dataroot): a folder of A|B pairs or a dataset "
                        "root")
    root = Path(dataroot or args.data)
    phase = o.get("phase") or ("test" if dataroot is not None else None)
    if phase is not None:
        split = root / phase
        if not split.is_dir():
            there = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            pick = "val" if "val" in there else there[0] if there else None
            hint = f" (there: {', '.join(there)}); pass --phase {pick}" if pick else ""
            raise UserError(f"--phase {phase}: no folder {split}{hint}")
        args.data = str(split)
    else:
        args.data = str(root)
    num_test = o.get("num_test") or (50 if dataroot is not None else None)
    if num_test is not None:
        if args.max_images not in (None, num_test):
            raise UserError(f"--num_test {num_test} and --max_images {args.max_images}: the same setting twice; give "
                            "one of them")
        args.max_images = num_test
    results = o.get("results_dir") or ("results" if dataroot is not None and args.out is None else None)
    if results is not None:
        if args.out is not None:
            raise UserError(f"--results_dir {results} and -o {args.out}: two output folders; give one of them")
        name = o.get("name") or "experiment_name"  # the reference's default --name
        args.out = str(Path(results) / name / f"{phase or root.name}_{o.get('epoch') or 'latest'}")


def _model_crop(args) -> int:
    """The crop size the checkpoint carries (a reference .pth: 256, test.py's default)."""
    src = getattr(args, "checkpoint", None) or getattr(args, "engine", None)
    if src and str(src).endswith(".safetensors") and Path(src).is_file():
        from ..checkpoint import read_meta

        return int((read_meta(src).get("preprocessing") or {}).get("crop_size", 256))
    if src and str(src).endswith(".onnx") and Path(src).is_file():
        from ..engines.onnx import read_onnx_meta

        return int(read_onnx_meta(src)["preprocessing"]["crop_size"])
    return 256
