"""Batch sweeps: a sweep file of experiments x override grids x seeds, packed into few compiled programs.

A sweep file (TOML, or JSON with the same structure) lists experiments, each with fixed overrides, a grid
of overrides whose product is taken, and seeds::

    quick = true                                # optional default for every experiment

    [[experiment]]
    name = "permuted_mnist_forgetting"          # a file under experiments/ (or a path to one)
    set = ["data.n_tasks=3", "strategies=naive,ewc"]
    seeds = 8                                   # seeds 0..7; or a list, e.g. [0, 5, 9]
    [experiment.grid]
    "sweep.ewc" = [1, 10, 100, 1000]            # one run per value (and per seed)
    "optim.lr" = [0.01, 0.1]

Every run is one experiment at one point of its grid and one seed. **Packing**: runs of a continual
experiment (``ExperimentConfig``) that differ only in the seed and in ``sweep.<strategy>`` values share a
compiled program (the engine vmaps seeds x swept values), so they are merged into one run directory with
``first_seed``/``seeds``/``sweep.*`` set, executed by one call, and the results are split back per run.
Runs differing in anything else are separate programs. Study experiments (a dataclass ``CONFIG`` with
``run(config, rundir)``) run one by one, the seed set on their ``seed`` field.

``DIR/manifest.json`` (written atomically, by one process) lists every run: its id, experiment, overrides,
seed, program group, state (pending, running, done, diverged, failed), its group's run directory, the rows
of that directory's results that are this run's, and its final metric. Relaunching skips runs done (or
diverged); a failed group is recorded with its message and the others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nestlearn._errors import ConfigError, NestlearnError
from nestlearn.experiment._config import ExperimentConfig, to_dict, validate

STATES = ("pending", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged")
EXIT_PREEMPTED = 4  # the exit code of a preempted run (checkpoint written; rerun with --resume)


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: an experiment, its overrides (fixed ones, then its grid point) and a seed."""

    experiment: str
    overrides: tuple[str, ...]
    seed: int | None
    quick: bool

    @property
    def id(self) -> str:
        """A stable id (the same run gets the same id when the sweep file is edited around it)."""
        text = json.dumps([self.experiment, list(self.overrides), self.seed, self.quick])
        return hashlib.sha1(text.encode()).hexdigest()[:10]


def _value_text(key: str, value: Any, where: str) -> str:
    """An override's value as ``--set`` would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
        return ",".join(_value_text(key, v, where) for v in value)
    raise ConfigError(f"{where}: grid value of {key!r} must be a number, string, bool or list, got {value!r}")


def _seeds(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: seeds must be positive, got {value}")
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        if len(set(value)) != len(value) or min(value) < 0:
            raise ConfigError(f"{where}: seeds must be distinct non-negative integers, got {value}")
        return list(value)
    raise ConfigError(f"{where}: seeds must be a count or a list of integers, got {value!r}")


_EXPERIMENT_KEYS = {"name", "set", "grid", "seeds", "quick"}


def read_sweep(path: str | os.PathLike) -> list[SweepRun]:
    """Reads a sweep file (``.toml`` or ``.json``) into its runs, in file order (grid in row-major order).

    Raises:
      ConfigError: naming the file and the key for a file that cannot be read or has a bad entry.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"sweep file {path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"sweep file {path}: not valid {path.suffix.lstrip('.') or 'TOML'} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path}: expected a table at the top level")
    unknown = set(data) - {"experiment", "quick"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {sorted(unknown)}; known: experiment, quick")
    default_quick = data.get("quick", False)
    entries = data.get("experiment")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"sweep file {path}: no [[experiment]] entries")
    runs: list[SweepRun] = []
    for i, entry in enumerate(entries):
        where = f"sweep file {path}, experiment {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        if set(entry) - _EXPERIMENT_KEYS:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(set(entry) - _EXPERIMENT_KEYS)}; "
                f"known: {', '.join(sorted(_EXPERIMENT_KEYS))}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' (the experiment) is missing")
        fixed = entry.get("set", [])
        if not isinstance(fixed, list) or not all(isinstance(s, str) and "=" in s for s in fixed):
            raise ConfigError(f"{where}: 'set' must be a list of \"key=value\" strings, got {fixed!r}")
        grid = entry.get("grid", {})
        if not isinstance(grid, dict):
            raise ConfigError(f"{where}: 'grid' must be a table of key = [values]")
        for key in [*grid, *(s.partition("=")[0].strip() for s in fixed)]:
            if key in ("seeds", "first_seed", "seed"):
                raise ConfigError(f"{where}: set the seeds with the 'seeds' key, not with {key!r}")
        axes = []
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: grid {key!r} must be a non-empty list of values")
            axes.append([f"{key}={_value_text(key, v, where)}" for v in values])
        quick = entry.get("quick", default_quick)
        if not isinstance(quick, bool):
            raise ConfigError(f"{where}: 'quick' must be true or false, got {quick!r}")
        seeds = _seeds(entry.get("seeds"), where)
        points: list[tuple[str, ...]] = [()]
        for axis in axes:
            points = [(*p, a) for p in points for a in axis]
        for point in points:
            for seed in seeds or [None]:
                runs.append(SweepRun(name, (*fixed, *point), seed, quick))
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(r for r in runs if ids.count(r.id) > 1)
        raise ConfigError(
            f"sweep file {path}: run {dup.experiment} {list(dup.overrides)} seed {dup.seed} twice"
        )
    return runs


