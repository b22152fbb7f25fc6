"""The ``nestlearn`` command line: ``nestlearn run EXPERIMENT [--set key=value ...] [--out DIR] [--quick]``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
            spec.loader.exec_module(module)
            if not isinstance(getattr(module, "CONFIG", None), ExperimentConfig) and not callable(
                getattr(module, "run", None)
            ):
                raise ConfigError(
                    f"experiment file {path} defines neither CONFIG = ExperimentConfig(...) nor run(out, quick=...)"
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


def resolve(module: ModuleType, assignments: list[str], *, quick: bool) -> ExperimentConfig:
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
        if not isinstance(getattr(module, "CONFIG", None), ExperimentConfig):
            return _run_custom(name, module, out, args)
        config = resolve(module, args.sets, quick=args.quick)
        from nestlearn.experiment._run import run_experiment

        output = run_experiment(config, out, experiment=name, resume=args.resume, force=args.force)
    except NestlearnError as e:
        print(f"nestlearn: error: {e}", file=sys.stderr)
        return 2
    print(f"results: {output.directory / 'results'}")
    print(f"figures: {output.directory / 'figures'}")
    return 0


def _run_custom(name: str, module: ModuleType, out: Path, args: argparse.Namespace) -> int:
    """An experiment that is a ``run(out, quick=...)`` function (its own loop, e.g. online regression)."""
    if args.sets:
        raise ConfigError(f"experiment {name!r} is a script: it takes no --set")
    if args.resume and not getattr(module, "RESUMABLE", False):
        raise ConfigError(f"experiment {name!r} is a script without resume: it takes no --resume")
    if out.exists() and any(out.iterdir()) and not args.resume:
        if not args.force:
            raise ConfigError(f"output directory {out} already exists; pass --force to replace it")
        import shutil

        shutil.rmtree(out)
    module.run(out, quick=args.quick, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"results: {out / 'results'}")
    print(f"figures: {out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
