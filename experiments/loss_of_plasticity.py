"""Loss of plasticity on slowly-changing regression: backprop against continual backprop and
shrink-and-perturb (Dohare et al. 2024), notebook 03's first figure.

Command:  nestlearn run loss_of_plasticity [--set steps=N --set seeds=0,1 --set bin=N] [--quick]
          [--resume]                                 (--quick: 40,000 steps, 2 seeds, 4,000-step bins)
Runtime:  about 6 minutes on 2 CPU cores; --quick about 30 seconds.
Produces: results/online_regression.npz (online squared error, dead-unit fraction and weight magnitude
          per 10,000-step bin, per method and seed), results/online_regression.csv (the same, tidy),
          figures/loss_of_plasticity.{pdf,png}.
Setup:    20 input bits, 15 flipping (one flips every 5,000 steps), 5 fresh random bits and a bias;
          target: 100 linear threshold units with ±1 weights (beta 0.7); learner 21-5-1 ReLU, SGD 0.01,
          one example per step, 500,000 steps, seeds 0-4 (the paper runs millions of steps in 20,000-step
          bins). Continual backprop: replacement rate 1e-4, decay 0.99, maturity 100; shrink-and-perturb:
          shrink 0.999 and noise 0.01 every 10 steps.
Resume:   exact, at bin boundaries: every method checkpoints its carry and measures after each bin
          (checkpoints/<method>/), and --resume continues from the last one.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from nestlearn import ConfigError, continual, tasks
from nestlearn.experiment import RunDir, save_figure

METHODS = {
    "backprop": None,
    "continual_backprop": continual.ContinualBackprop(replacement_rate=1e-4, decay=0.99, maturity=100),
    "shrink_perturb": continual.ShrinkAndPerturb(shrink=0.999, noise=0.01, every=10),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Steps per seed, the seeds, and steps per bin (a bin is one compiled call and one checkpoint)."""

    steps: int = 500_000
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    bin: int = 10_000

    def validate(self) -> None:
        if self.bin <= 0 or self.steps <= 0 or self.steps % self.bin:
            raise ConfigError(f"steps ({self.steps}) must be a positive multiple of bin ({self.bin})")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")


CONFIG = Config()
QUICK = ["steps=40000", "seeds=0,1", "bin=4000"]


def run(config: Config, rundir: RunDir) -> None:
    """Runs the three methods; each checkpoints after every bin, so a killed run resumes at a bin."""
    problem = tasks.SlowlyChangingRegression(flip_every=5_000, flip="one")
    arrays, rows = {}, []
    for name, strategy in METHODS.items():
        with rundir.checkpoints(name) as checkpoints:
            if checkpoints.latest() is not None:
                rundir.log(f"[{name}] resuming after bin {checkpoints.latest()}/{config.steps // config.bin}")
            r = continual.run_online_regression(
                problem, strategy, hidden=5, lr=0.01, steps=config.steps, seeds=config.seeds, bin=config.bin,
                checkpoints=checkpoints,
            )  # fmt: skip
        rundir.log(
            f"[{name}] error first bin {r.error[:, 0].mean():.3f}, last bin {r.error[:, -1].mean():.3f}"
        )
        for key in ("error", "dead_fraction", "weight_magnitude"):
            arrays[f"{name}/{key}"] = getattr(r, key)
        arrays["bin_end"] = r.bin_end
        for s, seed in enumerate(config.seeds):
            for b, end in enumerate(r.bin_end):
                rows.append({"method": name, "seed": seed, "bin_end": int(end), "error": float(r.error[s, b]),
                             "dead_fraction": float(r.dead_fraction[s, b]),
                             "weight_magnitude": float(r.weight_magnitude[s, b])})  # fmt: skip
    rundir.write_arrays("online_regression", arrays)
    rundir.write_table("online_regression", pd.DataFrame(rows))
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure(rundir.results / "online_regression.npz")
        save_figure(fig, rundir.figures / "loss_of_plasticity")
        plt.close(fig)
    rundir.mark_complete(methods=list(METHODS))


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
