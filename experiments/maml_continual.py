"""A meta-learned initialisation at the start of a continual stream: does it learn faster, does it
forget less than a random or a pre-trained start? Notebook 04's last figure.

Command:  nestlearn run maml_continual              (--quick: 100 meta-iterations, 2 seeds)
Runtime:  about 4 minutes on 2 CPU cores; --quick about 1 minute.
Produces: results/{random,pretrained,maml}.npz (the stream results of each start, loadable with
          nestlearn.experiment.load_result), results/summary.csv (every metrics.summary value per start
          and seed: ACC, learning accuracy, Chaudhry forgetting, BWT, FWT, ...), figures/maml_continual.{pdf,png} (average accuracy over
          the stream and forgetting curves of the first task, per start).
Setup:    Starts, for an MLP 784-256-256-2 (one 2-unit head):
            random      the model's own initialisation (LeCun normal);
            maml        second-order MAML on 2-way 5-shot MNIST tasks (15 query images per class) drawn
                        from digits 0-4 (tasks.few_shot_mnist), 5 inner SGD steps at 0.1, meta-batch 8,
                        Adam 1e-3, 500 meta-iterations (the query loss after adaptation has
                        levelled off by then);
            pretrained  the same network, tasks, optimizer and number of iterations, trained on the
                        query loss directly (MAML with 0 inner steps): a multi-task pre-trained start.
          Stream: split MNIST, domain-incremental (5 tasks of two digits, labels 0/1 within each pair),
          naive SGD lr 0.01, batch 32, 50 steps per task (a short budget, where a start matters),
          evaluated every 10 steps, seeds 0-4 (seed s meta-trains and pre-trains from seed s's model).
          Digits 0-4, all of their images, were seen while meta-training and pre-training, by both
          learned starts alike; digits 5-9 (tasks 3-5) were not.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pandas as pd
from flax import nnx

from nestlearn import continual, meta, metrics, nn, tasks
from nestlearn.experiment._rundir import atomic_write, load_result, save_result, write_json

STARTS = ("random", "pretrained", "maml")
LABELS = {"random": "random start", "pretrained": "pre-trained start", "maml": "MAML start"}


def model(rngs: nnx.Rngs) -> nn.MLP:
    return nn.MLP(784, (256, 256), 2, rngs=rngs)


def learned_starts(seeds, n_iters: int, log) -> dict[str, object]:
    """MAML and pre-trained parameters per seed (stacked), meta-trained on 2-way tasks of digits 0-4."""
    family, _ = tasks.few_shot_mnist(n_way=2, k_shot=5, k_query=15, meta_test_classes=(5, 6, 7, 8, 9))
    k_model = [jax.random.split(jax.random.PRNGKey(s))[0] for s in seeds]  # the engine's model key
    params = jax.tree.map(lambda *p: jnp.stack(p), *[nnx.split(model(nnx.Rngs(k)))[1] for k in k_model])
    apply = meta.functional(model(nnx.Rngs(0)))[0]
    loss = meta.cross_entropy_loss(apply)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    starts = {}
    for name, steps in (("maml", 5), ("pretrained", 0)):
        learner = meta.MAML(loss, optax.sgd(0.1), steps=steps)
        trainer = meta.MetaTrainer(
            learner, optax.adam(1e-3), lambda key: family.sample(key, 8), n_iters=n_iters
        )
        state, m = trainer.run_seeds(jax.vmap(trainer.init)(params), keys)
        log(
            f"[{name}] meta-training query loss {float(m['loss_post'][:, :50].mean()):.3f} -> "
            f"{float(m['loss_post'][:, -50:].mean()):.3f} (after {steps} inner steps)"
        )
        starts[name] = jax.vmap(learner.params)(state.meta_params)
    return starts


def run(out: Path, *, quick: bool = False, log=print, scale: tuple | None = None) -> None:
    """Learns the two starts, runs the stream from all three; ``scale = (n_iters, seeds)`` overrides."""
    n_iters, seeds = (100, (0, 1)) if quick else (500, (0, 1, 2, 3, 4))
    if scale is not None:
        n_iters, seeds = scale
    seeds = list(seeds)
    starts = learned_starts(seeds, n_iters, log)
    stream = tasks.split_mnist("domain")
    learner = continual.Learner(
        model,
        optax.sgd(0.01),
        continual.Naive(),
        continual.TrainConfig(steps_per_task=50, batch_size=32, eval_every=10),
    )
    rows = []
    for name in STARTS:
        result = learner.run(stream, seeds, init_params=starts.get(name))
        save_result(out / "results" / f"{name}.npz", result)
        table = metrics.summary(result.acc_matrix, result.acc_init)
        for s, seed in enumerate(seeds):
            rows.append({"start": name, "seed": seed, "diverged": bool(result.diverged[s]),
                         **{k: float(v[s]) for k, v in table.items()}})  # fmt: skip
        ok = ~result.diverged
        log(
            f"[{name}] ACC {table['average_accuracy'][ok].mean():.3f}, learning accuracy "
            f"{table['learning_accuracy'][ok].mean():.3f}, forgetting {table['forgetting'][ok].mean():.3f}"
        )
    atomic_write(out / "results" / "summary.csv", pd.DataFrame(rows).to_csv(index=False))
    figures(out)
    write_json(out / "status.json", {"complete": True, "starts": list(STARTS)})


def figures(out: Path) -> None:
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure({name: load_result(out / "results" / f"{name}.npz") for name in STARTS})
        plot.save_figure(fig, out / "figures" / "maml_continual")
        plt.close(fig)


def figure(results: dict):
    """Left: average accuracy over the tasks seen so far. Right: accuracy on task 1 over the stream."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    fig, (left, right) = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.3))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, result) in enumerate(results.items()):
        plot.average_accuracy_curve(result, ax=left, label=LABELS[name])
        plot.forgetting_curves(
            result,
            ax=right,
            tasks=[0],
            label_prefix=f"{LABELS[name]}: ",
            color_cycle=[colors[i]],
            legend=False,
        )
    left.legend(fontsize=6, frameon=False)
    right.set_title("task 1 (digits 0/1) over the stream", fontsize=7)
    return fig


def summary_table(path: Path) -> pd.DataFrame:
    """Mean ± s.e.m. per start over non-diverged seeds, from results/summary.csv."""
    frame = pd.read_csv(path)
    kept = frame[~frame["diverged"]]
    cols = ["average_accuracy", "learning_accuracy", "forgetting", "backward_transfer", "forward_transfer"]
    g = kept.groupby("start", sort=False)[cols]
    return g.mean().round(3).astype(str) + " ± " + g.sem().round(3).astype(str)
