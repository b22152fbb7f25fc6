"""CMS period choices x seeds in one program against the same runs one at a time (issue 5's sweep benchmark).

    python benchmarks/cms_sweep.py [--tasks 5] [--epochs 1] [--seeds 5] [--out benchmarks/results/cms_sweep.json]

Workload: permuted MNIST (bundled 5k MNIST), nn.CMSMLP(784, 256, 10, levels=3, hidden=256), SGD 0.01
momentum 0.9 under the CMS rule with periods (1, b, b^2) for b in {1, 2, 4} (CMS off, (1, 2, 4),
(1, 4, 16)), batch 64, 5 seeds: 15 runs. The period base b is an ``optax.inject_hyperparams``
hyperparameter (``periodic`` takes traced periods), so the engine sweeps it like a learning rate:
  swept           the 15 runs as one vmapped program (one compilation, 15 runs per call);
  one_at_a_time   the same program at one run per call, compiled once and called 15 times;
  concrete        periods as Python constants: one compilation per period choice, 5 single-run calls
                  each (no traced-period overhead: off-period inner updates are skipped by lax.cond).
All include compilation. Results must agree run by run (reported as the largest accuracy difference).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nestlearn import continual, nn, tasks

HERE = Path(__file__).resolve().parent
BASES = (1.0, 2.0, 4.0)


def cms_sgd(learning_rate, period_base, momentum):
    b = jnp.round(period_base)
    return nn.cms_optimizer(optax.sgd(learning_rate, momentum), (1, b, b * b), io_period=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "cms_sweep.json")
    args = p.parse_args()
    stream = tasks.permuted_mnist(args.tasks, seed=0)
    config = continual.TrainConfig(
        steps_per_task=continual.steps_for_epochs(args.epochs, stream, 64), batch_size=64
    )
    seeds = list(range(args.seeds))
    model = lambda rngs: nn.CMSMLP(784, 256, 10, levels=3, hidden=256, rngs=rngs)  # noqa: E731
    injected = optax.inject_hyperparams(cms_sgd, static_args=("momentum",))(0.01, 1.0, 0.9)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    sweep = {"optimizer.period_base": BASES}
    swept, t_swept = timed(
        lambda: continual.Learner(model, injected, continual.Naive(), config).run(stream, seeds, sweep=sweep)
    )

    def one_at_a_time():
        learner = continual.Learner(model, injected, continual.Naive(), config)
        return np.stack([learner.run(stream, [s], sweep={"optimizer.period_base": [b]}).acc_matrix[0]
                         for b in BASES for s in seeds])  # fmt: skip

    single, t_single = timed(one_at_a_time)

    def concrete():
        rows = []
        for b in BASES:
            opt = nn.cms_optimizer(optax.sgd(0.01, 0.9), (1, int(b), int(b) ** 2), io_period=1)
            learner = continual.Learner(model, opt, continual.Naive(), config)
            rows += [learner.run(stream, [s]).acc_matrix[0] for s in seeds]
        return np.stack(rows)

    fixed, t_fixed = timed(concrete)
    report = {
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "tasks": args.tasks,
        "epochs": args.epochs,
        "steps_per_task": config.steps_per_task,
        "seeds": args.seeds,
        "period_bases": list(BASES),
        "runs": len(BASES) * args.seeds,
        "swept_s": t_swept,
        "one_at_a_time_s": t_single,
        "concrete_periods_one_at_a_time_s": t_fixed,
        "speedup_vs_one_at_a_time": t_single / t_swept,
        "speedup_vs_concrete": t_fixed / t_swept,
        "max_abs_acc_difference_one_at_a_time": float(np.max(np.abs(single - swept.acc_matrix))),
        "max_abs_acc_difference_concrete": float(np.max(np.abs(fixed - swept.acc_matrix))),
        "final_average_accuracy": {
            f"b={b:g}": float(swept.acc_matrix[i * args.seeds : (i + 1) * args.seeds, -1].mean())
            for i, b in enumerate(BASES)
        },
    }
    print(f"swept {t_swept:.1f}s, one at a time {t_single:.1f}s ({t_single / t_swept:.2f}x), concrete periods one at "
          f"a time {t_fixed:.1f}s ({t_fixed / t_swept:.2f}x); max |R difference| "
          f"{report['max_abs_acc_difference_one_at_a_time']:.2g} / {report['max_abs_acc_difference_concrete']:.2g}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
