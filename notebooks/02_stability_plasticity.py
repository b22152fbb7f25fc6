# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The stability–plasticity trade-off
#
# A network that learns a stream of tasks has to do two things that pull against each other: stay
# **plastic**, free to change its weights enough to learn each new task well, and stay **stable**,
# keeping the weights that the old tasks rely on. Every continual-learning method chooses a point
# between the two, and most have a knob, a penalty strength or a loss weight, that slides it along.
#
# This notebook measures that knob. Each run is one point on a plane built from its accuracy matrix
# *R* (*R*[*i*, *j*] is the accuracy on task *j* after training task *i*, *T* tasks):
#
# - **x, plasticity** = mean over tasks of *R*[*j*, *j*], how well each task is learned at the moment it
#   is trained (the *learning accuracy*);
# - **y, stability** = 1 − forgetting, with Chaudhry's forgetting: for every task but the last, the best
#   accuracy it had before the last task minus its final accuracy, averaged. 1 means nothing learned was
#   lost.
#
# The ideal sits in the top right corner. We sweep four regularisers along their strength on permuted
# MNIST and see where they go. The full version takes about ten minutes on a laptop CPU; set
# `NESTLEARN_SMALL=1` for a shrunken one that runs in seconds (the test suite does).

# %%
# %matplotlib inline
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import optax

from nestlearn import continual, metrics, nn, plot, tasks

SMALL = os.environ.get("NESTLEARN_SMALL") == "1"

BATCH = 64
# The swept strengths of each regulariser: four values spanning three decades.
STRENGTHS = {
    "ewc": (continual.EWC(lam=1.0), (1.0, 10.0, 100.0, 1000.0)),
    "si": (continual.SI(c=1.0), (0.1, 1.0, 10.0, 100.0)),
    "l2init": (continual.L2Init(lam=1.0), (1e-4, 1e-3, 1e-2, 1e-1)),
    "lwf": (continual.LwF(alpha=1.0), (0.1, 1.0, 10.0, 100.0)),
}
REPLAY_BUFFER = 500
if SMALL:
    N_TASKS, SEEDS, HIDDEN = 3, range(2), (64,)
    STRENGTHS = {name: (s, (values[0], values[-1])) for name, (s, values) in STRENGTHS.items()}
    REPLAY_BUFFER = 100
else:
    N_TASKS, SEEDS, HIDDEN = 5, range(5), (256, 256)

stream = tasks.permuted_mnist(N_TASKS, seed=0)
if SMALL:
    STEPS, EVAL_EVERY = 30, 10  # steps per task, evaluation interval
else:
    STEPS = continual.steps_for_epochs(1, stream, BATCH)  # one pass over the 4,000 images: 63 steps
    EVAL_EVERY = 21

print(f"SMALL={SMALL}: {N_TASKS} tasks, {len(SEEDS)} seeds, {STEPS} steps per task, hidden layers {HIDDEN}")
print(stream.name, "tasks:", stream.task_names)

# %% [markdown]
# ## The stream and the two references
#
# Permuted MNIST (see notebook 01): the bundled 4,000 training and 1,000 test MNIST images, every task
# with its own fixed shuffle of the 784 pixels, ten shared outputs. The model is an MLP 784-256-256-10
# trained with SGD (learning rate 0.01, momentum 0.9) in batches of 64, **one epoch per task**, five
# seeds. The two references bracket every method:
#
# - **naive** fine-tuning trains on the current task only: as plastic as this optimizer allows, and the
#   most forgetful;
# - **joint** training draws every batch from all tasks seen so far: it does not forget, but the newest
#   task gets only its share of each batch, so it is learned more slowly.

# %%
config = continual.TrainConfig(steps_per_task=STEPS, batch_size=BATCH, eval_every=EVAL_EVERY)


def make_learner(strategy):
    return continual.Learner(
        lambda rngs: nn.MLP(784, HIDDEN, 10, rngs=rngs),
        optax.sgd(0.01, momentum=0.9),
        strategy,
        config,
    )


