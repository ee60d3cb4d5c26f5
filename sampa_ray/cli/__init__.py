"""Command line: ``sampa-ray train``, ``sampa-ray compare`` (``.train``), ``sampa-ray sweep``
(seeds and grids on Ray Tune, ``sampa_ray.sweep``; ``.sweep``), ``sampa-ray runs``
(the runs in a folder; ``.runs``), ``sampa-ray bench`` (the communication-cost study,
``sampa_ray.study``; ``.bench``), and ``status``, ``watch``, ``checkpoint``, ``stop`` for a
running coordinator (``--target HOST:PORT``; ``.control``).

This module registers the commands and dispatches to them; each command's flags and handler
live in its own module, imported when the parser is built so ``import sampa_ray.cli`` stays
light. Every error a user can cause ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import signals
from ..config import TrainConfig, make_config
from ..config_yaml import load_yaml
from ..errors import RunFailed, UserError, one_line
from ..recipes import RECIPES, recipe
from ..settings import GROUPS, meta

EXIT_USER = 2
#: 128 + SIGPIPE: the reader of the output went away (the shell's code for a tool SIGPIPE ends)
EXIT_PIPE = 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USER, f"sampa-ray: {one_line(message)}\n")


def _yes_no(text: str) -> bool:
    """A boolean flag's value: true/false (also yes/no, 1/0)."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        return value[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _flag_type(annotation: Any) -> tuple[Any, tuple[str, ...] | None]:
    """A flag's argument type (and choices) from a config field's annotation: bool, int,
    float, str, a Literal of strings, each optionally ``| None``; None for what a flag cannot
    give (mappings)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, tuple(str(v) for v in typing.get_args(annotation))
    return {bool: _yes_no, int: int, float: float, str: str}.get(annotation), None


def config_flags(cls: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """The flags that map one-to-one onto config fields (field -> argument type), derived
    from the fields' declarations (``config.setting``): a field with a flag gets one."""
    flags = {}
    for name, field in cls.model_fields.items():
        typ, _ = _flag_type(field.annotation)
        if meta(cls, name).get("flag") and name != "resume" and typ is not None:
            flags[name] = typ
    return flags


#: the flags that map one-to-one onto TrainConfig fields (field -> argument type)
CONFIG_FLAGS: dict[str, Any] = config_flags()
#: flags that add one KEY=VALUE entry to a mapping field (the value read as YAML: 3, 0.5, true)
MAPPING_FLAGS = {"model_arg": "model_args", "dataset_arg": "dataset_args",
                 "algo_arg": "algo_args"}
_MAPPING_OF = {"model_args": "the model factory", "dataset_args": "the dataset factory",
               "algo_args": "the algorithm (its Params; rho and lam are flags of their own)"}


def add_config_flags(p: argparse.ArgumentParser, cls: type[TrainConfig] = TrainConfig) -> None:
    """``--recipe``, ``--config``, one flag per config field that has one (its choices where
    it is a Literal), grouped as the fields are (``config.GROUPS``), the ``--x-arg`` flags of
    the mapping fields, ``--resume`` and ``--overwrite``."""
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from a named recipe's fields (paper: the official code's "
                   "training recipe; see README 'Reproducing the paper'); --config and flags "
                   "override it")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields")
    groups = {g: p.add_argument_group(f"{g} options") for g in GROUPS}
    for name, typ in config_flags(cls).items():
        group = groups.get(meta(cls, name).get("group", ""), p)
        flag, help_ = "--" + name.replace("_", "-"), flag_help(name, cls)
        _, choices = _flag_type(cls.model_fields[name].annotation)
        listed = meta(cls, name).get("choices")
        choices = tuple(listed()) if callable(listed) else choices
        if typ is _yes_no:  # ``--flag`` alone means true; ``--flag false`` is explicit
            group.add_argument(flag, dest=name, type=typ, default=None, nargs="?", const=True,
                               metavar="true|false", help=help_)
        else:
            group.add_argument(flag, dest=name, type=typ, default=None, choices=choices,
                               metavar="{" + ",".join(choices) + "}" if choices else
                               name.upper(), help=help_)
    for flag, field_name in MAPPING_FLAGS.items():
        group = groups.get(meta(cls, field_name).get("group", ""), p)
        group.add_argument("--" + flag.replace("_", "-"), dest=flag, action="append",
                           default=None, type=_key_value, metavar="KEY=VALUE",
                           help=f"one keyword argument of {_MAPPING_OF[field_name]} (repeat "
                           "the flag for more; VALUE is read as YAML: 3, 0.5, true, text)")
    out = groups["outputs"]
    out.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR|auto",
                     help="continue the run in folder DIR (default: the --out folder) from its "
                     "newest valid checkpoint, with the config stored there: other flags may "
                     "only change how it runs (threads, backend, ...); outputs go to that "
                     "folder. 'auto': continue the --out folder's run if it has checkpoints, "
                     "else start it (for jobs that a cluster restarts)")
    out.add_argument("--overwrite", action="store_true",
                     help="allow --out to name a folder that already holds a finished or an "
                     "interrupted run (its old checkpoints are removed first)")


