"""A sweep in one program against the same runs one at a time: 4 strategies x 4 strengths x 5 seeds.

    python benchmarks/sweep.py [--tasks 10] [--epochs 2] [--out benchmarks/results/sweep.json]

Workload: the permuted-MNIST benchmark of issue #2 (bundled 5k MNIST, MLP 784-256-256-10, SGD 0.01
momentum 0.9, batch 64), with EWC (lam 1, 10, 100, 1000), SI (c 0.1, 1, 10, 100), L2 toward the
initial weights (lam 1e-4 ... 1e-1) and LwF (alpha 0.1 ... 100). "Swept" runs each strategy's
4 strengths x 5 seeds as one vmapped program (20 runs per call); "one at a time" runs the same 80 runs
in a loop, each a single-run call of a single-run program (compiled once per strategy and reused, since
strengths are arguments, not constants). Both include compilation; results must agree run by run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

from nestlearn import continual, nn, tasks

HERE = Path(__file__).resolve().parent
SWEEPS = {
    "ewc": (continual.EWC(lam=1.0), (1.0, 10.0, 100.0, 1000.0)),
    "si": (continual.SI(c=1.0), (0.1, 1.0, 10.0, 100.0)),
    "l2init": (continual.L2Init(lam=1e-3), (1e-4, 1e-3, 1e-2, 1e-1)),
    "lwf": (continual.LwF(alpha=1.0), (0.1, 1.0, 10.0, 100.0)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    args = p.parse_args()
    stream = tasks.permuted_mnist(args.tasks, seed=0)
    config = continual.TrainConfig(
        steps_per_task=continual.steps_for_epochs(args.epochs, stream, 64), batch_size=64
    )
    seeds = list(range(args.seeds))

    def learner(strategy):
        model = lambda rngs: nn.MLP(784, (256, 256), 10, init="torch", rngs=rngs)  # noqa: E731
        return continual.Learner(model, optax.sgd(0.01, momentum=0.9), strategy, config)

    report = {"tasks": args.tasks, "epochs": args.epochs, "seeds": args.seeds, "strategies": {}}
    total_swept = total_single = 0.0
    for name, (strategy, values) in SWEEPS.items():
        key = type(strategy).strength
        start = time.perf_counter()
        swept = learner(strategy).run(stream, seeds, sweep={key: values})
        jax.block_until_ready(swept.acc_matrix)
        t_swept = time.perf_counter() - start
        start = time.perf_counter()
        single = learner(strategy)
        rows = []
        for v in values:
            for s in seeds:
                rows.append(single.run(stream, [s], sweep={key: [v]}).acc_matrix[0])
        t_single = time.perf_counter() - start
        gap = float(np.nanmax(np.abs(np.stack(rows) - swept.acc_matrix)))
        report["strategies"][name] = {
            "swept_s": t_swept,
            "one_at_a_time_s": t_single,
            "speedup": t_single / t_swept,
            "max_abs_acc_difference": gap,
            "diverged_runs": int(swept.diverged.sum()),
        }
        total_swept += t_swept
        total_single += t_single
        print(f"{name}: swept {t_swept:.1f}s, one at a time {t_single:.1f}s ({t_single / t_swept:.2f}x), "
              f"max |R difference| {gap:.2g}", flush=True)  # fmt: skip
    report["total"] = {
        "swept_s": total_swept,
        "one_at_a_time_s": total_single,
        "speedup": total_single / total_swept,
    }
    print(
        f"total: swept {total_swept:.1f}s, one at a time {total_single:.1f}s ({total_single / total_swept:.2f}x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
