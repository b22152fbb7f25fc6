"""MAML on sinusoid regression, reproduced with the paper's setup, beside first-order MAML, Reptile,
Meta-SGD and a pre-trained baseline: notebook 04's adaptation curves.

Command:  nestlearn run maml_sinusoid [--set n_iters=N --set chunk=N --set seeds=0,1
          --set runs=maml/k10,pretrained/k10] [--quick] [--resume]
                                                   (--quick: 1,000 meta-iterations, 2 seeds)
Runtime:  about 10 minutes on 2 CPU cores; --quick about 1 minute.
Produces: results/adaptation.csv (query MSE after 0..10 inner steps, per method, K and seed),
          results/adaptation.npz (the same as arrays, the meta-training loss curves, and the fits of
          three test tasks), results/summary.csv (mean ± s.e.m. after 1 and 10 steps),
          figures/maml_adaptation.{pdf,png}, figures/maml_fits.{pdf,png}.
Setup:    Finn et al. 2017 (REFERENCES.md): amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5], MSE,
          network 1-40-40-1 ReLU, K = 10 support and 10 query points, one inner SGD step at 0.01,
          meta-batch 25, Adam 1e-3, 20,000 meta-iterations (the paper: 70,000), seeds 0-4; test on 600
          held-out tasks (the same for every method and seed) with up to 10 SGD steps at 0.01 on K points.
          Meta-SGD learns a rate per parameter (initialised at 0.01) and adapts with it. First-order MAML
          drops the second-order term. Reptile: 5 inner SGD steps at 0.01 on the K points, outer SGD
          0.1 annealed linearly to 0 (Nichol et al.'s sine schedule). Pre-trained: the same network
          trained on the query loss of the same tasks without an inner loop (MAML with 0 inner steps),
          then fine-tuned at test like MAML. MAML and Meta-SGD are also trained and tested with K = 5, the
          setting of Meta-SGD's published table (MAML 1.13 ± 0.18, Meta-SGD 0.90 ± 0.16 after one step).
Resume:   a finished (method, K) is kept (results/parts/); meta-training resumes exactly at its last
          chunk (checkpoints/<method>_k<K>/).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx

from nestlearn import ConfigError, meta, nn, tasks
from nestlearn.experiment import RunDir, save_figure

META_BATCH, INNER_LR, TEST_TASKS, TEST_STEPS = 25, 0.01, 600, 10
# "method/kK": the methods of the figure at K = 10, and the two with a published number at K = 5.
RunName = Literal[
    "maml/k10", "fomaml/k10", "reptile/k10", "metasgd/k10", "pretrained/k10", "maml/k5", "metasgd/k5"
]  # fmt: skip
LABELS = {
    "maml": "MAML",
    "fomaml": "first-order MAML",
    "reptile": "Reptile",
    "metasgd": "Meta-SGD",
    "pretrained": "pre-trained",
}


def make_learner(method: str, loss, n_iters: int):
    """The meta-learner and its outer optimizer."""
    sgd = optax.sgd(INNER_LR)
    if method == "maml":
        return meta.MAML(loss, sgd, steps=1), optax.adam(1e-3)
    if method == "fomaml":
        return meta.MAML(loss, sgd, steps=1, first_order=True), optax.adam(1e-3)
    if method == "metasgd":
        return meta.MetaSGD(loss, steps=1, init_lr=INNER_LR), optax.adam(1e-3)
    if method == "pretrained":
        return meta.MAML(loss, sgd, steps=0), optax.adam(1e-3)
    if method == "reptile":
        return meta.Reptile(loss, sgd, steps=5), optax.sgd(optax.linear_schedule(0.1, 0.0, n_iters))
    raise ValueError(f"unknown method {method!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Meta-iterations, iterations per compiled chunk (and checkpoint), seeds, and the (method, K) runs."""

    n_iters: int = 20_000
    chunk: int = 2_000
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    runs: tuple[RunName, ...] = ("maml/k10", "fomaml/k10", "reptile/k10", "metasgd/k10", "pretrained/k10",
                                 "maml/k5", "metasgd/k5")  # fmt: skip

    def validate(self) -> None:
        if self.chunk <= 0 or self.n_iters <= 0 or self.n_iters % self.chunk:
            raise ConfigError(f"n_iters ({self.n_iters}) must be a positive multiple of chunk ({self.chunk})")
        if not self.seeds or not self.runs:
            raise ConfigError("seeds and runs must each name at least one")


