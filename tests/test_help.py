"""Every command's --help: each flag says what it does, its default and its unit; flags that do not apply to a
command are not offered there; --amp says once which precision it chose. No training: parsers and one Trainer."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import subprocess
import sys

import pytest

from fastp2p.cli.main import build_parser, main
from fastp2p.config import PRESETS, Config, DataConfig, ModelConfig, TrainConfig

# The list: walking build_parser() must at least reach these (so a broken walk cannot pass by testing nothing).
EXPECTED = {"train", "translate", "pipe", "eval", "export", "build-engine", "convert", "info", "bench"}
# Commands whose on/off flags also say what happens without them ("without it ..." or a stated default).
SWITCHES_EXPLAINED = {"train", "translate", "pipe", "eval", "export", "build-engine"}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (nested) subcommand parser, by its command line ("train", "bench", ...)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_commands(sub, prefix + name + " "))
    return found


COMMANDS = _commands(build_parser())


def _flags(p: argparse.ArgumentParser):
    """(action, rendered help) of every documented argument: not -h, not subcommand lists, not hidden ones."""
    fmt = p._get_formatter()
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        yield a, fmt._expand_help(a) if a.help else ""


def _name(a: argparse.Action) -> str:
    return a.option_strings[-1] if a.option_strings else a.metavar or a.dest


def _mentions(help_text: str, value) -> bool:
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return "default" in help_text.lower() or re.search(rf"(?<![\w.]){re.escape(shown)}(?![\w.])", help_text) is not None


def test_the_walk_reaches_every_command():
    assert EXPECTED <= set(COMMANDS), EXPECTED - set(COMMANDS)


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_flag_has_help_with_its_default(cmd):
    p = COMMANDS[cmd]
    missing, no_default, unexplained = [], [], []
    for a, text in _flags(p):
        if not text.strip():
            missing.append(_name(a))
            continue
        if a.default not in (None, False, argparse.SUPPRESS) and not _mentions(text, a.default):
            no_default.append(f"{_name(a)} (default {a.default!r})")
        switch = isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        # An alias ("= --resume") leaves it to the flag it names; an official option with no effect here, or refused,
        # has no "without it" to tell.
        exempt = text.startswith("= ") or re.search(r"\bno effect\b|^refused", text)
        if cmd in SWITCHES_EXPLAINED and switch and not exempt and not re.search(r"without|default", text, re.I):
            unexplained.append(_name(a))
    assert not missing, f"{cmd}: no help: {missing}"
    assert not no_default, f"{cmd}: help does not state the default: {no_default}"
    assert not unexplained, f"{cmd}: on/off flags that do not say what happens without them: {unexplained}"


def _train_help() -> dict[str, str]:
    return {a.option_strings[-1]: text for a, text in _flags(COMMANDS["train"]) if a.option_strings}


def test_train_flags_state_the_preset_default():
    """train's flags default to None (the preset decides): each config field's help gives the default preset's value
    and every other preset's where it differs, as the config holds them now."""
    # The flag named as its field (--lr for lr), not an alias of it (--checkpoints_dir = --out).
    helps = {a.dest: text for a, text in _flags(COMMANDS["train"]) if f"--{a.dest}" in a.option_strings}
    owners = {f.name for sec in (ModelConfig, DataConfig, TrainConfig) for f in dataclasses.fields(sec)}
    checked = 0
    for dest, text in helps.items():
        if dest not in owners:
            continue
        values = {n: getattr(next(s for s in (c.model, c.data, c.train) if hasattr(s, dest)), dest)
                  for n, c in PRESETS.items()}
        base = values["default"]
        if base is None or base is False:
            continue
        checked += 1
        assert _mentions(text, base) and "default" in text, f"--{dest}: {text!r} lacks its default {base!r}"
        for name, v in values.items():
            shown = f"{v:g}" if isinstance(v, float) else str(v)
            if v != base:
                assert f"--preset {name}: {shown}" in text, f"--{dest}: {text!r} does not say --preset {name}: {v}"
    assert checked >= 20  # the ~20 flags the issue names, at least


def test_train_units():
    helps = _train_help()
    for flag in ("--log_every", "--sample_every", "--save_every"):
        assert re.search(r"\bsteps\b", helps[flag]), (flag, helps[flag])
    for flag, unit in (("--n_epochs", "epochs"), ("--n_epochs_decay", "epochs"), ("--lr_decay_iters", "epochs"),
                       ("--load_size", "pixels"), ("--crop_size", "pixels"), ("--dist_timeout", "seconds"),
                       ("--max_steps", "steps"), ("--batch_size", "images"), ("--max_pixels", "pixels")):
        assert unit in helps[flag], (flag, helps[flag])


