"""Packing: a 256-run sweep in one compiled program against the same runs one program per run.

    python benchmarks/packing.py [--devices 8] [--seeds 16] [--values 16] [--tasks 5] [--steps 20]
                                 [--out benchmarks/results/packing.json]

Workload: EWC on split digits (task-incremental, 8x8 digits, MLP 64-32-10, SGD 0.1, batch 32), 16 EWC
strengths (lam log-spaced 0.01 .. 100, where no run diverges) x 16 seeds = 256 runs, on CPU with ``--devices`` fake devices
(``--xla_force_host_platform_device_count``; set before JAX starts).

* **packed**: the 256 runs as one vmapped program, the runs axis sharded over the devices (what
  ``nestlearn sweep`` makes of a grid over ``sweep.ewc`` and seeds). Called twice: the first call compiles
  and runs, the second only runs; compile = first - second.
* **one program per run**: a single-run program, compiled once (on the first run) and reused for every
  run, the strength passed as an argument; 256 calls. Compile = the first run - a repeat of it.
* **nestlearn sweep**: the same 256 runs through the sweep command (a sweep file -> one packed run
  directory with an Orbax checkpoint per task, results, manifest split back per run), end to end.

The per-run results must equal the packed ones (max |accuracy difference| is reported). Prints one table
and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--values", type=int, default=16)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per task")
    p.add_argument("--skip-cli", action="store_true", help="leave out the nestlearn sweep row")
    p.add_argument("--out", type=Path, default=HERE / "results" / "packing.json")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("NESTLEARN_PROGRESS", "0")

    import jax
    import numpy as np
    import optax

    from nestlearn import continual, engine, nn, tasks

    stream = tasks.split_digits("task", args.tasks, seed=0)
    config = continual.TrainConfig(steps_per_task=args.steps, batch_size=32, evals_per_task=1)
    seeds = list(range(args.seeds))
    lams = [float(v) for v in np.logspace(-2, 2, args.values)]
    n = len(seeds) * len(lams)

    def learner():
        model = lambda rngs: nn.MLP(64, (32,), stream.n_classes, init="lecun", rngs=rngs)  # noqa: E731
        return continual.Learner(model, optax.sgd(0.1), continual.EWC(lam=1.0), config)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out.acc_matrix)
        return out, time.perf_counter() - start

    print(f"{n} runs ({args.values} EWC strengths x {args.seeds} seeds), {args.tasks} tasks x {args.steps} steps, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices", flush=True)  # fmt: skip
    packed_learner = learner()
    mesh = engine.run_mesh(n)
    packed, t_first = timed(lambda: packed_learner.run(stream, seeds, sweep={"lam": lams}, mesh=mesh))
    _, t_packed_run = timed(lambda: packed_learner.run(stream, seeds, sweep={"lam": lams}, mesh=mesh))
    print(f"packed: first call {t_first:.2f}s, second call {t_packed_run:.2f}s", flush=True)

    single = learner()
    times, rows = [], {}
    for r in packed.runs:  # the same runs, in the same order
        out, t = timed(lambda r=r: single.run(stream, [r["seed"]], sweep={"lam": [r["lam"]]}))
        times.append(t)
        rows[(r["lam"], r["seed"])] = out.acc_matrix[0]
    _, t_single_repeat = timed(
        lambda: single.run(stream, [packed.runs[0]["seed"]], sweep={"lam": [packed.runs[0]["lam"]]})
    )
    compile_single = times[0] - t_single_repeat
    run_single = sum(times) - compile_single
    gap = max(
        float(np.max(np.abs(rows[(r["lam"], r["seed"])] - packed.acc_matrix[i])))
        for i, r in enumerate(packed.runs)
        if not packed.diverged[i]
    )
    print(f"one program per run: {sum(times):.2f}s for {n} calls (first {times[0]:.2f}s, its repeat "
          f"{t_single_repeat:.2f}s)", flush=True)  # fmt: skip

    report = {
        "runs": n,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "tasks": args.tasks,
        "steps_per_task": args.steps,
        "packed": {"compile_s": t_first - t_packed_run, "run_s": t_packed_run, "total_s": t_first},
        "per_run": {"compile_s": compile_single, "run_s": run_single, "total_s": sum(times), "calls": n},
        "max_abs_acc_difference": gap,
        "diverged_runs": int(packed.diverged.sum()),
    }
    report["speedup_run"] = run_single / t_packed_run
    report["speedup_total"] = sum(times) / t_first
    if not args.skip_cli:
        report["nestlearn_sweep"] = _cli_sweep(args, lams, seeds)
        metrics = report["nestlearn_sweep"].pop("metrics")
        report["nestlearn_sweep"]["max_abs_metric_difference"] = max(
            abs(metrics[(r["lam"], r["seed"])] - float(packed.acc_matrix[i, -1].mean()))
            for i, r in enumerate(packed.runs)
            if not packed.diverged[i] and metrics[(r["lam"], r["seed"])] is not None
        )

    rows_out = [
        (f"one program ({n} runs vmapped, sharded)", report["packed"]),
        (f"one program per run (compiled once, {n} calls)", report["per_run"]),
    ]
    if "nestlearn_sweep" in report:
        rows_out.append(("nestlearn sweep (packed; checkpoints, manifest)", report["nestlearn_sweep"]))
    print(f"\n| {'':48s} | compile (s) | run (s) | total (s) |")
    print(f"|{'-' * 50}|-------------|---------|-----------|")
    for name, r in rows_out:
        c = f"{r['compile_s']:.2f}" if "compile_s" in r else "-"
        rr = f"{r['run_s']:.2f}" if "run_s" in r else "-"
        print(f"| {name:48s} | {c:>11s} | {rr:>7s} | {r['total_s']:9.2f} |")
    print(f"\nrun time ratio (per run / packed): {report['speedup_run']:.1f}x; total (compile included): "
          f"{report['speedup_total']:.1f}x; max |accuracy difference| {gap:.2g}; "
          f"{report['diverged_runs']} diverged runs")  # fmt: skip
    if "nestlearn_sweep" in report:
        print(f"nestlearn sweep: {report['nestlearn_sweep']['programs']} program(s), manifest metric vs packed "
              f"max |difference| {report['nestlearn_sweep']['max_abs_metric_difference']:.2g}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cli_sweep(args, lams, seeds) -> dict:
    """The same sweep through ``nestlearn sweep`` (one packed run directory), timed end to end."""
    from nestlearn.experiment._sweep import Manifest, run_sweep

    experiment = f"""
