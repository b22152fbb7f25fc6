"""The Nested Learning paper's toy: continual linear regression on orthogonal tasks. Does momentum forget,
does delta momentum or a multi-timescale optimizer forget less? Issue 5's first measured comparison.

Command:  nestlearn run orthogonal_regression [--set steps_per_task=N --set seeds=0,1] [--quick] [--resume]
                                                     (--quick: 2 seeds, 100 steps per task)
Runtime:  about 1 minute on 2 CPU cores; --quick about 30 seconds (mostly compilation).
Produces: results/loss_matrix.csv (loss on task j after training task i, per optimizer and seed),
          results/summary.csv (per optimizer and seed: final average loss, average forgetting, loss on
          each task right after learning it), results/curves.npz (test loss on every task at every
          step, [optimizer][seed, step, task]), figures/orthogonal_regression.{pdf,png}, status.json.
Setup:    d = 32 inputs, K = 4 tasks, m = 4 outputs. Per seed, a random orthonormal basis is split into
          4 blocks U_k of 8 columns; task k draws z ~ N(0, I_8), x = U_k z + 0.05 * eps (eps ~ N(0, I_32),
          isotropic noise that reaches every subspace) and y = T_k z with T_k ~ N(0, 1/8). The learner is
          a linear map written as two matrices, y_hat = (A + B) x (A the fast part, B the slow part;
          both start at 0), trained on 0.5 ||y_hat - y||^2 with batch 16, 300 steps per task, seeds 0-4.
          Test sets: 256 examples per task from the same distribution. Forgetting of task j is its test
          loss after the last task minus its test loss right after training it (mean over j < K).
          Learners, each a nested program of nestlearn.levels run by levels.NestedTrainer (seeds vmapped,
          one task per compiled chunk), all at learning rate 0.05 unless said:
            sgd_momentum       one level, optax.sgd(0.05, momentum=0.9) on A and B
            delta_momentum     one level, optim.delta_momentum(0.05, decay=0.9)
            period_schedule    two levels learning from the data (the CMS rule): A with SGD-momentum every
                               step, B every 10 steps with the sum of its 10 gradients
            consolidation      two levels over A and B: fast SGD-momentum, slow consolidating every 10 steps
                               at rate 0.5 (lookahead, optim.consolidate); the slow copy evaluated
            m3                 one level, optim.m3(0.01, slow_period=10)
          Test losses are measured after every top-level step: every step for one-level learners, every
          10 steps for two-level ones (curves.npz stores each learner's evaluation period as
          "<name>__every").
Resume:   by part: a learner whose curves are done (results/parts/<name>.npz) is kept on --resume; a
          learner in progress resumes exactly at its last finished task (checkpoints/<name>/).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from nestlearn import ConfigError, levels, optim
from nestlearn.experiment import RunDir

D, K, M, R = 32, 4, 4, 8
NOISE, BATCH, N_TEST = 0.05, 16, 256


def learners() -> dict:
    """Every learner as the levels of a nested program, fastest first."""
    sgdm = optax.sgd(0.05, momentum=0.9)
    owns_a, owns_b = (lambda path: path == ("A",)), (lambda path: path == ("B",))
    return {
        "sgd_momentum": (levels.Level("weights", sgdm),),
        "delta_momentum": (levels.Level("weights", optim.delta_momentum(0.05, 0.9)),),
        "period_schedule": (
            levels.Level("A", sgdm, owns=owns_a),
            levels.Level("B", sgdm, period=10, owns=owns_b),
        ),
        "consolidation": (
            levels.Level("fast", sgdm),
            levels.Level("slow", period=10, learns_by="consolidate", rate=0.5),
        ),
        "m3": (levels.Level("weights", optim.m3(0.01, slow_period=10)),),
    }


def problem(key):
    """Orthogonal input blocks U [K, D, R], target maps T [K, M, R], and test sets per task."""
    k_q, k_t, k_test = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_q, (D, D)))
    u = q.T.reshape(K, R, D).transpose(0, 2, 1)
    t = jax.random.normal(k_t, (K, M, R)) / jnp.sqrt(jnp.float32(R))
    xs, ys = jax.vmap(lambda k, uk, tk: sample(k, uk, tk, N_TEST))(jax.random.split(k_test, K), u, t)
    return u, t, xs, ys


def sample(key, u_k, t_k, n):
    k_z, k_e = jax.random.split(key)
    z = jax.random.normal(k_z, (n, R))
    x = z @ u_k.T + NOISE * jax.random.normal(k_e, (n, D))
    return x, z @ t_k.T


def loss(w, x, y):
    return 0.5 * jnp.mean(jnp.sum(jnp.square(x @ w.T - y), -1))


def train_loss(p, x, y):
    return loss(p["A"] + p["B"], x, y)


def trainer(program: levels.Nested, steps: int) -> levels.NestedTrainer:
    """Every seed trains on the K tasks in turn; the test loss on every task after every top-level step."""
    period = program.periods[-1]

    def batches(key, i):  # top-level step i: data steps period * i .. period * i + period - 1
        u, t, _, _ = problem(key)
        s = i * period + jnp.arange(period)
        return jax.vmap(lambda s: sample(jax.random.fold_in(key, s), u[s // steps], t[s // steps], BATCH))(s)

    def evaluate(params, key):
        _, _, xs, ys = problem(key)
        return {"test": jax.vmap(lambda xt, yt: train_loss(params, xt, yt))(xs, ys)}

    zero = {"A": jnp.zeros((M, D)), "B": jnp.zeros((M, D))}
    n = steps // period
    return levels.NestedTrainer(program, lambda key: zero, batches, steps=K * n, chunk=n, evaluate=evaluate)


@dataclasses.dataclass(frozen=True)
class Config:
    """Training steps per task and the seeds."""

    steps_per_task: int = 300
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        for name, lv in learners().items():
            period = levels.Nested(lv, train_loss, levels.Stream()).periods[-1]
            if self.steps_per_task <= 0 or self.steps_per_task % period:
                raise ConfigError(
                    f"steps_per_task ({self.steps_per_task}) must be a positive multiple of {name}'s period {period}"
                )


CONFIG = Config()
QUICK = ["steps_per_task=100", "seeds=0,1"]


def run(config: Config, rundir: RunDir) -> None:
    """Runs every optimizer over the seeds; a finished learner (results/parts/<name>.npz) is kept on resume."""
    steps, seeds, log = config.steps_per_task, config.seeds, rundir.log
    curves, every, matrix_rows, summary_rows = {}, {}, [], []
    for name, lv in learners().items():
        program = levels.Nested(lv, train_loss, levels.Stream())
        period = program.periods[-1]
        if rundir.done(f"parts/{name}"):
            curve = rundir.read_arrays(f"parts/{name}")["curve"]
            log(f"[{name}] already finished, loaded results/parts/{name}.npz")
        else:
            with rundir.checkpoints(name) as checkpoints:  # one chunk per task, resumed exactly
                out = trainer(program, steps).run(list(seeds), progress=False, checkpoints=checkpoints)
            curve = out["eval"]["test"]  # [S, K*steps/P, K]
            rundir.write_arrays(f"parts/{name}", {"curve": curve})
            rundir.mark_done(f"parts/{name}")
        curves[name], every[name] = curve, period
        n = steps // period
        ends = curve[:, n - 1 :: n]  # [S, K (trained), K (evaluated)]
        for s, seed in enumerate(seeds):
            for i in range(K):
                for j in range(K):
                    matrix_rows.append({"optimizer": name, "seed": seed, "trained_task": i, "eval_task": j,
                                        "loss": float(ends[s, i, j])})  # fmt: skip
            just = np.diag(ends[s])
            summary_rows.append({"optimizer": name, "seed": seed, "diverged": bool(~np.isfinite(curve[s]).all()),
                                 "final_loss": float(ends[s, -1].mean()),
                                 "forgetting": float((ends[s, -1, :-1] - just[:-1]).mean()),
                                 "loss_just_trained": float(just.mean())})  # fmt: skip
        f = np.array([r["forgetting"] for r in summary_rows if r["optimizer"] == name])
        log(f"[{name}] forgetting {f.mean():.4f} ± {f.std(ddof=1) / np.sqrt(len(f)) if len(f) > 1 else 0:.4f}, "
            f"final loss {np.mean([r['final_loss'] for r in summary_rows if r['optimizer'] == name]):.4f}")  # fmt: skip
    rundir.write_table("loss_matrix", pd.DataFrame(matrix_rows))
    rundir.write_table("summary", pd.DataFrame(summary_rows))
    rundir.write_arrays(
        "curves", {"steps_per_task": steps, **curves, **{f"{k}__every": v for k, v in every.items()}}
    )
    figures(rundir.path)
    rundir.mark_complete(optimizers=list(curves), seeds=list(seeds), steps_per_task=steps)


def figures(out: Path) -> None:
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with np.load(out / "results" / "curves.npz") as z:
        steps = int(z["steps_per_task"])
        names = [k for k in z.files if k != "steps_per_task" and not k.endswith("__every")]
        curves = {k: z[k] for k in names}
        every = {k: int(z[f"{k}__every"]) if f"{k}__every" in z.files else 1 for k in names}
    summary = pd.read_csv(out / "results" / "summary.csv")
    with plot.style():
        fig, (left, right) = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.4))
        for i, (name, c) in enumerate(curves.items()):
            v = c[:, :, 0]  # task 1's test loss over the whole stream
            mean = v.mean(0)
            sem = v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.zeros_like(mean)
            x = np.arange(1, len(mean) + 1) * every[name]  # the data step of each evaluation
            left.plot(x, mean, color=f"C{i}", label=name.replace("_", " "), lw=0.8)
            left.fill_between(x, mean - sem, mean + sem, color=f"C{i}", alpha=0.25, lw=0)
        for b in range(1, K):
            left.axvline(b * steps, color="0.6", ls="--", lw=0.5)
        left.set_yscale("log")
        left.set_xlabel("step")
        left.set_ylabel("test loss on task 1")
        left.legend(fontsize=6, frameon=False)
        g = summary[~summary["diverged"]].groupby("optimizer", sort=False)["forgetting"]
        mean, sem = g.mean(), g.sem()
        right.bar(
            range(len(mean)),
            mean.values,
            yerr=sem.fillna(0).values,
            color=[f"C{i}" for i in range(len(mean))],
        )
        right.set_xticks(range(len(mean)), [n.replace("_", "\n") for n in mean.index], fontsize=6)
        right.set_ylabel("forgetting (loss increase)")
        plot.save_figure(fig, out / "figures" / "orthogonal_regression")
        plt.close(fig)