def test_sync_batch_only_under_train():
    for cmd, p in COMMANDS.items():
        norm = next((a for a in p._actions if "--norm" in a.option_strings), None)
        if cmd == "train":
            assert "sync_batch" in norm.choices and "sync_batch" in p.format_help()
        else:
            assert "sync_batch" not in p.format_help(), cmd
            assert norm is None or "sync_batch" not in norm.choices, cmd
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["translate", "x.png", "--checkpoint", "G.safetensors", "-o", "o", "--norm",
                                   "sync_batch"])
    assert e.value.code == 2


def test_sync_batch_checkpoint_matches_norm_batch(tmp_path):
    """A checkpoint trained with --norm sync_batch holds batch norm's modules and keys: it loads without flags, and
    `--norm batch` given for it is not refused as a contradiction."""
    from fastp2p import checkpoint
    from fastp2p.cli.args import check_arch_flags
    from fastp2p.models import build_generator

    model = ModelConfig(netG="unet_128", ngf=4, norm="sync_batch")
    G = build_generator(model.netG, 3, 3, model.ngf, model.norm, True)
    path = tmp_path / "G.safetensors"
    checkpoint.save(path, cfg=Config(model=model), G=G)
    loaded, _ = checkpoint.load_generator(path, ModelConfig())
    assert loaded.state_dict().keys() == G.state_dict().keys()
    args = argparse.Namespace(netG=None, norm="batch", ngf=None, no_dropout=None)
    check_arch_flags(args, path)  # no UserError
    args.norm = "instance"
    from fastp2p.errors import UserError

    with pytest.raises(UserError, match="--norm instance"):
        check_arch_flags(args, path)


def test_dropout_flags_name_each_other():
    seen = 0
    for cmd, p in COMMANDS.items():
        helps = {a.option_strings[-1]: text for a, text in _flags(p) if a.option_strings}
        if "--no_dropout" in helps:
            assert "--no_dropout_at_inference" in helps["--no_dropout"], cmd
            seen += 1
        if "--no_dropout_at_inference" in helps:
            assert re.search(r"--no_dropout(?!_)", helps["--no_dropout_at_inference"]), cmd
            seen += 1
    assert seen >= 8  # translate, eval, export, build-engine have both


def test_export_states_its_default_mode():
    mode = next(text for a, text in _flags(COMMANDS["export"]) if "--mode" in a.option_strings)
    assert "default paper" in mode
    assert COMMANDS["export"].get_default("mode") == "paper"


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_command_help_runs(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd.split(), "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fastp2p {cmd}")


def test_help_and_version_from_the_shell():
    for argv in (["--help"], ["--version"], ["train", "--help"]):
        p = subprocess.run([sys.executable, "-m", "fastp2p", *argv], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (argv, p.stderr)
        assert p.stdout.strip(), argv


def _tiny(tmp_path, amp: bool) -> Config:
    return Config(ModelConfig(netG="unet_128", ngf=4, ndf=4), DataConfig(load_size=136, crop_size=128),
                  TrainConfig(out=str(tmp_path), name="t", amp=amp))


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "no-bf16-cpu"])
def test_amp_says_once_which_precision(tmp_path, monkeypatch, caplog, native):
    import torch

    from fastp2p import perf
    from fastp2p.train import Trainer

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: native)
    caplog.set_level(logging.INFO, logger="fastp2p.train")
    tr = Trainer(_tiny(tmp_path, amp=True), "cpu")
    lines = [r for r in caplog.records if r.name == "fastp2p.train" and r.getMessage().startswith("--amp")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    msg = lines[0].getMessage()
    if native:
        assert tr.dtype == torch.bfloat16
        assert lines[0].levelno == logging.INFO and "bf16 autocast" in msg and "native bf16" in msg
    else:
        assert tr.dtype is None
        assert lines[0].levelno == logging.WARNING and "fp32" in msg and "no native bf16" in msg
    caplog.clear()
    Trainer(_tiny(tmp_path, amp=False), "cpu")
    assert not [r for r in caplog.records if r.getMessage().startswith("--amp")]


def _readme_flags(after: str) -> dict[str, str]:
    """The ``--flag value`` pairs of the first code span after ``after`` in README.md's "## Flags" section."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("\n## Flags\n"):]
    section = " ".join(section[:section.index("\n## ", 1)].split())
    span = section[section.index(after) + len(after):].split("`")[1]
    return dict(re.findall(r"--(\w+) (?!-)(\S+)", span))


def test_readme_flag_defaults_are_the_presets():
    def value(cfg, name):
        v = getattr(next(s for s in (cfg.model, cfg.data, cfg.train) if hasattr(s, name)), name)
        return f"{v:g}" if isinstance(v, float) else str(v)

    listed = _readme_flags("Train's defaults are the default preset's")
    assert len(listed) >= 20
    assert {k: value(PRESETS["default"], k) for k in listed} == listed
    debug = _readme_flags("`--preset debug` is a tiny net (")
    assert debug and {k: value(PRESETS["debug"], k) for k in debug} == debug
    assert value(PRESETS["facades"], "direction") == "BtoA" != value(PRESETS["default"], "direction")