def flag_help(name: str, cls: type[TrainConfig] = TrainConfig) -> str:
    """The help of a config field's flag: its description, then its default where that says
    something (a description that explains its own default, or a default of None, which means
    "see the description", gets no second one)."""
    field = cls.model_fields[name]
    help_ = field.description or ""
    default = field.default
    if default is None or "(default" in help_:
        return help_
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{help_} (default: {shown})".strip()


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value read as YAML)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python name, got "
                                         f"{text!r}")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The ``sampa-ray`` parser; every command sets ``func`` (args -> exit code)."""
    from .bench import add_bench_command
    from .control import add_control_commands
    from .runs import add_runs_command
    from .sweep import add_sweep_command
    from .train import add_train_commands

    parser = _Parser(prog="sampa-ray", description="SAMPa / SAM / SGD training, local or on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_train_commands(sub)
    add_sweep_command(sub)
    add_runs_command(sub)
    add_bench_command(sub)
    add_control_commands(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML (if given) first, then flags on top; validated once. When resuming, the config
    stored in the run's newest checkpoint is the base, and what is given here may only change
    how and where it runs (:func:`sampa_ray.checkpoint.config_for_resume`)."""
    # a recipe (``--recipe``) first, the YAML over it, the flags over both
    data: dict[str, Any] = recipe(args.recipe) if getattr(args, "recipe", None) else {}
    data.update(load_yaml(args.config) if args.config else {})
    for name in CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    for flag, field_name in MAPPING_FLAGS.items():
        pairs = getattr(args, flag, None)
        if pairs:
            merged = dict(data.get(field_name) or {})
            merged.update(pairs)
            data[field_name] = merged
    if "address" not in data and os.environ.get("RAY_ADDRESS"):
        data["address"] = os.environ["RAY_ADDRESS"]
    resume = args.resume if args.resume is not None else data.pop("resume", None)
    if resume == "auto":  # idempotent: continue the --out folder's run if it has one
        data.pop("resume", None)
        if not data.get("out"):
            raise UserError("resume: auto continues the run in --out; name it (--out DIR)")
        from ..checkpoint import list_checkpoints  # imports torch: only when resuming

        if not list_checkpoints(Path(data["out"]) / "checkpoints"):
            return make_config(data)  # nothing to continue: a new run
        resume = data["out"]
    if resume is not None:
        data.pop("resume", None)
        root = resume or data.get("out")
        if not root:
            raise UserError("resume: name the run folder (--resume DIR or --out DIR)")
        from ..checkpoint import config_for_resume  # imports torch: only when resuming

        return config_for_resume(str(root), data)
    return make_config(data)


def main(argv: Sequence[str] | None = None) -> int:
    """``sampa-ray [command] [flags]``: the exit code (2 for a user's error, 1 for a run that
    failed on its own, 130 interrupted, 143 terminated, 141 when the reader of its output
    went away: ``sampa-ray runs | head -1``)."""
    try:
        try:
            return _main(argv)
        finally:  # what is still buffered fails here, not silently at exit
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Python's "Note on SIGPIPE": point stdout at /dev/null so that the interpreter's own
        # flush at exit cannot fail again, and end quietly, as a tool that SIGPIPE ends does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (a BrokenPipeError from another pipe or
    socket is a bug to show, not a reader that left)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with signals.handling():  # SIGINT / SIGTERM: a clean shutdown, then our line
        try:
            return args.func(args)
        except UserError as err:
            print(f"sampa-ray: {one_line(str(err))}", file=sys.stderr)
            return EXIT_USER
        except RunFailed as err:
            print(f"sampa-ray: {one_line(str(err))}", file=sys.stderr)
            return RunFailed.exit_code
        except KeyboardInterrupt as err:  # Ray turns our Terminated into a bare one
            stop = signals.Terminated(signals.received() or signal.SIGINT,
                                      getattr(err, "detail", ""))
            print(stop.line, file=sys.stderr)
            return signals.finish(stop.exit_code)


__all__ = ["CONFIG_FLAGS", "EXIT_PIPE", "EXIT_USER", "MAPPING_FLAGS", "add_config_flags",
           "build_parser", "config_from_args", "flag_help", "main"]