CONFIG = Config()
QUICK = ["n_iters=1000", "chunk=500", "seeds=0,1"]


def train(method: str, k: int, seeds, n_iters: int, chunk: int, log, checkpoints=None):
    """Meta-trains every seed in one program; returns the learner, meta-parameters and loss curve.

    With ``checkpoints`` (an ``engine.Checkpoints``) the state and the loss curve so far are saved after
    every chunk, and training continues from the latest checkpoint found there.
    """
    models = [nn.MLP(1, (40, 40), 1, rngs=nnx.Rngs(s)) for s in seeds]
    apply, _ = meta.functional(models[0])
    params = jax.tree.map(lambda *p: jnp.stack(p), *[meta.functional(m)[1] for m in models])
    learner, outer = make_learner(method, meta.mse_loss(apply), n_iters)
    family = tasks.Sinusoid(k_support=k, k_query=k)
    trainer = meta.MetaTrainer(learner, outer, lambda key: family.sample(key, META_BATCH), n_iters=chunk)
    state = jax.vmap(trainer.init)(jax.vmap(learner.init)(params))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    first = checkpoints.latest() if checkpoints is not None else None
    if first is not None:
        log(f"[{method} K={k}] resumed after {first * chunk}/{n_iters} meta-iterations")

    def report(c, state, metrics):
        log(
            f"[{method} K={k}] {(c + 1) * chunk}/{n_iters}: post-adaptation query MSE "
            f"{metrics['loss_post'][:, -200:].mean():.3f}"
        )

    state, metrics = trainer.train(
        state, keys, n_iters // chunk, checkpoints=checkpoints, progress=False, on_chunk=report
    )
    return learner, state, metrics["loss_post"]


def run_part(method: str, k: int, config: Config, rundir: RunDir) -> dict[str, np.ndarray]:
    """Trains and tests one (method, K) over the seeds: its arrays, keyed as in adaptation.npz."""
    seeds = config.seeds
    with rundir.checkpoints(f"{method}_k{k}") as checkpoints:
        learner, state, loss_curve = train(
            method, k, seeds, config.n_iters, config.chunk, rundir.log, checkpoints
        )
    family = tasks.Sinusoid(k_support=k, k_query=k)
    test = family.sample(jax.random.PRNGKey(12345), TEST_TASKS)  # held-out tasks: a key no training draw uses
    mse = np.asarray(
        jax.jit(jax.vmap(lambda mp, lr=learner, t=test: lr.evaluate(mp, t, TEST_STEPS)))(state.meta_params)
    )
    diverged = np.asarray(state.diverged_step)
    name = f"{method}/k{k}"
    arrays = {f"{name}/mse": mse, f"{name}/loss_curve": loss_curve, f"{name}/diverged_step": diverged}
    if k == 10:  # fits of three test tasks by seed 0's learner, for the figure
        fam, xs = tasks.Sinusoid(k_support=10, k_query=10), jnp.linspace(-5, 5, 200)[:, None]
        batch, sine = fam.sample_with_params(jax.random.PRNGKey(7), 3)
        mp0 = jax.tree.map(lambda a: a[0], state.meta_params)
        apply = meta.functional(nn.MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))[0]
        for steps in (0, 1, 10):
            fits = [apply(learner.adapt(mp0, batch.support_x[i], batch.support_y[i], steps), xs)[:, 0]
                    for i in range(3)]  # fmt: skip
            arrays[f"{name}/fit{steps}"] = np.stack([np.asarray(f) for f in fits])
        arrays["fit/x"], arrays["fit/true"] = (
            np.asarray(xs[:, 0]),
            np.asarray(fam.function(sine, jnp.tile(xs[None, :, 0], (3, 1)))),
        )
        arrays["fit/support_x"], arrays["fit/support_y"] = (
            np.asarray(batch.support_x[..., 0]),
            np.asarray(batch.support_y[..., 0]),
        )
    ok = diverged < 0
    rundir.log(f"[{method} K={k}] test MSE after 1 step {mse[ok, 1].mean():.3f}, after 10 {mse[ok, 10].mean():.3f}"
               + (f"; {int((~ok).sum())} seed(s) diverged" if (~ok).any() else ""))  # fmt: skip
    return arrays


