"""Loss of plasticity on slowly-changing regression: backprop against continual backprop and
shrink-and-perturb (Dohare et al. 2024), notebook 03's first figure.

Command:  nestlearn run loss_of_plasticity          (--quick: 40,000 steps, 2 seeds)
Runtime:  about 6 minutes on 2 CPU cores; --quick about 30 seconds.
Produces: results/online_regression.npz (online squared error, dead-unit fraction and weight magnitude
          per 10,000-step bin, per method and seed), results/online_regression.csv (the same, tidy),
          figures/loss_of_plasticity.{pdf,png}.
Setup:    20 input bits, 15 flipping (one flips every 5,000 steps), 5 fresh random bits and a bias;
          target: 100 linear threshold units with ±1 weights (beta 0.7); learner 21-5-1 ReLU, SGD 0.01,
          one example per step, 500,000 steps, seeds 0-4 (the paper runs millions of steps in 20,000-step
          bins). Continual backprop: replacement rate 1e-4, decay 0.99, maturity 100; shrink-and-perturb:
          shrink 0.999 and noise 0.01 every 10 steps.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from nestlearn import continual, tasks
from nestlearn.experiment._rundir import atomic_write, write_json

METHODS = {
    "backprop": None,
    "continual_backprop": continual.ContinualBackprop(replacement_rate=1e-4, decay=0.99, maturity=100),
    "shrink_perturb": continual.ShrinkAndPerturb(shrink=0.999, noise=0.01, every=10),
}


def run(out: Path, *, quick: bool = False, log=print, scale: tuple | None = None) -> None:
    """Runs the three methods and writes the run directory; ``scale = (steps, seeds, bin)`` overrides."""
    steps, seeds, bin_ = (40_000, (0, 1), 4_000) if quick else (500_000, (0, 1, 2, 3, 4), 10_000)
    if scale is not None:
        steps, seeds, bin_ = scale
    problem = tasks.SlowlyChangingRegression(flip_every=5_000, flip="one")
    arrays, rows = {}, []
    for name, strategy in METHODS.items():
        r = continual.run_online_regression(
            problem, strategy, hidden=5, lr=0.01, steps=steps, seeds=seeds, bin=bin_
        )
        log(f"[{name}] error first bin {r.error[:, 0].mean():.3f}, last bin {r.error[:, -1].mean():.3f}")
        for key in ("error", "dead_fraction", "weight_magnitude"):
            arrays[f"{name}/{key}"] = getattr(r, key)
        arrays["bin_end"] = r.bin_end
        for s, seed in enumerate(seeds):
            for b, end in enumerate(r.bin_end):
                rows.append({"method": name, "seed": seed, "bin_end": int(end), "error": float(r.error[s, b]),
                             "dead_fraction": float(r.dead_fraction[s, b]),
                             "weight_magnitude": float(r.weight_magnitude[s, b])})  # fmt: skip
    atomic_write(out / "results" / "online_regression.npz", lambda f: np.savez(f, **arrays), mode="wb")
    atomic_write(out / "results" / "online_regression.csv", pd.DataFrame(rows).to_csv(index=False))
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure(out / "results" / "online_regression.npz")
        plot.save_figure(fig, out / "figures" / "loss_of_plasticity")
        plt.close(fig)
    write_json(out / "status.json", {"complete": True, "methods": list(METHODS)})


def figure(npz: Path):
    """Online error, dead units and weight magnitude per bin, mean ± s.e.m. over seeds."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with np.load(npz) as z:
        data = {k: z[k] for k in z.files}
    ends = data["bin_end"]
    centre = ends - (ends[0] / 2)
    fig, axes = plt.subplots(1, 3, figsize=(plot.DOUBLE_COLUMN, 2.3))
    labels = ("online squared error", "fraction of dead units", "mean |weight|")
    for ax, key, label in zip(axes, ("error", "dead_fraction", "weight_magnitude"), labels):
        for k, name in enumerate(METHODS):
            v = data[f"{name}/{key}"]
            mean = v.mean(0)
            sem = v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.zeros_like(mean)
            ax.plot(centre, mean, color=f"C{k}", label=name.replace("_", " "))
            ax.fill_between(centre, mean - sem, mean + sem, color=f"C{k}", alpha=0.25, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[0].legend()
    return fig