from nestlearn.experiment import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainSpec
CONFIG = ExperimentConfig(
    data=DataConfig(stream="split_digits", scenario="task", n_tasks={args.tasks}),
    model=ModelConfig(hidden=(32,)), optim=OptimConfig(name="sgd", lr=0.1, momentum=0.0),
    train=TrainSpec(steps_per_task={args.steps}, batch_size=32, evals_per_task=1),
    strategies=("ewc",), seeds=1,
)
"""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "experiments").mkdir()
        (tmp / "experiments" / "packing_ewc.py").write_text(experiment)
        (tmp / "sweep.toml").write_text(
            f'[[experiment]]\nname = "packing_ewc"\nseeds = {json.dumps(seeds)}\n'
            f'[experiment.grid]\n"sweep.ewc" = {json.dumps(lams)}\n'
        )
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            start = time.perf_counter()
            manifest = run_sweep(tmp / "sweep.toml", tmp / "out", log=lambda m: None)
            total = time.perf_counter() - start
        finally:
            os.chdir(cwd)
        counts = Manifest(tmp / "out").counts()
    # each run's final average accuracy as the manifest split it back, keyed like the packed results
    metrics = {
        (float(r["overrides"][0].partition("=")[2]), r["seed"]): r["metric"]["ewc"]
        for r in manifest.runs.values()
    }
    print(f"nestlearn sweep: {total:.2f}s, {len(manifest.groups)} program(s), {counts}", file=sys.stderr)
    return {"total_s": total, "programs": len(manifest.groups), "states": counts, "metrics": metrics}


if __name__ == "__main__":
    main()