# -- packing -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs executed by one call: one experiment, one config (seeds and swept values merged)."""

    experiment: str
    quick: bool
    overrides: tuple[str, ...]  # what the call is given: the base overrides plus the merged seeds/sweeps
    members: tuple[str, ...]  # run ids
    packed: bool  # a continual experiment whose runs were merged

    @property
    def id(self) -> str:
        text = json.dumps([self.experiment, self.quick, list(self.overrides), sorted(self.members)])
        return f"{self.experiment}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _resolve(run: SweepRun, module: Any) -> Any:
    from nestlearn.experiment._cli import resolve

    config = resolve(module, list(run.overrides), quick=run.quick)
    if run.seed is None:
        return config
    if isinstance(config, ExperimentConfig):
        return dataclasses.replace(config, first_seed=run.seed, seeds=1)
    if "seed" not in {f.name for f in dataclasses.fields(config)}:
        raise ConfigError(
            f"experiment {run.experiment!r} has no 'seed' field; drop 'seeds' from its sweep entry"
        )
    return dataclasses.replace(config, seed=run.seed)


def _fmt(value: float) -> str:
    return repr(float(value))


def pack(runs: Sequence[SweepRun], *, on_error: Callable[[SweepRun, str], None]) -> list[Group]:
    """Groups runs into calls: continual runs differing only in seed and ``sweep.*`` share one.

    A group of continual runs covers the product of its seeds (a contiguous range ``first_seed ..
    first_seed + seeds - 1``) and, per strategy, the union of its members' swept values; members whose
    seeds are not contiguous, or that need different sets of swept values, go into separate groups so no
    run is computed that was not asked for when the grid is a product. A run whose overrides do not
    resolve is passed to ``on_error`` with the message, and left out.
    """
    from nestlearn.experiment._cli import load_experiment

    modules: dict[str, Any] = {}
    buckets: dict[str, list[tuple[SweepRun, Any]]] = {}
    singles: list[Group] = []
    for run in runs:
        try:
            if run.experiment not in modules:
                modules[run.experiment] = load_experiment(run.experiment)[1]
            config = _resolve(run, modules[run.experiment])
            if isinstance(config, ExperimentConfig):
                validate(config)  # a bad value fails its run now, not its whole group later
        except NestlearnError as e:
            on_error(run, f"config error: {e}")
            continue
        if not isinstance(config, ExperimentConfig):
            seed = [f"seed={run.seed}"] if run.seed is not None else []
            singles.append(Group(run.experiment, run.quick, (*run.overrides, *seed), (run.id,), False))
            continue
        if run.seed is None:  # the experiment's own seeds, as it stands: one program of its own
            singles.append(Group(run.experiment, run.quick, run.overrides, (run.id,), True))
            continue
        base = to_dict(config)
        swept = {k: v for k, v in base.pop("sweep").items() if v}
        base.pop("seeds"), base.pop("first_seed")
        key = json.dumps([run.experiment, run.quick, base, sorted(swept)], sort_keys=True)
        buckets.setdefault(key, []).append((run, config))
    groups = []
    for members in buckets.values():
        # seeds that need the same swept values form one block; contiguous seed ranges one call each
        by_seed: dict[int, list[tuple[SweepRun, Any]]] = {}
        for run, config in members:
            by_seed.setdefault(config.first_seed, []).append((run, config))
        blocks: dict[str, list[int]] = {}
        for seed, rs in by_seed.items():
            needs = sorted({json.dumps(to_dict(c.sweep), sort_keys=True) for _, c in rs})
            blocks.setdefault(json.dumps(needs), []).append(seed)
        for seeds in blocks.values():
            seeds.sort()
            start = 0
            for i in range(1, len(seeds) + 1):
                if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
                    chunk = seeds[start:i]
                    start = i
                    picked = [(r, c) for s in chunk for r, c in by_seed[s]]
                    groups.append(_merge(picked, chunk))
    return groups + singles


