"""The N-way K-shot image experiments' shared run: meta-train every method per shot count, then
meta-test on held-out classes with a 95 % confidence interval, next to the published numbers.

Used by ``omniglot_fewshot.py`` and ``mini_imagenet_fewshot.py`` (each sets its own ``CONFIG`` of
:class:`FewShotConfig`, ``QUICK`` and published numbers); the leading underscore keeps this file out of
``nestlearn list``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
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

image_data = sys.modules.get("nestlearn_experiment__image_data")
if image_data is None:  # loaded on its own (tests): import the sibling by path
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "nestlearn_experiment__image_data", Path(__file__).with_name("_image_data.py")
    )
    image_data = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = image_data
    _spec.loader.exec_module(image_data)

Method = Literal["maml", "fomaml", "anil", "reptile", "metasgd"]
LABELS = {"maml": "MAML", "fomaml": "first-order MAML", "anil": "ANIL", "reptile": "Reptile",
          "metasgd": "Meta-SGD"}  # fmt: skip
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """One few-shot benchmark: data, task shape, network, meta-training and meta-test.

    ``data_root`` is the dataset's directory (Omniglot: the folder of ``images_background`` and
    ``images_evaluation``; mini-ImageNet: the folder of ``train``/``val``/``test``); ``synthetic=true``
    writes a small synthetic dataset in the same format into the run directory instead.
    """

    dataset: Literal["omniglot", "mini_imagenet"]
    data_root: str = ""
    synthetic: bool = False
    methods: tuple[Method, ...] = ("maml", "fomaml", "anil", "reptile", "metasgd")
    shots: tuple[int, ...] = (1, 5)
    n_way: int = 5
    k_query: int = 15
    seeds: tuple[int, ...] = (0, 1, 2)
    n_iters: int = 60_000
    chunk: int = 2_000
    meta_batch: int = 32
    inner_lr: float = 0.4
    inner_steps: int = 1
    test_steps: int = 3
    outer_lr: float = 1e-3
    reptile_outer_lr: float = 1.0
    width: int = 64
    image_size: int = 28
    n_train_classes: int = 1200
    test_tasks: int = 600
    eval_block: int = 50
    synthetic_classes: tuple[int, int, int] = (30, 4, 10)
    synthetic_per_class: int = 20

    def validate(self) -> None:
        if not self.synthetic and not self.data_root:
            layout = (
                "images_background/ and images_evaluation/ (<alphabet>/<character>/*.png)"
                if self.dataset == "omniglot"
                else "train/, val/, test/ (<wnid>/*.jpg)"
            )
            raise ConfigError(
                f"data_root is empty: give the {self.dataset} directory holding {layout} with "
                "--set data_root=..., or --set synthetic=true"
            )
        if self.chunk <= 0 or self.n_iters <= 0 or self.n_iters % self.chunk:
            raise ConfigError(f"n_iters ({self.n_iters}) must be a positive multiple of chunk ({self.chunk})")
        for name in ("n_way", "k_query", "meta_batch", "inner_steps", "test_steps", "width", "image_size",
                     "test_tasks", "eval_block", "synthetic_per_class"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.shots or min(self.shots) < 1:
            raise ConfigError(f"shots must be positive shot counts, got {self.shots}")
        if not self.seeds or not self.methods:
            raise ConfigError("seeds and methods must each name at least one")
        if self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size} is too small for Conv-4's four 2x2 poolings")


def data_label(config: FewShotConfig) -> str:
    return "synthetic" if config.synthetic else config.dataset


def confidence_interval(acc: np.ndarray, axis: int = -1) -> np.ndarray:
    """Half-width of the normal 95 % confidence interval of a mean accuracy over test tasks.

    .. math:: 1.96\\, s / \\sqrt{n},\\quad s = \\mathrm{std}_{\\mathrm{ddof}=1}(\\text{task accuracies})

    the interval MAML, Meta-SGD and Reptile report over their 600 (Reptile: 10,000) test tasks.
    """
    acc = np.asarray(acc, np.float64)
    return Z95 * acc.std(axis=axis, ddof=1) / math.sqrt(acc.shape[axis])


def data_root(config: FewShotConfig, rundir: RunDir | None) -> Path:
    """The dataset directory: ``data_root``, or synthetic files written into the run directory."""
    if not config.synthetic:
        return Path(config.data_root).expanduser()
    n_train, n_val, n_test = config.synthetic_classes
    if config.dataset == "omniglot":

        def write(root):
            image_data.write_omniglot(root, background=n_train, evaluation=n_test,
                                      drawings=config.synthetic_per_class)  # fmt: skip
    else:

        def write(root):
            image_data.write_mini_imagenet(root, classes=(n_train, n_val, n_test),
                                           per_class=config.synthetic_per_class)  # fmt: skip

    return image_data.prepare(config.data_root or rundir.path / "synthetic_data", write)


def families(config: FewShotConfig, k_shot: int, rundir: RunDir | None = None, loaded=None):
    """``(meta_train, meta_test, loaded)``: the two task families at ``k_shot``, through the real loaders."""
    root = data_root(config, rundir)
    if config.dataset == "omniglot":
        loaded = loaded if loaded is not None else tasks.load_omniglot(root, size=config.image_size)
        n_train = config.synthetic_classes[0] if config.synthetic else config.n_train_classes
        train, test = tasks.omniglot_few_shot(config.n_way, k_shot, config.k_query, data=loaded,
                                              n_train_characters=n_train)  # fmt: skip
    else:
        if loaded is None:
            loaded = tasks.load_mini_imagenet(root, size=config.image_size, splits=("train", "test"))
        train, test = tasks.mini_imagenet_few_shot(config.n_way, k_shot, config.k_query, data=loaded)
    return train, test, loaded


def model(config: FewShotConfig, input_shape, seed: int) -> nn.Conv4:
    return nn.Conv4(input_shape, config.n_way, width=config.width, rngs=nnx.Rngs(seed))


def learner(
    method: str, config: FewShotConfig, loss
) -> tuple[meta.MetaLearner, optax.GradientTransformation]:
    """The meta-learner and its outer optimizer (see the experiment docstrings)."""
    sgd = optax.sgd(config.inner_lr)
    adam = optax.adam(config.outer_lr)
    if method == "maml":
        return meta.MAML(loss, sgd, steps=config.inner_steps), adam
    if method == "fomaml":
        return meta.MAML(loss, sgd, steps=config.inner_steps, first_order=True), adam
    if method == "anil":
        return meta.ANIL(loss, sgd, steps=config.inner_steps, head=lambda path: path[0] == "head"), adam
    if method == "metasgd":
        return meta.MetaSGD(loss, steps=config.inner_steps, init_lr=config.inner_lr), adam
    if method == "reptile":
        schedule = optax.linear_schedule(config.reptile_outer_lr, 0.0, config.n_iters)
        return meta.Reptile(loss, sgd, steps=config.inner_steps), optax.sgd(schedule)
    raise ConfigError(f"unknown method {method!r}")


def test_accuracy(lrn, apply, meta_params, family, config: FewShotConfig, key) -> np.ndarray:
    """Query accuracy of every seed on ``config.test_tasks`` meta-test tasks after ``test_steps`` steps.

    The tasks are drawn from ``key`` in blocks of ``eval_block`` (the same tasks for every method and
    seed); each is adapted on its support set and scored on its query set.

    Returns:
      ``[seeds, test_tasks]`` accuracies in [0, 1].
    """

    @jax.jit
    def block(mps, batch):
        def per_seed(mp):
            def one(task):
                p = lrn.adapt(mp, task.support_x, task.support_y, config.test_steps)
                hit = jnp.argmax(apply(p, task.query_x), -1) == task.query_y
                return jnp.mean(hit.astype(jnp.float32))

            return jax.lax.map(one, batch)

        return jax.vmap(per_seed)(mps)

    out = []
    for b in range(-(-config.test_tasks // config.eval_block)):
        out.append(
            np.asarray(block(meta_params, family.sample(jax.random.fold_in(key, b), config.eval_block)))
        )
    return np.concatenate(out, axis=1)[:, : config.test_tasks]


def run_part(method: str, k_shot: int, config: FewShotConfig, rundir: RunDir, loaded) -> tuple[dict, object]:
    """Meta-trains and meta-tests one (method, K) for every seed; returns its arrays and the loaded data."""
    train, test, loaded = families(config, k_shot, rundir, loaded)
    shape = tuple(train.images.shape[2:]) if train.images.ndim == 5 else None
    models = [model(config, shape, s) for s in config.seeds]
    apply = meta.functional(models[0])[0]
    params = jax.tree.map(lambda *p: jnp.stack(p), *[meta.functional(m)[1] for m in models])
    lrn, outer = learner(method, config, meta.cross_entropy_loss(apply))
    trainer = meta.MetaTrainer(
        lrn, outer, lambda key: train.sample(key, config.meta_batch), n_iters=config.chunk
    )
    state = jax.vmap(trainer.init)(jax.vmap(lrn.init)(params))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(config.seeds, jnp.uint32))
    label, tag = data_label(config), f"{method} {config.n_way}-way {k_shot}-shot"

    def report(c, state, metrics):
        done = (c + 1) * config.chunk
        rundir.log(f"[{label} {tag}] {done}/{config.n_iters}: query loss after adaptation "
                   f"{np.nanmean(metrics['loss_post'][:, -min(200, config.chunk):]):.3f}")  # fmt: skip

    with rundir.checkpoints(f"{method}_{k_shot}shot") as checkpoints:
        state, curves = trainer.train(state, keys, config.n_iters // config.chunk, checkpoints=checkpoints,
                                      progress=False, on_chunk=report)  # fmt: skip
    acc = test_accuracy(lrn, apply, state.meta_params, test, config, jax.random.PRNGKey(10_000 + k_shot))
    diverged = np.asarray(state.diverged_step)
    ci = confidence_interval(acc)
    for s, seed in enumerate(config.seeds):
        if diverged[s] >= 0:  # its parameters froze at the last finite step: not a result
            rundir.log(f"[{label} {tag}] seed {seed}: diverged at meta-iteration {diverged[s]}, left out")
            continue
        rundir.log(f"[{label} {tag}] seed {seed}: meta-test accuracy {100 * acc[s].mean():.2f} ± "
                   f"{100 * ci[s]:.2f} % over {acc.shape[1]} tasks")  # fmt: skip
    name = f"{method}/{k_shot}shot"
    return {
        f"{name}/acc": acc,
        f"{name}/loss_post": curves["loss_post"],
        f"{name}/diverged_step": diverged,
    }, loaded


def run(config: FewShotConfig, rundir: RunDir, published: dict) -> None:
    """Every (method, shot) of ``config``; a finished one is kept on resume, training resumes by chunk."""
    arrays, loaded = {"seeds": np.asarray(config.seeds)}, None
    rundir.log(f"[{data_label(config)}] {config.dataset} {config.n_way}-way, shots {list(config.shots)}"
               + (" (SYNTHETIC data: not comparable with the published numbers)" if config.synthetic else ""))  # fmt: skip
    for k_shot in config.shots:
        for method in config.methods:
            part = f"parts/{method}_{k_shot}shot"
            if rundir.done(part):
                part_arrays = rundir.read_arrays(part)
                rundir.log(f"[{method} {k_shot}-shot] already finished, loaded results/{part}.npz")
            else:
                part_arrays, loaded = run_part(method, k_shot, config, rundir, loaded)
                rundir.write_arrays(part, part_arrays)
                rundir.mark_done(part)
            arrays.update(part_arrays)
    rundir.write_arrays("accuracy", arrays)
    frame = per_seed(arrays, config)
    rundir.write_table("per_seed", frame)
    summary = table(frame, config, published)
    rundir.write_table("table", summary)
    for row in summary.itertuples():
        ref = f"{row.published:.2f} ± {row.published_ci:.2f} %" if np.isfinite(row.published) else "none"
        rundir.log(f"[{row.data}] {row.method} {row.shot}-shot: {row.acc_mean:.2f} ± {row.acc_sem:.2f} % "
                   f"(s.e.m. over {row.seeds} seeds; mean 95 % CI per seed ± {row.ci95:.2f}); published {ref}")  # fmt: skip
    figure(rundir.path, summary, config)
    rundir.mark_complete(data=data_label(config))


def per_seed(arrays: dict, config: FewShotConfig) -> pd.DataFrame:
    """Meta-test accuracy (%) and its 95 % confidence interval per method, shot and seed."""
    rows = []
    for k_shot in config.shots:
        for method in config.methods:
            acc = arrays[f"{method}/{k_shot}shot/acc"]
            diverged = arrays[f"{method}/{k_shot}shot/diverged_step"] >= 0
            ci = confidence_interval(acc)
            for s, seed in enumerate(config.seeds):
                rows.append({"method": method, "shot": k_shot, "seed": seed, "data": data_label(config),
                             "acc": 100 * float(acc[s].mean()), "ci95": 100 * float(ci[s]),
                             "tasks": acc.shape[1], "diverged": bool(diverged[s])})  # fmt: skip
    return pd.DataFrame(rows)


def table(frame: pd.DataFrame, config: FewShotConfig, published: dict) -> pd.DataFrame:
    """Mean ± s.e.m. over non-diverged seeds per (method, shot), beside the published number."""
    rows = []
    for (method, shot), part in frame.groupby(["method", "shot"], sort=False):
        ok = part[~part["diverged"]]
        pub = published.get((method, int(shot)))
        rows.append({"method": method, "shot": int(shot), "data": part["data"].iloc[0], "seeds": len(ok),
                     "acc_mean": ok["acc"].mean(), "acc_sem": float(image_data.sem(ok["acc"].to_numpy())),
                     "ci95": ok["ci95"].mean(), "tasks": int(part["tasks"].iloc[0]),
                     "published": pub[0] if pub else np.nan, "published_ci": pub[1] if pub else np.nan,
                     "source": pub[2] if pub else "",
                     "comparable": not config.synthetic and pub is not None})  # fmt: skip
    return pd.DataFrame(rows)


def figure(out: Path, summary: pd.DataFrame, config: FewShotConfig) -> None:
    """Bars of the meta-test accuracy per method, one group per shot, published numbers as markers."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig, ax = plt.subplots(figsize=(plot.SINGLE_COLUMN, 2.4))
        methods = list(dict.fromkeys(summary["method"]))
        width = 0.8 / max(1, len(config.shots))
        for i, shot in enumerate(config.shots):
            part = summary[summary["shot"] == shot].set_index("method").reindex(methods)
            x = np.arange(len(methods)) + i * width
            ax.bar(x, part["acc_mean"], width, yerr=part["acc_sem"], capsize=2, label=f"{shot}-shot")
            if not config.synthetic:
                ax.scatter(x, part["published"], marker="_", color="k", s=60, zorder=3,
                           label="published" if i == 0 else None)  # fmt: skip
        ax.axhline(100 / config.n_way, color="0.5", lw=0.6, ls=":", label="chance")
        ax.set_xticks(np.arange(len(methods)) + width * (len(config.shots) - 1) / 2,
                      [LABELS[m] for m in methods], rotation=30, ha="right", fontsize=6)  # fmt: skip
        ax.set_ylabel(f"meta-test accuracy (%), {config.n_way}-way")
        ax.set_title(f"{config.dataset} ({data_label(config)} data)", fontsize=7)
        ax.legend(fontsize=5, frameon=False)
        save_figure(fig, out / "figures" / f"{config.dataset}_fewshot")
        plt.close(fig)
