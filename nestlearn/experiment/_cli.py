"""The ``nestlearn`` command line:
``nestlearn run EXPERIMENT [--set key=value ...] [--out DIR] [--quick] [--resume | --force]``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from nestlearn._errors import ConfigError, NestlearnError
from nestlearn.experiment._config import ExperimentConfig, override


def experiment_dirs() -> list[Path]:
    """Where experiment names are looked up: ``./experiments`` then the repository's ``experiments/``."""
    here = Path.cwd() / "experiments"
    repo = Path(__file__).resolve().parents[2] / "experiments"
    return [here] if here.resolve() == repo else [here, repo]


def load_experiment(name: str) -> tuple[str, ModuleType]:
    """Imports an experiment file by name (``permuted_mnist_forgetting``) or path (``experiments/x.py``)."""
    candidates = [Path(name)] if name.endswith(".py") else [d / f"{name}.py" for d in experiment_dirs()]
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"nestlearn_experiment_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and get_type_hints look their module up there
            spec.loader.exec_module(module)
            config = getattr(module, "CONFIG", None)
            if not isinstance(config, ExperimentConfig) and not (
                dataclasses.is_dataclass(config) and callable(getattr(module, "run", None))
            ):
                raise ConfigError(
                    f"experiment file {path} defines neither CONFIG = ExperimentConfig(...) nor a dataclass "
                    "CONFIG with run(config, rundir)"
                )
            return path.stem, module
    known = sorted(
        {
            p.stem
            for d in experiment_dirs()
            if d.is_dir()
            for p in d.glob("*.py")
            if not p.stem.startswith("_")
        }
    )
    raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(known) or 'none'}")


def resolve(module: ModuleType, assignments: list[str], *, quick: bool) -> Any:
    """The experiment's config, shrunk by its ``QUICK`` overrides if asked, then the user's ``--set``s."""
    config = module.CONFIG
    if quick:
        config = override(config, list(getattr(module, "QUICK", [])))
    return override(config, assignments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment from experiments/ into a run directory")
    run.add_argument("experiment", help="experiment name (a file under experiments/) or path to one")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=0.1 (repeatable)",
    )
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/EXPERIMENT)")
    run.add_argument("--quick", action="store_true", help="a small, fast version of the experiment")
    group = run.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue a run directory from its last checkpoint"
    )
    group.add_argument("--force", action="store_true", help="replace an existing run directory")
    sub.add_parser("list", help="list the experiments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for d in experiment_dirs():
                for path in sorted(d.glob("*.py")) if d.is_dir() else []:
                    if not path.stem.startswith("_"):
                        doc = (load_experiment(str(path))[1].__doc__ or "").strip().splitlines()
                        print(f"{path.stem}: {doc[0] if doc else ''}")
            return 0
        name, module = load_experiment(args.experiment)
        out = args.out or Path("runs") / (name + ("-quick" if args.quick else ""))
        config = resolve(module, args.sets, quick=args.quick)
        modes = {"quick": args.quick, "resume": args.resume, "force": args.force}
        if isinstance(config, ExperimentConfig):
            from nestlearn.experiment._run import run_experiment

            directory = run_experiment(config, out, experiment=name, **modes).directory
        else:
            from nestlearn.experiment._study import run_study

            directory = run_study(module.run, config, out, experiment=name, **modes).path
    except NestlearnError as e:
        print(f"nestlearn: error: {e}", file=sys.stderr)
        return 2
    print(f"results: {directory / 'results'}")
    print(f"figures: {directory / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