def run(config: Config, rundir: RunDir) -> None:
    """Trains and tests every (method, K) of ``config.runs``; a finished one is skipped on resume, and
    meta-training resumes at its last chunk."""
    rows, arrays = [], {"seeds": np.asarray(config.seeds)}
    for run_name in config.runs:
        method, k = run_name.split("/k")[0], int(run_name.split("/k")[1])
        part = f"parts/{method}_k{k}"
        if rundir.done(part):
            rundir.log(f"[{method} K={k}] already finished, loaded results/{part}.npz")
            part_arrays = rundir.read_arrays(part)
        else:
            part_arrays = run_part(method, k, config, rundir)
            rundir.write_arrays(part, part_arrays)
            rundir.mark_done(part)
        arrays.update(part_arrays)
        mse, diverged = part_arrays[f"{run_name}/mse"], part_arrays[f"{run_name}/diverged_step"]
        for s, seed in enumerate(config.seeds):
            for steps in range(TEST_STEPS + 1):
                rows.append({"method": method, "k": k, "seed": seed, "steps": steps, "mse": float(mse[s, steps]),
                             "diverged": bool(diverged[s] >= 0)})  # fmt: skip
    frame = pd.DataFrame(rows)
    rundir.write_arrays("adaptation", arrays)
    rundir.write_table("adaptation", frame)
    rundir.write_table("summary", summary(frame))
    figures(rundir.path)
    rundir.mark_complete(runs=list(config.runs))


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and s.e.m. over non-diverged seeds of the query MSE after 1 and 10 steps."""
    kept = frame[~frame["diverged"] & frame["steps"].isin([1, 10])]
    g = kept.groupby(["method", "k", "steps"])["mse"]
    table = pd.DataFrame({"mean": g.mean(), "sem": g.sem(), "seeds": g.count()}).reset_index()
    n_diverged = (
        frame[frame["steps"] == 0].groupby(["method", "k"])["diverged"].sum().rename("diverged_seeds")
    )
    return table.merge(n_diverged.reset_index(), on=["method", "k"])


def figures(out: Path) -> None:
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = adaptation_figure(out / "results" / "adaptation.npz")
        save_figure(fig, out / "figures" / "maml_adaptation")
        plt.close(fig)
        fig = fits_figure(out / "results" / "adaptation.npz")
        save_figure(fig, out / "figures" / "maml_fits")
        plt.close(fig)


def _load(npz: Path) -> dict[str, np.ndarray]:
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


def adaptation_figure(npz: Path):
    """Test query MSE after 0..10 inner steps at K = 10, mean ± s.e.m. over non-diverged seeds."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    data = _load(npz)
    fig, ax = plt.subplots(figsize=(plot.SINGLE_COLUMN, 2.4))
    for method, label in LABELS.items():
        if f"{method}/k10/mse" not in data:  # a run of fewer methods (--set runs=...)
            continue
        mse, ok = data[f"{method}/k10/mse"], data[f"{method}/k10/diverged_step"] < 0
        mse = mse[ok]
        mean = mse.mean(0)
        sem = mse.std(0, ddof=1) / np.sqrt(len(mse)) if len(mse) > 1 else np.zeros_like(mean)
        steps = np.arange(len(mean))
        ax.plot(steps, mean, marker="o", ms=2.5, label=label)
        ax.fill_between(steps, mean - sem, mean + sem, alpha=0.25)
    ax.set_yscale("log")
    ax.set_xlabel("inner SGD steps at test (lr 0.01)")
    ax.set_ylabel("query MSE, 600 test tasks")
    ax.legend(fontsize=6, frameon=False)
    return fig


def fits_figure(npz: Path):
    """Three test tasks: the true sine, the K = 10 support points, and MAML's and the pre-trained
    network's predictions after 0, 1 and 10 steps (seed 0)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    data = _load(npz)
    fig, axes = plt.subplots(2, 3, figsize=(plot.DOUBLE_COLUMN, 3.4), sharex=True, sharey="col")
    x = data["fit/x"]
    for row, method in enumerate(("maml", "pretrained")):
        for i in range(3):
            ax = axes[row, i]
            ax.plot(x, data["fit/true"][i], color="k", lw=1, label="true")
            ax.scatter(
                data["fit/support_x"][i],
                data["fit/support_y"][i],
                s=8,
                color="k",
                zorder=3,
                label="K = 10 points",
            )
            for steps, style in ((0, ":"), (1, "--"), (10, "-")):
                ax.plot(x, data[f"{method}/k10/fit{steps}"][i], ls=style, lw=1, label=f"after {steps} steps")
            if i == 0:
                ax.set_ylabel(LABELS[method])
    axes[0, 0].legend(fontsize=5, frameon=False)
    return fig