def _merge(picked: list[tuple[SweepRun, Any]], seeds: list[int]) -> Group:
    run0, config0 = picked[0]
    sweeps: dict[str, list[float]] = {}
    for _, config in picked:
        for name, values in to_dict(config.sweep).items():
            for v in values:
                if v not in sweeps.setdefault(name, []):
                    sweeps[name].append(v)
    # the base overrides minus sweep.* (each member's own), then the merged seeds and sweeps
    base = [o for o in run0.overrides if not o.partition("=")[0].strip().startswith("sweep.")]
    merged = [f"sweep.{k}={','.join(_fmt(v) for v in vs)}" for k, vs in sorted(sweeps.items()) if vs]
    overrides = (*base, *merged, f"first_seed={seeds[0]}", f"seeds={len(seeds)}")
    ids = tuple(r.id for r, _ in picked)
    return Group(run0.experiment, run0.quick, overrides, ids, True)


# -- the manifest ---------------------------------------------------------------------------------------


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


def _path(path: str | os.PathLike) -> Any:
    """A local ``Path``, or an ``etils.epath.Path`` for ``gs://`` and other remote paths."""
    if _is_local(path):
        return Path(path)
    from etils import epath

    return epath.Path(str(path))


class Manifest:
    """``DIR/manifest.json``: every run of a sweep, its group, state, run directory and metric.

    Args:
      directory: the sweep's output directory (local, or any path ``etils.epath`` understands).
      write: whether this process writes it (one process of a multi-host run does).
    """

    def __init__(self, directory: str | os.PathLike, *, write: bool = True) -> None:
        self.directory = _path(directory)
        self.file = self.directory / "manifest.json"
        self.write_enabled = write
        self.runs: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        if self.file.exists():
            try:
                data = json.loads(self.file.read_text())
                self.runs, self.groups = data["runs"], data.get("groups", {})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{self.file} is not a sweep manifest ({e}); choose another --out"
                ) from None

    def save(self) -> None:
        """Writes the manifest atomically (a temporary file and a rename; one object write on GCS)."""
        if not self.write_enabled:
            return
        text = json.dumps({"runs": self.runs, "groups": self.groups}, indent=1, sort_keys=True) + "\n"
        if _is_local(self.directory):
            from nestlearn.experiment._rundir import atomic_write

            atomic_write(self.file, text)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.file.write_text(text)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for r in self.runs.values():
            counts[r["state"]] += 1
        return counts

    def table(self, states: Sequence[str] | None = None) -> str:
        """The status table: counts per state, then one row per run (``states`` filters the rows)."""
        counts = self.counts()
        lines = [f"{len(self.runs)} runs in {len(self.groups)} programs: "
                 + ", ".join(f"{n} {s}" for s, n in counts.items())]  # fmt: skip
        header = ("id", "state", "experiment", "seed", "overrides", "group", "metric")
        rows = [header]
        for rid, r in self.runs.items():
            if states and r["state"] not in states:
                continue
            metric, steps = r.get("metric") or {}, r.get("diverged_step") or {}
            shown = " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}=diverged@{steps.get(k, '?')}"
                for k, v in metric.items()
            )
            if r["state"] == "failed":
                shown = r.get("message", "")
            rows.append(
                (
                    rid,
                    r["state"],
                    r["experiment"],
                    "" if r["seed"] is None else str(r["seed"]),
                    " ".join(r["overrides"]) or "-",
                    r.get("group") or "-",
                    shown,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        return "\n".join(lines)


def _load(directory: Any, strategy: str, cache: dict[str, Any]) -> Any:
    from nestlearn.experiment._rundir import load_result

    if strategy not in cache:
        file = directory / "results" / f"{strategy}.npz"
        if _is_local(file):
            cache[strategy] = load_result(file)
        else:  # numpy reads an open file of any filesystem etils.epath knows
            with file.open("rb") as f:
                cache[strategy] = load_result(f)
    return cache[strategy]


def _metric(
    directory: Any, rows: dict[str, list[int]], cache: dict[str, Any]
) -> tuple[dict[str, float], dict[str, int], bool]:
    """A run's final average accuracy per strategy (per swept value), its diverged steps, and whether any
    of its rows diverged, from the group's ``results/<strategy>.npz``."""
    from nestlearn.experiment._run import swept_key

    metric, diverged = {}, {}
    for strategy, idx in rows.items():
        result = _load(directory, strategy, cache)
        key = swept_key(result)
        for i in idx:
            label = strategy if key is None or len(idx) == 1 else f"{strategy} {key}={result.runs[i][key]:g}"
            step = int(result.diverged_step[i])
            if step >= 0:
                diverged[label] = step
                metric[label] = float("nan")
            else:
                metric[label] = float(result.acc_matrix[i, -1].mean())
    return metric, diverged, bool(diverged)


def _rows(
    directory: Any, run: SweepRun, config: ExperimentConfig, cache: dict[str, Any]
) -> dict[str, list[int]]:
    """The rows of the group's results that are ``run``'s (``config``: the run's own resolved config): its
    seed (every seed of the config if the run named none), and its swept values per strategy."""
    from nestlearn.experiment._run import strategy_and_sweep

    rows = {}
    for strategy in config.strategies:
        result = _load(directory, strategy, cache)
        sweep = strategy_and_sweep(config, strategy)[1]
        wanted = [
            i
            for i, r in enumerate(result.runs)
            if config.first_seed <= r["seed"] < config.first_seed + config.seeds
            and all(r[k] in vs for k, vs in sweep.items())
        ]
        if not wanted:
            raise NestlearnError(
                f"no row of {directory}/results/{strategy}.npz is run {run.id} (seed {run.seed})"
            )
        rows[strategy] = wanted
    return rows


def _preempted(e: BaseException) -> bool:
    """Whether the run path stopped for a preemption (checkpoint written): ``SystemExit(4)`` or
    :class:`~nestlearn.Preempted`."""
    from nestlearn._errors import Preempted

    if isinstance(e, SystemExit):
        return e.code == EXIT_PREEMPTED
    return isinstance(e, Preempted)


def run_sweep(
    file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    log: Callable[[str], None] | None = None,
    dry_run: bool = False,
    execute: Callable[[Group, Any, bool, bool], None] | None = None,
) -> Manifest:
    """Runs a sweep file into ``out``: packs its pending runs into groups and runs each group once.

    Each group is a run directory ``out/groups/<group id>`` written as ``nestlearn run`` writes one. A
    group interrupted before (state running, its directory holding a checkpoint) is resumed. A group that
    fails (a config or data error, an operating fault, a crash) marks its runs failed with the message
    and the sweep goes on; a preemption stops the sweep (the group stays running and resumes next time).

    Args:
      file: the sweep file (see the module docstring).
      out: the sweep directory (``manifest.json``, ``groups/``).
      log: where progress lines go (default: stderr).
      dry_run: write nothing, run nothing; log the groups that would run.
      execute: runs one group, ``execute(group, directory, resume, force)`` (default: the experiment's
        run path, in this process); a test can substitute one.

    Returns:
      The manifest (also written to ``out/manifest.json`` unless ``dry_run``).
    """
    import jax

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    runs = read_sweep(file)
    manifest = Manifest(out, write=not dry_run and jax.process_index() == 0)
    old = manifest.runs
    manifest.runs = {}
    for run in runs:
        prior = old.get(run.id, {})
        manifest.runs[run.id] = {
            "experiment": run.experiment,
            "overrides": list(run.overrides),
            "seed": run.seed,
            "quick": run.quick,
            **{
                k: v
                for k, v in prior.items()
                if k in ("state", "group", "directory", "rows", "metric", "diverged_step", "message")
            },  # fmt: skip
        }
        manifest.runs[run.id].setdefault("state", "pending")
    by_id = {r.id: r for r in runs}
    todo = [r for r in runs if manifest.runs[r.id]["state"] not in FINISHED]

    def failed(run: SweepRun, message: str) -> None:
        manifest.runs[run.id].update(state="failed", message=message, group=None)

    groups = pack(todo, on_error=failed)
    skipped = len(runs) - len(todo)
    log(f"sweep {file}: {len(runs)} runs, {skipped} already finished, {len(todo)} to run in {len(groups)} "
        f"program(s)")  # fmt: skip
    if dry_run:
        for g in groups:
            log(f"  {g.id}: {len(g.members)} run(s): nestlearn run {g.experiment} "
                + " ".join(f"--set {o}" for o in g.overrides) + (" --quick" if g.quick else ""))  # fmt: skip
        return manifest
    manifest.save()
    execute = execute or _execute
    for n, group in enumerate(groups):
        directory = manifest.directory / "groups" / group.id
        manifest.groups[group.id] = {
            "experiment": group.experiment,
            "overrides": list(group.overrides),
            "quick": group.quick,
            "members": list(group.members),
            "directory": str(directory),
        }
        for rid in group.members:
            manifest.runs[rid].update(state="running", group=group.id, directory=str(directory))
            manifest.runs[rid].pop("message", None)
        manifest.save()
        resume = (directory / "config.json").exists()
        force = directory.exists() and not resume
        log(f"[sweep] program {n + 1}/{len(groups)}: {group.id} ({len(group.members)} runs"
            f"{', resuming' if resume else ''})")  # fmt: skip
        start = time.perf_counter()
        try:
            # a remote directory goes as its URL (gs://...), the form the run path takes from --out
            execute(group, directory if _is_local(directory) else str(directory), resume, force)
        except BaseException as e:
            if _preempted(e) or isinstance(e, KeyboardInterrupt):
                log(f"[sweep] {group.id} interrupted; rerun the sweep to resume it")
                raise
            if isinstance(e, NestlearnError):
                message = f"config error: {e}"
            elif isinstance(e, OSError):
                from nestlearn.experiment._cli import operating_message

                message = f"operating error: {operating_message(e)}"
            elif isinstance(e, Exception):
                message = f"crash: {type(e).__name__}: {e}"
            else:
                raise
            message = message.splitlines()[0] if message else message
            log(f"[sweep] {group.id} failed: {message}")
            for rid in group.members:
                manifest.runs[rid].update(state="failed", message=message)
            manifest.save()
            continue
        elapsed = time.perf_counter() - start
        _record(manifest, group, directory, by_id)
        manifest.groups[group.id]["seconds"] = round(elapsed, 3)
        manifest.save()
    counts = manifest.counts()
    log("[sweep] " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return manifest


def _record(manifest: Manifest, group: Group, directory: Any, by_id: dict[str, SweepRun]) -> None:
    """Splits a finished group's results back per run: rows, metric, state."""
    from nestlearn.experiment._cli import load_experiment

    if not group.packed:
        for rid in group.members:
            manifest.runs[rid].update(state="done", metric=None)
        return
    module = load_experiment(group.experiment)[1]
    cache: dict[str, Any] = {}
    for rid in group.members:
        rows = _rows(directory, by_id[rid], _resolve(by_id[rid], module), cache)
        metric, diverged, any_diverged = _metric(directory, rows, cache)
        clean = {k: (None if math.isnan(v) else v) for k, v in metric.items()}
        manifest.runs[rid].update(
            state="diverged" if any_diverged else "done", rows=rows, metric=clean, diverged_step=diverged
        )


def _execute(group: Group, directory: Any, resume: bool, force: bool) -> None:
    """Runs one group in this process, as ``nestlearn run`` would (figures are left to the sweep's user)."""
    from nestlearn.experiment._cli import load_experiment, resolve

    name, module = load_experiment(group.experiment)
    config = resolve(module, list(group.overrides), quick=group.quick)
    modes = {"quick": group.quick, "resume": resume, "force": force}
    if isinstance(config, ExperimentConfig):
        from nestlearn.experiment._run import run_experiment

        run_experiment(config, directory, experiment=name, make_figures=False, **modes)
    else:
        from nestlearn.experiment._study import run_study

        run_study(module.run, config, directory, experiment=name, **modes)


# -- the command line -----------------------------------------------------------------------------------


def add_parsers(sub) -> None:
    """Adds ``nestlearn sweep``, ``nestlearn status`` and ``nestlearn tpu`` to the CLI's subparsers."""
    from nestlearn.launch import add_tpu_parser

    p = sub.add_parser(
        "sweep", help="run a sweep file (experiments x grids x seeds), packed into few programs"
    )
    p.add_argument("file", help="the sweep file (.toml or .json)")
    p.add_argument("--out", required=True, help="the sweep directory (manifest.json, groups/)")
    p.add_argument("--dry-run", action="store_true", help="print the programs that would run; run nothing")
    s = sub.add_parser("status", help="print a sweep's manifest as a table")
    s.add_argument("directory", help="the sweep directory")
    s.add_argument("--state", action="append", choices=STATES, help="only rows in this state (repeatable)")
    add_tpu_parser(sub)


def command(args) -> int:
    """Runs ``sweep``, ``status`` or ``tpu``; returns the exit code (0, 1 some runs failed, 2 config
    error, 3 operating error, 4 preempted)."""
    from nestlearn.experiment._cli import EXIT_CONFIG, EXIT_OPERATING, operating_message

    try:
        if args.command == "tpu":
            from nestlearn.launch import tpu_main

            return tpu_main(args)
        if args.command == "status":
            manifest = Manifest(args.directory, write=False)
            if not manifest.file.exists():
                raise ConfigError(f"{manifest.file} not found: is {args.directory} a sweep directory?")
            print(manifest.table(args.state))
            return 0
        try:
            manifest = run_sweep(args.file, args.out, dry_run=args.dry_run)
        except BaseException as e:
            if _preempted(e):
                print("nestlearn: the sweep was preempted; rerun the same command to resume", file=sys.stderr)
                return EXIT_PREEMPTED
            raise
        failed = manifest.counts()["failed"]
        if failed:
            print(f"nestlearn: {failed} of {len(manifest.runs)} runs failed; see nestlearn status {args.out}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    except OSError as e:
        print(f"nestlearn: operating error: {operating_message(e)}", file=sys.stderr)
        return EXIT_OPERATING
    except NestlearnError as e:
        print(f"nestlearn: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