results, swept = {}, {}
for name, strategy in [("naive", continual.Naive()), ("joint", continual.Joint())]:
    start = time.perf_counter()
    results[name] = make_learner(strategy).run(stream, seeds=SEEDS)
    print(f"{name}: {len(SEEDS)} seeds in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ## Sweeping a strength is one program
#
# Four regularisers, each with one knob (its class names it in the `strength` class variable):
#
# - **EWC** (`lam`): a quadratic pull back to the weights each finished task ended with, weighted per
#   weight by the diagonal Fisher information, i.e. by how much that task's predictions depend on it;
# - **SI** (`c`): the same kind of pull, with importances accumulated *during* training from each
#   weight's contribution to lowering the loss;
# - **L2Init** (`lam`): an unweighted pull back to the initial weights, the baseline the two above refine;
# - **LwF** (`alpha`): no pull on the weights, but a distillation loss that keeps the outputs on the new
#   task's images close to those of the model as it was at the end of the previous task.
#
# `Learner.run(stream, seeds, sweep={"lam": [...]})` does not loop over the strengths. A strategy is a
# pytree whose leaves are its hyperparameters, so the engine stacks one strategy per (strength, seed)
# pair and `vmap`s over that axis, as it does over seeds alone: **four strengths × five seeds are twenty
# rows of one compiled program**, compiled once. Each row's `result.runs` entry records its strength and
# seed.

# %%
for name, (strategy, values) in STRENGTHS.items():
    key = strategy.strength
    start = time.perf_counter()
    results[name] = make_learner(strategy).run(stream, seeds=SEEDS, sweep={key: values})
    swept[name] = key
    print(
        f"{name:>6}: {key}={list(values)} x {len(SEEDS)} seeds = {len(results[name].runs)} runs, "
        f"one compile, {time.perf_counter() - start:.1f} s"
    )

print("first rows of the EWC sweep:", results["ewc"].runs[:3])

start = time.perf_counter()
results["replay"] = make_learner(continual.Replay(buffer_size=REPLAY_BUFFER)).run(stream, seeds=SEEDS)
print(f"replay ({REPLAY_BUFFER} examples): {len(SEEDS)} seeds in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# Every sweep printed one line: twenty rows (`len(result.runs)`), one compilation, one Python call per
# task. What the vmapped axis saves is the compilation and the Python loop, and on an accelerator the
# extra rows run in parallel; on a two-core CPU the arithmetic still grows with the rows, so a sweep of
# twenty costs a few times the five-seed reference runs. EWC is the slowest: at the end of every task
# it estimates its Fisher from per-example gradients of 1,024 images, for each of the twenty rows.
#
# **Replay** is a different kind of method, added for comparison: a reservoir buffer of 500 training
# images sampled uniformly from everything seen so far, from which every step draws a second batch of
# 64. Its knob, the buffer size, changes array shapes, so it cannot be a vmapped axis; we run one size.
#
# ## The frontier

# %%
points = metrics.tradeoff_points(results, swept=swept)
front = metrics.pareto_front(points["plasticity"].to_numpy(), points["stability"].to_numpy())

refs = points[points["strategy"].isin(["naive", "joint"])]
x0, x1 = refs["plasticity"].min() - 0.01, points["plasticity"].max() + 0.01
y0, y1 = refs["stability"].min() - 0.06, points["stability"].max() + 0.015

with plot.style():
    fig, axes = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 3.0))
    for ax in axes:
        plot.stability_plasticity(points, ax=ax)
        ax.get_legend().remove()
    axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="0.6", linewidth=0.6))
    axes[0].set_title("Every point")
    axes[1].set(xlim=(x0, x1), ylim=(y0, y1), ylabel="", title="Zoom on the grey box")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4)
    plt.show()

print("on the Pareto front:")
print(points.iloc[front][["strategy", "param", "value", "plasticity", "stability"]].to_string(index=False))

