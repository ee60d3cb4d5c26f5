"""Command line: ``sampa-ray train``, ``sampa-ray compare``, ``sampa-ray bench`` (the
communication-cost study, ``sampa_ray.bench``), and ``status``, ``watch``, ``checkpoint``,
``stop`` for a running coordinator (``--target HOST:PORT``).

Every error a user can cause ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .bench import add_bench_command
from .config import TrainConfig, load_yaml, make_config
from .control import add_control_commands
from .errors import UserError, one_line

EXIT_USER = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USER, f"sampa-ray: {one_line(message)}\n")


# Flags that map one-to-one onto TrainConfig fields (flag -> type).
CONFIG_FLAGS: dict[str, Any] = {
    "algo": str, "lr": float, "lr_schedule": str, "rho": float, "lam": float, "momentum": float,
    "weight_decay": float, "label_smoothing": float, "model": str, "dropout": float,
    "dataset": str, "data_dir": str, "synthetic_size": int, "epochs": int, "steps": int,
    "batch_size": int, "seed": int, "eval_every": int, "backend": str, "data_path": str,
    "transport": str, "wire_dtype": str, "collective_backend": str, "control_host": str,
    "control_port": int, "token_file": str,
    "control_cert": str, "control_key": str,
    "device": str,
    "threads": int, "out": str, "address": str, "checkpoint_every": int,
    "keep_checkpoints": int, "max_nonfinite": int, "metrics_port": int, "metrics_host": str,
    "metrics_cert": str, "metrics_key": str,
    "round_timeout": float, "max_restarts": int, "link_latency_ms": float,
    "link_gbit_s": float,
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields")
    for name, typ in CONFIG_FLAGS.items():
        field = TrainConfig.model_fields[name]
        default = field.default
        help_ = field.description or ""
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       metavar=name.upper(), help=f"{help_} (default: {default})".strip())
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from the newest valid checkpoint of run folder DIR "
                   "(default: the --out folder); outputs go to that folder")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to name a folder that already holds a run")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sampa-ray", description="SAMPa / SAM / SGD training, local or on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one model")
    _add_config_flags(train)
    compare = sub.add_parser("compare", help="run SGD, SAM and SAMPa on the same setup")
    _add_config_flags(compare)
    add_bench_command(sub)
    add_control_commands(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML (if given) first, then flags on top; validated once."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for name in CONFIG_FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.resume is not None:
        data["resume"] = args.resume or data.get("out")
        if not data["resume"]:
            raise UserError("resume: name the run folder (--resume DIR or --out DIR)")
        data.setdefault("out", data["resume"])
    if "address" not in data and os.environ.get("RAY_ADDRESS"):
        data["address"] = os.environ["RAY_ADDRESS"]
    return make_config(data)


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Refuse to write over an earlier run unless asked to; the folder must be writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} exists and is not a folder")
    if (out / "result.json").exists() and not overwrite:
        raise UserError(f"out: {out} already holds a run (choose another --out or pass "
                        "--overwrite)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out: cannot create {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"out: {out} is not writable")
    return out


def default_out(cfg: TrainConfig, kind: str) -> Path:
    return Path("runs") / f"{kind}-{cfg.algo if kind == 'train' else 'all'}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"


def run_one(cfg: TrainConfig, out: Path, label: str = "") -> dict[str, Any]:
    from .ui import ProgressView

    with ProgressView(label or cfg.algo) as view:
        if cfg.backend == "ray":
            from .ray_backend import run_ray

            return run_ray(cfg, out, progress=view)
        from .trainer import run_local

        return run_local(cfg, out, progress=view)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(cfg.out) if cfg.out else default_out(cfg, "train")
    resuming_here = cfg.resume is not None and out.resolve() == Path(cfg.resume).resolve()
    out = prepare_out(out, args.overwrite or resuming_here)
    result = run_one(cfg, out)
    from .ui import print_result

    print_result(result, out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .results import plot_runs, write_json_atomic
    from .ui import print_comparison

    base = config_from_args(args)
    out = prepare_out(Path(base.out) if base.out else default_out(base, "compare"),
                      args.overwrite)
    algos = ("sgd", "sam", "sampa")
    runs = [(base.model_copy(update={"algo": a, "out": str(out / a)}),
             prepare_out(out / a, args.overwrite)) for a in algos]
    if base.backend == "ray":  # one set of actors for all three: like for like
        from .ray_backend import run_ray_many
        from .ui import ProgressView

        with ProgressView("compare") as view:
            results = dict(zip(algos, run_ray_many(runs, progress=view), strict=True))
    else:
        results = {a: run_one(cfg, sub, label=a) for a, (cfg, sub) in zip(algos, runs,
                                                                          strict=True)}
    rows = print_comparison(results)
    plot_runs(out / "compare.png", {a: r["epochs"] for a, r in results.items()})
    write_json_atomic(out / "compare.json", {"config": base.model_dump(), "rows": rows})
    print(f"wrote {out / 'compare.png'} and {out / 'compare.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "func", None) is not None:
            return args.func(args)
        if args.command == "train":
            return cmd_train(args)
        return cmd_compare(args)
    except UserError as err:
        print(f"sampa-ray: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("sampa-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
