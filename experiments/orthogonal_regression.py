"""The Nested Learning paper's toy: continual linear regression on orthogonal tasks. Does momentum forget,
does delta momentum, deep momentum, DGD, Muon or a multi-timescale optimizer forget less? Issue 5's first
measured comparison, every method at its own tuned learning rate (issue 12).

Command:  nestlearn run orthogonal_regression [--set steps_per_task=N --set seeds=0,1 --set tune_seed=100
                                               --set lr_grid=0.1,1,10] [--quick] [--resume]
                                                     (--quick: 2 seeds, 100 steps per task)
Runtime:  2-6 minutes on 2 shared CPU cores (9 learners x 5 rates x 6 seeds, one compiled program per
          learner; the shorter with a warm compilation cache); --quick about as long (mostly compilation).
Produces: results/tuning.csv (per optimizer and rate: final average loss and forgetting on the tuning
          seed, diverged, which rate was chosen), results/loss_matrix.csv (loss on task j after training
          task i, per optimizer and seed, at the chosen rate), results/summary.csv (per optimizer and seed:
          its rate, final average loss, average forgetting, loss on each task right after learning it),
          results/curves.npz (test loss on every task at every evaluation, [optimizer][seed, step, task]),
          figures/orthogonal_regression.{pdf,png}, status.json.
Setup:    d = 32 inputs, K = 4 tasks, m = 4 outputs. Per seed, a random orthonormal basis is split into
          4 blocks U_k of 8 columns; task k draws z ~ N(0, I_8), x = U_k z + 0.05 * eps (eps ~ N(0, I_32),
          isotropic noise that reaches every subspace) and y = T_k z with T_k ~ N(0, 1/8). The learner is
          a linear map written as two matrices, y_hat = (A + B) x (A the fast part, B the slow part;
          both start at 0), trained on 0.5 ||y_hat - y||^2 with batch 16, 300 steps per task, seeds 0-4.
          Test sets: 256 examples per task from the same distribution. Forgetting of task j is its test
          loss after the last task minus its test loss right after training it (mean over j < K).
          Learners (lr is each one's tuned rate), nested programs of nestlearn.levels run by
          levels.NestedTrainer (runs vmapped, one task per compiled chunk) unless said:
            sgd_momentum       one level, optax.sgd(lr, momentum=0.9) on A and B
            delta_momentum     one level, optim.delta_momentum(lr, decay=0.9)
            period_schedule    two levels learning from the data (the CMS rule): A with SGD-momentum every
                               step, B every 10 steps with the sum of its 10 gradients (both at lr)
            consolidation      two levels over A and B: fast SGD-momentum (lr), slow consolidating every
                               10 steps at rate 0.5 (lookahead, optim.consolidate); the slow copy evaluated
            m3                 one level, optim.m3(lr, slow_period=10): Algorithm 1 (sums, no decay)
            m3_adam_ema        one level, optim.m3(lr, slow_period=10, variant="adam_ema")
            deep_momentum      one level, optim.deep_momentum(lr): per-coordinate MLP memory, the paper's
                               dot-product inner objective, memory_lr 1, decay 0.9
            muon               one level, optax.contrib.muon(lr) (beta 0.95, Nesterov; A and B are 2-D)
            dgd                optim.delta_gradient_descent(lr) on kernels A, B [32, 4] (y = x (A + B)),
                               each given the batch's input x; run on nestlearn.engine directly (a
                               level's optimizer is not given inputs), same data, one chunk per task
          Test losses are measured after every top-level step: every step for one-level learners, every
          10 steps for two-level ones (curves.npz stores each learner's evaluation period as
          "<name>__every").
Tuning:   every learner has its own rate grid, its centre rate times lr_grid (default 0.1, 0.316, 1,
          3.16, 10: five log-spaced rates over two decades; centres 0.003 for the SGD-momentum family,
          deep momentum, m3_adam_ema and muon, 0.001 for m3, 0.01 for dgd). Each rate runs on
          tune_seed (default 100, which must not be a reported seed) in the same vmapped program as the
          reported seeds; the rate with the lowest final average loss on the tuning seed (a diverged run
          counts as infinite) is the one reported for seeds 0-4. All rates and their tuning scores are in
          results/tuning.csv; the log names a chosen rate at the edge of its grid. The full run's choices
          (none at an edge): sgd_momentum, period_schedule, deep_momentum, m3_adam_ema and muon 0.00095,
          m3 0.001, delta_momentum and consolidation 0.003, dgd 0.01.
Resume:   by part: a learner whose results are done (results/parts/<name>.npz) is kept on --resume; a
          learner in progress resumes exactly at its last finished task (checkpoints/<name>/).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from nestlearn import ConfigError, levels, optim
from nestlearn.engine import Engine, run_chunks, run_keys
from nestlearn.experiment import RunDir, save_figure

D, K, M, R = 32, 4, 4, 8
NOISE, BATCH, N_TEST = 0.05, 16, 256


@dataclasses.dataclass(frozen=True)
class Learner:
    """A learner: its levels (fastest first; ``None`` for DGD, trained by :func:`train_dgd`), the levels
    whose ``learning_rate`` the tuning sets (one rate shared by all of them) and the centre of its grid."""

    levels: tuple | None
    tuned: tuple[str, ...]
    base_lr: float


def swept(factory):
    """``factory(learning_rate)`` behind ``optax.inject_hyperparams``, so the rate is a per-run value."""
    return optax.inject_hyperparams(lambda learning_rate: factory(learning_rate))(learning_rate=1.0)


def learners() -> dict[str, Learner]:
    """Every learner, with the levels whose rate is tuned and the centre of its rate grid."""
    sgdm = swept(lambda lr: optax.sgd(lr, momentum=0.9))
    owns_a, owns_b = (lambda path: path == ("A",)), (lambda path: path == ("B",))
    one = lambda factory, base: Learner((levels.Level("weights", swept(factory)),), ("weights",), base)  # noqa: E731
    return {
        "sgd_momentum": one(lambda lr: optax.sgd(lr, momentum=0.9), 0.003),
        "delta_momentum": one(lambda lr: optim.delta_momentum(lr, 0.9), 0.003),
        "period_schedule": Learner(
            (levels.Level("A", sgdm, owns=owns_a), levels.Level("B", sgdm, period=10, owns=owns_b)),
            ("A", "B"),
            0.003,
        ),
        "consolidation": Learner(
            (levels.Level("fast", sgdm), levels.Level("slow", period=10, learns_by="consolidate", rate=0.5)),
            ("fast",),
            0.003,
        ),
        "m3": one(lambda lr: optim.m3(lr, slow_period=10), 0.001),
        "m3_adam_ema": one(lambda lr: optim.m3(lr, slow_period=10, variant="adam_ema"), 0.003),
        "deep_momentum": one(lambda lr: optim.deep_momentum(lr), 0.003),
        "muon": one(lambda lr: optax.contrib.muon(lr), 0.003),
        "dgd": Learner(None, (), 0.01),
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


def data(key, s, steps):
    """The batch of data step ``s`` (task ``s // steps``), the same for every learner."""
    u, t, _, _ = problem(key)
    return sample(jax.random.fold_in(key, s), u[s // steps], t[s // steps], BATCH)


def test_losses(w, key):
    _, _, xs, ys = problem(key)
    return jax.vmap(lambda xt, yt: loss(w, xt, yt))(xs, ys)


def trainer(program: levels.Nested, steps: int) -> levels.NestedTrainer:
    """Every run trains on the K tasks in turn; the test loss on every task after every top-level step."""
    period = program.periods[-1]

    def batches(key, i):  # top-level step i: data steps period * i .. period * i + period - 1
        return jax.vmap(lambda s: data(key, s, steps))(i * period + jnp.arange(period))

    def evaluate(params, key):
        return {"test": test_losses(params["A"] + params["B"], key)}

    zero = {"A": jnp.zeros((M, D)), "B": jnp.zeros((M, D))}
    n = steps // period
    return levels.NestedTrainer(program, lambda key: zero, batches, steps=K * n, chunk=n, evaluate=evaluate)


class DGDState(flax.struct.PyTreeNode):
    """One DGD run: kernels ``{"A", "B"}`` ``[D, M]`` (``y = x (A + B)``), the optimizer state, the engine's
    step and divergence counters."""

    params: dict
    opt_state: optim.DeltaGDState
    step: jax.Array
    diverged_step: jax.Array


def train_dgd(seeds: list[int], rates: list[float], steps: int, checkpoints=None):
    """Delta Gradient Descent on the same data, one run per (rate, seed); returns ``(curve, runs)``.

    DGD needs each layer's input beside its gradient, which a level's optimizer is not given, so it runs on
    the engine directly (one chunk per task, resumable): ``optim.delta_gradient_descent(lr)`` with
    ``inputs={"A": x, "B": x}``, both kernels seeing the batch's input ``x``.
    """

    def step(state, key, lr):
        x, y = data(key, state.step, steps)
        value, g = jax.value_and_grad(lambda p: loss((p["A"] + p["B"]).T, x, y))(state.params)
        upd, opt = optim.delta_gradient_descent(lr).update(
            g, state.opt_state, state.params, inputs={"A": x, "B": x}
        )
        params = optax.apply_updates(state.params, upd)
        metrics = {
            "loss": value,
            "update_norm": optax.tree.norm(upd),
            "test": test_losses((params["A"] + params["B"]).T, key),
        }
        return state.replace(params=params, opt_state=opt), metrics

    runs = [{"lr": r, "seed": s} for r in rates for s in seeds]
    keys = run_keys([r["seed"] for r in runs])
    lrs = jnp.asarray([r["lr"] for r in runs], jnp.float32)
    zero = {"A": jnp.zeros((len(runs), D, M)), "B": jnp.zeros((len(runs), D, M))}
    n_runs = len(runs)
    state = DGDState(
        zero,
        optim.DeltaGDState(jnp.zeros(n_runs, jnp.int32)),
        jnp.zeros(n_runs, jnp.int32),
        jnp.full(n_runs, -1, jnp.int32),
    )
    engine = Engine(step, length=steps, in_axes=(0, 0))
    _, chunks = run_chunks(
        engine, state, keys, lrs, n_chunks=K, steps_per_chunk=steps, checkpoints=checkpoints, progress=False
    )
    return np.concatenate([c["test"] for c in chunks], 1), runs


def train(name: str, learner: Learner, seeds: list[int], grid: list[float], steps: int, checkpoints=None):
    """Every (rate, seed) run of one learner: ``curve [runs, evaluations, K]``, the runs' rates and seeds, and
    the evaluation period. Levels sharing a tuned rate are swept together (the diagonal of their grid)."""
    if learner.levels is None:
        curve, runs = train_dgd(seeds, grid, steps, checkpoints)
        return curve, np.array([r["lr"] for r in runs]), np.array([r["seed"] for r in runs]), 1
    program = levels.Nested(learner.levels, train_loss, levels.Stream())
    sweep = {f"{lv}.learning_rate": grid for lv in learner.tuned}
    out = trainer(program, steps).run(seeds, sweep=sweep, progress=False, checkpoints=checkpoints)
    names = list(sweep)
    keep = [i for i, r in enumerate(out["runs"]) if all(r[n] == r[names[0]] for n in names)]
    rates = np.array([out["runs"][i][names[0]] for i in keep])
    return (
        out["eval"]["test"][keep],
        rates,
        np.array([out["runs"][i]["seed"] for i in keep]),
        program.periods[-1],
    )


def scores(curve: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per run: the loss matrix ends [runs, K trained, K evaluated], final average loss, forgetting."""
    ends = curve[:, n - 1 :: n]
    just = np.diagonal(ends, axis1=1, axis2=2)
    return {
        "ends": ends,
        "final_loss": ends[:, -1].mean(-1),
        "forgetting": (ends[:, -1, :-1] - just[:, :-1]).mean(-1),
        "loss_just_trained": just.mean(-1),
        "diverged": ~np.isfinite(curve).all((1, 2)),
    }


@dataclasses.dataclass(frozen=True)
class Config:
    """Training steps per task, the reported seeds, the tuning seed and the rate grid (multiples of each
    learner's centre rate)."""

    steps_per_task: int = 300
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tune_seed: int = 100
    lr_grid: tuple[float, ...] = (0.1, 0.316, 1.0, 3.16, 10.0)

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        if self.tune_seed in self.seeds:
            raise ConfigError(
                f"tune_seed ({self.tune_seed}) must not be one of the reported seeds {self.seeds}"
            )
        if not self.lr_grid or any(not (m > 0 and np.isfinite(m)) for m in self.lr_grid):
            raise ConfigError(f"lr_grid must be positive multipliers, got {self.lr_grid!r}")
        for name, lv in learners().items():
            if lv.levels is None:
                continue
            period = levels.Nested(lv.levels, train_loss, levels.Stream()).periods[-1]
            if self.steps_per_task <= 0 or self.steps_per_task % period:
                raise ConfigError(
                    f"steps_per_task ({self.steps_per_task}) must be a positive multiple of {name}'s period {period}"
                )


CONFIG = Config()
QUICK = ["steps_per_task=100", "seeds=0,1"]


def run(config: Config, rundir: RunDir) -> None:
    """Tunes and runs every learner; a finished learner (results/parts/<name>.npz) is kept on resume."""
    steps, seeds, log = config.steps_per_task, list(config.seeds), rundir.log
    curves, every, matrix_rows, summary_rows, tuning_rows = {}, {}, [], [], []
    for name, learner in learners().items():
        start = time.perf_counter()
        grid = [float(np.float32(learner.base_lr * m)) for m in config.lr_grid]
        if rundir.done(f"parts/{name}"):
            part = rundir.read_arrays(f"parts/{name}")
            log(f"[{name}] already finished, loaded results/parts/{name}.npz")
        else:
            with rundir.checkpoints(name) as checkpoints:  # one chunk per task, resumed exactly
                curve, rates, run_seeds, period = train(
                    name, learner, [config.tune_seed, *seeds], grid, steps, checkpoints
                )
            tune = run_seeds == config.tune_seed
            sc = scores(curve[tune], steps // period)
            loss_ = np.where(sc["diverged"] | ~np.isfinite(sc["final_loss"]), np.inf, sc["final_loss"])
            best = rates[tune][int(np.argmin(loss_))]
            chosen = (rates == best) & ~tune
            order = np.argsort([seeds.index(s) for s in run_seeds[chosen]])
            part = {"curve": curve[chosen][order], "every": period, "lr": best, "grid": rates[tune],
                    "tune_final_loss": sc["final_loss"], "tune_forgetting": sc["forgetting"],
                    "tune_diverged": sc["diverged"]}  # fmt: skip
            rundir.write_arrays(f"parts/{name}", part)
            rundir.mark_done(f"parts/{name}")
        curve, period, lr = part["curve"], int(part["every"]), float(part["lr"])
        for r, f_, fg, dv in zip(
            part["grid"], part["tune_final_loss"], part["tune_forgetting"], part["tune_diverged"]
        ):
            tuning_rows.append({"optimizer": name, "learning_rate": float(r), "tune_seed": config.tune_seed,
                                "final_loss": float(f_), "forgetting": float(fg), "diverged": bool(dv),
                                "chosen": bool(r == lr)})  # fmt: skip
        curves[name], every[name] = curve, period
        sc = scores(curve, steps // period)
        for s, seed in enumerate(seeds):
            for i in range(K):
                for j in range(K):
                    matrix_rows.append({"optimizer": name, "seed": seed, "trained_task": i, "eval_task": j,
                                        "loss": float(sc["ends"][s, i, j])})  # fmt: skip
            summary_rows.append({"optimizer": name, "seed": seed, "learning_rate": lr,
                                 "diverged": bool(sc["diverged"][s]), "final_loss": float(sc["final_loss"][s]),
                                 "forgetting": float(sc["forgetting"][s]),
                                 "loss_just_trained": float(sc["loss_just_trained"][s])})  # fmt: skip
        f, fl = sc["forgetting"], sc["final_loss"]
        sem = lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0  # noqa: E731
        at_edge = " (at the grid's edge)" if lr in (min(part["grid"]), max(part["grid"])) else ""
        log(f"[{name}] lr {lr:.4g}{at_edge}: final loss {fl.mean():.4f} ± {sem(fl):.4f}, "
            f"forgetting {f.mean():.4f} ± {sem(f):.4f} ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    rundir.write_table("tuning", pd.DataFrame(tuning_rows))
    rundir.write_table("loss_matrix", pd.DataFrame(matrix_rows))
    rundir.write_table("summary", pd.DataFrame(summary_rows))
    rundir.write_arrays(
        "curves", {"steps_per_task": steps, **curves, **{f"{k}__every": v for k, v in every.items()}}
    )
    figures(rundir.path)
    rundir.mark_complete(
        optimizers=list(curves), seeds=seeds, steps_per_task=steps, tune_seed=config.tune_seed
    )


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
        right.set_xticks(
            range(len(mean)), [n.replace("_", " ") for n in mean.index], fontsize=6, rotation=45, ha="right"
        )
        right.set_ylabel("forgetting (loss increase)")
        save_figure(fig, out / "figures" / "orthogonal_regression")
        plt.close(fig)