# %% [markdown]
# Each coloured line is one regulariser, its points joined from the weakest to the strongest setting
# (the two ends are labelled with their value); bars are one standard error over seeds. The grey
# triangle is naive, the black star joint, the dashed line the Pareto front: the points that no other
# point beats on both axes. The left panel shows every point, the right one zooms on the crowded corner
# where the working settings are. At full size:
#
# - **The references.** Naive sits at plasticity 0.85, stability 0.91: each task is learned well and
#   9% of it is lost by the end. Joint sits at the far top left, 0.80 and 1.01: nothing is forgotten
#   (above 1 because old tasks keep *improving* while they stay in the batches), but with one epoch per
#   task each new task gets only a share of the batches and is learned less well.
# - **Strength moves a regulariser up, then off the plane.** EWC's weak settings are naive: λ = 1 lands
#   on top of it. Raising λ to 10 and 100 moves the point almost straight up (stability 0.91 → 0.93 →
#   0.96) at a cost of half a point of plasticity, the trade-off the knob is meant to buy. One more
#   decade is too much: at λ = 1000, four of five seeds diverge and the fifth collapses to chance, far
#   to the lower left (see the last section). SI traces the same path, slower: c ≤ 10 barely leaves
#   naive, c = 100 reaches 0.95 next to EWC λ = 100.
# - **L2Init goes the wrong way.** Its pull is toward the *initial* weights, not toward what earlier
#   tasks learned, so a stronger pull protects nothing and keeps dragging every weight back: stability
#   *falls* (0.91 → 0.87 at λ = 0.01 → 0.42 at λ = 0.1) and plasticity with it. Kumar et al. propose it
#   against loss of plasticity over very long streams, not against forgetting; five tasks are too short
#   for that to show.
# - **LwF has a narrow useful range.** α = 0.1 is the most plastic point of all (0.855) and more stable
#   than naive (0.935); α = 1 is no better. At α = 10 and 100 the distillation term dominates the loss
#   and training stops working: plasticity drops to 0.47 and 0.24, and α = 100 ends at chance on every
#   task. Its stability of 0.82 looks respectable only because tasks that were never learned have
#   nothing to forget. **Read the two axes together**: a point far to the left is a failed run, however
#   high it sits.
# - **The front** runs through joint, replay and LwF α = 0.1. Replay with 500 images (under 3% of the
#   data seen) is at 0.845 and 0.98: as plastic as EWC λ = 100 and SI c = 100, and well above them.
#   Naive and every EWC, SI and L2Init setting are dominated. On this stream a small memory of real
#   examples buys more stability than any penalty on the weights.
#
# ## Inside one sweep: EWC from weak to too strong
#
# `result.select(lam=...)` keeps the rows of one strength (all its seeds): a `StreamResult` like any
# other, so every plot of notebook 01 applies. Below, the weakest strength, the strongest one whose
# runs all stayed finite, and the strongest.

# %%
ewc, ewc_values = results["ewc"], STRENGTHS["ewc"][1]
finite = [v for v in ewc_values if not ewc.select(lam=v).diverged.any()]
shown = list(dict.fromkeys([ewc_values[0], finite[-1] if finite else ewc_values[0], ewc_values[-1]]))

with plot.style():
    fig, axes = plt.subplots(1, len(shown), figsize=(plot.DOUBLE_COLUMN, 2.4), sharey=True)
    for k, (ax, lam) in enumerate(zip(axes, shown)):
        plot.forgetting_curves(ewc.select(lam=lam), ax=ax, legend=k == len(shown) - 1)
        ax.set_title(f"EWC, λ = {lam:g}")
        if k:
            ax.set_ylabel("")
    plt.show()

# %% [markdown]
# One line per task: its test accuracy over training, mean over the seeds that stayed finite, with a
# band of one standard error; dashed lines are task boundaries. At λ = 1 EWC is naive fine-tuning: the
# first task climbs to 0.81 and slides to 0.66 by the end, and every later task sags after its own
# boundary. At λ = 100 the old tasks hold: the first stays at 0.78–0.80 through four later tasks, while
# each new task still rises to about 0.85, as fast as before. At λ = 1000 only one seed is left (the
# note under the axis says four were excluded), and it shows what "too stable" turns into: through task
# 4 it forgets nothing, then early in task 5 every task, old and new, drops to chance.

