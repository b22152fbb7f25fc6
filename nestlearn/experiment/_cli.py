"""The ``nestlearn`` command line:
``nestlearn run EXPERIMENT [--set key=value ...] [--out DIR] [--quick] [--resume | --force]``,
``nestlearn sweep FILE --out DIR``, ``nestlearn status DIR``, ``nestlearn tpu ...``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from nestlearn._errors import ConfigError, NestlearnError, Preempted
from nestlearn.engine import _storage as storage
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
    run.add_argument(
        "--out", default=None, help="run directory, local or gs://BUCKET/PATH (default: runs/EXPERIMENT)"
    )
    run.add_argument("--quick", action="store_true", help="a small, fast version of the experiment")
    run.add_argument(
        "--resume", action="store_true", help="continue a run directory from its last good checkpoint"
    )
    run.add_argument(
        "--resume-if-started",
        action="store_true",
        help="continue the run in --out if one was started there (its config.json exists), else start it "
        "(what the TPU launcher's relaunches use)",
    )
    run.add_argument("--force", action="store_true", help="replace an existing run directory")
    run.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        metavar="K",
        help="checkpoints kept per part (default 3): what a damaged newest one falls back to",
    )
    hosts = run.add_argument_group("multi-process runs (automatic on a Cloud TPU VM; else all three)")
    hosts.add_argument(
        "--coordinator", metavar="HOST:PORT", help="process 0's address ($NESTLEARN_COORDINATOR)"
    )
    hosts.add_argument(
        "--num-processes", type=int, metavar="N", help="processes in all ($NESTLEARN_NUM_PROCESSES)"
    )
    hosts.add_argument(
        "--process-id", type=int, metavar="I", help="this process, 0..N-1 ($NESTLEARN_PROCESS_ID)"
    )
    sub.add_parser("list", help="list the experiments")
    from nestlearn.experiment._sweep import add_parsers

    add_parsers(sub)  # sweep, status, tpu
    return parser


EXIT_CONFIG = 2  # the input is wrong: a config value, a data file, a damaged run directory
EXIT_OPERATING = 3  # the machine refused: a full disk, a read-only or missing directory, a file in the way
EXIT_PREEMPTED = 4  # stopped by SIGTERM (a preemption notice) at a chunk boundary, checkpoint saved: --resume

_ADVICE = {
    errno.ENOSPC: "free disk space, or write elsewhere with --out",
    errno.EDQUOT: "free disk space (quota exceeded), or write elsewhere with --out",
    errno.EROFS: "the file system is read-only; write elsewhere with --out",
    errno.EACCES: "no permission; write elsewhere with --out or fix the directory's permissions",
    errno.EPERM: "no permission; write elsewhere with --out or fix the directory's permissions",
    errno.ENOENT: "a directory on the way is missing; create it or choose another --out",
    errno.ENOTDIR: "a file is in the way where a directory is needed; move it or choose another --out",
    errno.EEXIST: "a file is in the way; move it or choose another --out",
    errno.EISDIR: "a directory is in the way where a file is needed; move it or choose another --out",
}


def operating_message(e: OSError) -> str:
    """One line for an operating fault: what failed, the path, and what to do."""
    path = e.filename if e.filename is not None else ""
    what = e.strerror or type(e).__name__
    advice = _ADVICE.get(e.errno, "check the path and the disk")
    return f"{what}: {path} ({advice})" if path else f"{what} ({advice})"


def _has_checkpoint(out) -> bool:
    ckpt = out / "checkpoints"
    return ckpt.is_dir() and any(any(s.isdigit() for s in n.split("/")[:-1]) for n, _ in storage.files(ckpt))


def _run(args) -> Path | None:
    from nestlearn.engine import distributed, preemption

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
    # From here SIGTERM is a preemption notice: the run stops at its next chunk boundary, checkpointed.
    with preemption.handling():
        return _run_in(args)


def resume_wanted(args, out) -> bool:
    """``--resume``, or ``--resume-if-started`` and a run was started in ``out`` (its config.json exists)."""
    return bool(args.resume or (args.resume_if_started and (out / "config.json").exists()))


def _run_in(args) -> Path | None:
    from nestlearn.engine import distributed

    name, module = load_experiment(args.experiment)
    out = storage.path(args.out or Path("runs") / (name + ("-quick" if args.quick else "")))
    config = resolve(module, args.sets, quick=args.quick)
    modes = {"quick": args.quick, "resume": resume_wanted(args, out), "force": args.force}
    fresh = not out.exists()
    try:
        if isinstance(config, ExperimentConfig):
            from nestlearn.experiment._run import run_experiment

            return run_experiment(config, out, experiment=name, **modes).directory
        from nestlearn.experiment._study import run_study

        return run_study(module.run, config, out, experiment=name, **modes).path
    except Preempted:
        raise
    except (NestlearnError, OSError):
        # A run this call started that failed before its first checkpoint is removed, so that the
        # corrected rerun is not blocked; one with checkpoints stays, for --resume.
        if fresh and out.is_dir() and not _has_checkpoint(out):
            with contextlib.suppress(OSError):
                storage.rmtree(out)
        elif fresh and out.is_dir() and distributed.is_primary():
            print(f"nestlearn: the run so far is kept in {out}; continue it with --resume", file=sys.stderr)
        raise


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns 0, 2 (config, data or run-directory error), 3 (operating fault) or 4
    (preempted: SIGTERM stopped the run at a chunk boundary after a checkpoint; rerun with --resume)."""
    args = _parser().parse_args(argv)
    if args.command in ("sweep", "status", "tpu"):
        from nestlearn.experiment._sweep import command

        return command(args)
    try:
        if args.command == "list":
            for d in experiment_dirs():
                for path in sorted(d.glob("*.py")) if d.is_dir() else []:
                    if not path.stem.startswith("_"):
                        doc = (load_experiment(str(path))[1].__doc__ or "").strip().splitlines()
                        print(f"{path.stem}: {doc[0] if doc else ''}")
            return 0
        if args.command == "run" and args.keep_checkpoints is not None:
            if args.keep_checkpoints < 1:
                raise ConfigError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
            os.environ["NESTLEARN_KEEP_CHECKPOINTS"] = str(args.keep_checkpoints)
        if args.resume and args.force:
            raise ConfigError(
                "--resume and --force contradict each other: --resume continues a run, --force "
                "replaces it; give one"
            )
        directory = _run(args)
    except Preempted as e:
        print(f"nestlearn: {e}; continue with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except OSError as e:
        print(f"nestlearn: operating error: {operating_message(e)}", file=sys.stderr)
        return EXIT_OPERATING
    except NestlearnError as e:
        print(f"nestlearn: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"results: {directory / 'results'}")
    print(f"figures: {directory / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
