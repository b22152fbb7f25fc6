"""A meta-learned initialisation at the start of a continual stream: does it learn faster, does it
forget less than a random or a pre-trained start? Notebook 04's last figure.

Command:  nestlearn run maml_continual [--set n_iters=N --set seeds=0,1] [--quick] [--resume]
                                                    (--quick: 100 meta-iterations, 2 seeds)
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
Resume:   by part: each learned start is checkpointed once trained (checkpoints/start_<name>/), and each
          start's finished stream (results/<name>.npz) is kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx

from nestlearn import ConfigError, continual, meta, metrics, nn, tasks
from nestlearn.experiment import RunDir, load_result, save_figure

STARTS = ("random", "pretrained", "maml")
LABELS = {"random": "random start", "pretrained": "pre-trained start", "maml": "MAML start"}


def model(rngs: nnx.Rngs) -> nn.MLP:
    return nn.MLP(784, (256, 256), 2, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Config:
    """Meta-iterations of the learned starts, and the seeds (seed s meta-trains from seed s's model)."""

    n_iters: int = 500
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    def validate(self) -> None:
        if self.n_iters <= 0:
            raise ConfigError(f"n_iters must be positive, got {self.n_iters}")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")


CONFIG = Config()
QUICK = ["n_iters=100", "seeds=0,1"]


def learned_starts(seeds, n_iters: int, rundir: RunDir) -> dict[str, object]:
    """MAML and pre-trained parameters per seed (stacked), meta-trained on 2-way tasks of digits 0-4.

    Each start is checkpointed (``checkpoints/start_<name>``) once learned, and read back on resume.
    """
    family, _ = tasks.few_shot_mnist(n_way=2, k_shot=5, k_query=15, meta_test_classes=(5, 6, 7, 8, 9))
    k_model = [jax.random.split(jax.random.PRNGKey(s))[0] for s in seeds]  # the engine's model key
    params = jax.tree.map(lambda *p: jnp.stack(p), *[nnx.split(model(nnx.Rngs(k)))[1] for k in k_model])
    apply = meta.functional(model(nnx.Rngs(0)))[0]
    loss = meta.cross_entropy_loss(apply)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    starts = {}
    for name, steps in (("maml", 5), ("pretrained", 0)):
        learner = meta.MAML(loss, optax.sgd(0.1), steps=steps)
        with rundir.checkpoints(f"start_{name}", keep=1) as checkpoints:
            if checkpoints.latest() is not None:
                abstract = jax.eval_shape(lambda lr=learner: jax.vmap(lr.params)(jax.vmap(lr.init)(params)))
                starts[name] = checkpoints.restore(checkpoints.latest(), abstract, {"n_iters": np.zeros(())})[
                    0
                ]
                rundir.log(f"[{name}] start already learned, restored from checkpoints/start_{name}")
                continue
            trainer = meta.MetaTrainer(
                learner, optax.adam(1e-3), lambda key: family.sample(key, 8), n_iters=n_iters
            )
            state, m = trainer.run_seeds(jax.vmap(trainer.init)(params), keys)
            rundir.log(
                f"[{name}] meta-training query loss {float(m['loss_post'][:, :50].mean()):.3f} -> "
                f"{float(m['loss_post'][:, -50:].mean()):.3f} (after {steps} inner steps)"
            )
            starts[name] = jax.vmap(learner.params)(state.meta_params)
            checkpoints.save(n_iters, starts[name], {"n_iters": np.asarray(float(n_iters))})
    return starts


def run(config: Config, rundir: RunDir) -> None:
    """Learns the two starts, runs the stream from all three; a finished start's stream is kept on resume."""
    seeds = list(config.seeds)
    stream = tasks.split_mnist("domain")
    learner = continual.Learner(
        model,
        optax.sgd(0.01),
        continual.Naive(),
        continual.TrainConfig(steps_per_task=50, batch_size=32, eval_every=10),
    )
    starts = None
    rows = []
    for name in STARTS:
        if rundir.done(name):
            result = rundir.load_result(name)
            rundir.log(f"[{name}] already finished, loaded results/{name}.npz")
        else:
            if starts is None and name != "random":
                starts = learned_starts(seeds, config.n_iters, rundir)
            result = learner.run(stream, seeds, init_params=None if name == "random" else starts[name])
            rundir.save_result(name, result)
            rundir.mark_done(name)
        table = metrics.summary(result.acc_matrix, result.acc_init)
        for s, seed in enumerate(seeds):
            rows.append({"start": name, "seed": seed, "diverged": bool(result.diverged[s]),
                         **{k: float(v[s]) for k, v in table.items()}})  # fmt: skip
        ok = ~result.diverged
        rundir.log(
            f"[{name}] ACC {table['average_accuracy'][ok].mean():.3f}, learning accuracy "
            f"{table['learning_accuracy'][ok].mean():.3f}, forgetting {table['forgetting'][ok].mean():.3f}"
        )
    rundir.write_table("summary", pd.DataFrame(rows))
    figures(rundir.path)
    rundir.mark_complete(starts=list(STARTS))


def figures(out: Path) -> None:
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure({name: load_result(out / "results" / f"{name}.npz") for name in STARTS})
        save_figure(fig, out / "figures" / "maml_continual")
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