# %%
with plot.style():
    fig, axes = plt.subplots(1, len(shown), figsize=(plot.DOUBLE_COLUMN, 2.5))
    for k, (ax, lam) in enumerate(zip(axes, shown)):
        group = ewc.select(lam=lam)
        ok = ~group.diverged if (~group.diverged).any() else np.ones(group.n_seeds, bool)
        title = f"EWC, λ = {lam:g}" + (f" ({ok.sum()} seed)" if ok.sum() == 1 else "")
        plot.accuracy_matrix(group.acc_matrix[ok], ax=ax, title=title)
        if k:
            ax.set_ylabel("")
    plt.show()

# %% [markdown]
# The same runs as accuracy matrices, finite seeds only. Read the first column down: the first task
# goes 0.81 → 0.66 at λ = 1 (naive: 0.65) and 0.81 → 0.78 at λ = 100, while the diagonal, each task
# right after its training, stays at 0.84–0.86 in both. Up to λ = 100 the strength buys stability at
# almost no cost in plasticity; the price is paid all at once at the next decade. The lone λ = 1000
# seed has the brightest lower triangle of the three up to row 3, then a last row of chance: its point
# on the plane (plasticity 0.68, stability 0.27) is this one seed, hence no error bars.
#
# ## The points as a table
#
# `tradeoff_points` returns a pandas DataFrame, one row per (strategy, strength): the two coordinates
# with their standard errors over seeds, and how many seeds diverged (left out of the means). The final
# average accuracy ACC (mean of the last row of *R*, diverged seeds left out too) is added for
# reference: it mixes both axes into one number.

# %%
acc = []  # in the order of `points`: strategies as given, then strengths in run order
for name, result in results.items():
    groups = result.groups(swept[name]).values() if name in swept else [result]
    acc += [metrics.average_accuracy(g.acc_matrix[~g.diverged]).mean() for g in groups]
table = points.assign(ACC=acc)
table = table.assign(value=table["value"].map(lambda v: "" if np.isnan(v) else f"{v:g}"))
table.round(3).set_index(["strategy", "param", "value"])

# %% [markdown]
# ACC ranks replay (0.836) level with joint (0.833), then EWC λ = 100 (0.812), SI c = 100 (0.809) and
# LwF α = 0.1 (0.803), above naive (0.777). Replay and joint tie for different reasons: joint forgets
# nothing but learns each task less well in one epoch, replay learns almost like naive and forgets a
# little. One number cannot tell those apart; the two columns of the plane can. `n_diverged` is 4 for
# EWC λ = 1000, whose standard errors are NaN as a single seed remains.
#
# ## Diverged runs
#
# A strength can be too strong for the optimizer. Gradient descent with momentum β on a quadratic of
# curvature *h* is stable only while (learning rate) × *h* < 2(1 + β), 3.8 here; EWC's penalty adds a
# curvature of λ times the Fisher, and separate EWC adds one such term per finished task. The engine
# does not stop a run whose loss becomes infinite or NaN (it is one row of a vmapped program whose other
# rows are fine); it records, per row, the first global step whose loss was not finite, in
# `result.diverged_step` (−1 if none; `result.diverged` is the boolean mask). `tradeoff_points` leaves
# diverged seeds out of the means and counts them in `n_diverged`, `plot.stability_plasticity` writes
# the count in the legend, and `plot.forgetting_curves` under the axis, so a strength that broke
# training is never averaged in as a poor but valid point.

# %%
for name, result in results.items():
    if result.diverged.any():
        rows = [(run, int(step)) for run, step in zip(result.runs, result.diverged_step) if step >= 0]
        print(f"{name}: {len(rows)} of {len(result.runs)} runs diverged, (run, first bad step):", rows)
    else:
        print(f"{name}: no run diverged (diverged_step is -1 for all {len(result.runs)} runs)")

# %% [markdown]
# At full size four of the five EWC λ = 1000 seeds diverged, at global steps 205, 217, 253 and 265:
# in task 4 (steps 189–251) or early in task 5, late in the stream, as expected if the curvature grows
# with every finished task's Fisher term. The fifth seed stayed finite, so it is counted, yet it also
# ended at chance: the flag catches infinite and NaN losses, not every failure, which is one more reason
# to look at both axes rather than one metric. In the small version (`NESTLEARN_SMALL=1`, three short
# tasks) no run diverges. For any result, check `result.diverged_step` or `result.diverged`, and the
# `n_diverged` column of `tradeoff_points`.
