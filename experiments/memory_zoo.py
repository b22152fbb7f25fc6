"""The memory-model zoo on MQAR and forgetting-MQAR at matched state size, each model at its own tuned rate.

Item 6 of issue 12 ("HOPE as the paper describes it"): does HOPE recall as well as the other memories when
they carry the same amount of state? Every memory model of ``nestlearn.nn`` (linear attention, DeltaNet,
Gated DeltaNet, TTT-linear, TTT-MLP, Titans, self-modifying Titans, HOPE, HOPE-attention) and a Transformer.

Command:  nestlearn run memory_zoo [--set models=deltanet,hope --set seeds=0,1,2 --set steps=N ...]
          [--quick] [--resume]   (--quick: 2 models, 1 seed, 2 rates, 40 steps)
Runtime:  the default about 25 minutes on 2 shared CPU cores (mostly compiling the 20 programs, HOPE and
          self-modifying Titans the slowest); --quick under 2 minutes.
Produces: results/zoo.csv (per task, model and reported seed: accuracy on all queries, on keys written
          once and on rewritten keys, the rate used, state size, parameters, sizes), results/zoo_tuning.csv
          (per task, model and rate: the tuning seed's accuracy and loss, and which rate was chosen),
          results/zoo_summary.csv (mean ± s.e.m. over the seeds), figures/memory_zoo (pdf and png),
          status.json.
Resume:   `nestlearn run memory_zoo --resume --out DIR` skips every (task, model) already finished and
          continues the one that was killed from its last checkpointed chunk.

Setup (choices, and how they differ from Zoology and the paper):
  - Tasks (nestlearn.tasks): MQAR (Zoology's layout) at length 64 with 4 pairs, and forgetting-MQAR at
    length 64 with 4 pairs of which 2 are written a second time with new values (the latest value is the
    answer). Vocabulary 64 (keys 1..31, values 32..63) instead of Zoology's 8,192, so that a CPU learns
    the task in a few hundred steps; Zoology's smallest setting is (64, 4) too, but at widths 64-512 and
    tens of thousands of steps.
  - Models: every model has ``n_layers`` (2) layers, d_model 32 and 2 heads, memory chunks of 16 and the
    library's short convolution. Matched state size (``nn.state_size``, floats per sequence after 64
    tokens): the memories' sizes are chosen so that state sizes agree; a matrix memory holds d_model² / heads per
    layer, an MLP memory 2 · d_model · memory_hidden (memory_hidden is the knob), self-modifying Titans
    and HOPE five MLP memories. Choice: d_model fixed at 32 for every model, so that embeddings, channels
    and parameter counts stay comparable, and the memory's hidden width chosen for the state; the
    self-modifying memories cannot go lower than memory_hidden 2, which leaves them 1.4x the target
    (the rounding favours HOPE); Sun et al.'s TTT layers keep their block-start weights and the block's
    gradient sum (4 heads for TTT-linear, memory_hidden 4 for TTT-MLP: 1.08x and 1.10x). The attention
    models' state is their key-value cache, 2 · length ·
    d_model per layer, which grows with the sequence; it is reported, not matched.
  - HOPE and HOPE-attention run the paper's in-context CMS (``cms="context"``: blocks that learn from
    the input's tokens every 16, 64, 256 tokens, hidden width 128). Its blocks' fast weights are
    per-sequence state too, about 100,000 floats here, which ``nn.state_size`` does not count and
    which cannot be matched without shrinking the channel to a few units: HOPE is matched on its
    memory's state and carries this on top (reported as cms_state; it favours HOPE). The table also
    holds ``hope_cms_optimizer`` (the optimizer-level CMS, blocks stepping every 1, 4, 16 optimizer
    steps, embeddings every step), not in the default runs.
  - Optimizer: AdamW (weight decay 1e-4) on the query cross-entropy, batch 16 sequences (64 query labels),
    ``steps`` (300) steps.
  - Tuning (Zoology tunes every model's rate): each model's rate is chosen from ``learning_rates`` on
    ``tuning_seed`` (not among the reported seeds) by its evaluation accuracy (ties: lower loss) on the
    first task; all rates are recorded in zoo_tuning.csv. The reported seeds then train at the chosen
    rate, on every task. Choice: tuned on the first task only and reused (same model, same length and
    batch), which saves a quarter of the CPU time.
  - Reported: accuracy on 8 fresh batches, mean ± s.e.m. over ``seeds``; a diverged run is left out of
    the mean and counted.

References: Arora et al., Zoology (arXiv 2312.04927): MQAR, accuracy against state size; Behrouz et al.,
Nested Learning (arXiv 2512.24695): HOPE, self-modifying Titans; see REFERENCES.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx
from jaxtyping import Array

from nestlearn import ConfigError, nn, tasks
from nestlearn.experiment import RunDir, save_figure

VOCAB = 64
CHUNK = 16  # tokens per memory chunk
WEIGHT_DECAY = 1e-4
CMS_PERIODS = (1, 4, 16)
N_LAYERS = 2  # every model's depth by default (Config.n_layers; state sizes scale with it alike)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its constructor, the sizes that match its state, and its CMS periods.

    Attributes:
      build: an ``nn`` constructor, called as ``build(vocab=..., rngs=..., **kwargs)``.
      kwargs: its sizes and options (d_model, heads, memory_hidden, gate, chunk, ...).
      cms_periods: train with ``nn.cms_optimizer`` at these periods, or ``None`` for plain AdamW.
    """

    build: Callable[..., nn.SequenceModel]
    kwargs: dict[str, Any]
    cms_periods: tuple[int, ...] | None = None

    def model(self, vocab: int, rngs: nnx.Rngs, n_layers: int = N_LAYERS) -> nn.SequenceModel:
        return self.build(vocab=vocab, rngs=rngs, n_layers=n_layers, **self.kwargs)

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW with its rate injected (set per run by the tuning), under the CMS rule if periods."""
        adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=WEIGHT_DECAY)
        if self.cms_periods is None:
            return adamw
        # choice: embeddings and head every step (io_period=1), as memory_recall's CMS runs, not at the
        # slowest period (cms_optimizer's default), which a few hundred steps could not afford
        return nn.cms_optimizer(adamw, self.cms_periods, io_period=1)


_MEMORY = dict(d_model=32, heads=2, chunk=CHUNK)
_ATTENTION = dict(d_model=32, heads=2)
# THE table: name -> model. Every experiment of issue 12 (this one, passkey) builds its models from it, so
# a new option (e.g. a new inner optimizer) is a one-line change here.
MODELS: dict[str, ZooModel] = {
    "linear_attention": ZooModel(nn.linear_attention, _MEMORY),
    "deltanet": ZooModel(nn.deltanet, _MEMORY),
    "gated_deltanet": ZooModel(nn.deltanet, {**_MEMORY, "gate": "gated_deltanet"}),  # decay before write
    "ttt_linear": ZooModel(nn.ttt_linear, {**_MEMORY, "heads": 4}),  # Sun et al.: block weights + grad sum
    "ttt_mlp": ZooModel(nn.ttt_mlp, {**_MEMORY, "memory_hidden": 4}),
    "titans": ZooModel(nn.titans, {**_MEMORY, "memory_hidden": 4}),  # momentum doubles its state
    "self_modifying_titans": ZooModel(nn.self_modifying_titans, {**_MEMORY, "memory_hidden": 2}),
    "hope": ZooModel(nn.hope, {**_MEMORY, "memory_hidden": 2, "cms": "context"}),
    "hope_attention": ZooModel(nn.hope_attention, {**_ATTENTION, "cms": "context"}),
    "transformer": ZooModel(nn.transformer, _ATTENTION),
    # not in the default runs: HOPE with the optimizer-level CMS (blocks step every 1, 4, 16 optimizer steps)
    "hope_cms_optimizer": ZooModel(nn.hope, {**_MEMORY, "memory_hidden": 2, "cms": "optimizer"}, CMS_PERIODS),
    # not in the default runs: HOPE at its own memory width (memory_hidden 2 * d_head = 32), unmatched state
    "hope_wide_memory": ZooModel(nn.hope, {**_MEMORY, "cms": "context"}),
}
DEFAULT_MODELS = tuple(name for name in MODELS if name not in ("hope_cms_optimizer", "hope_wide_memory"))
ATTENTION = ("hope_attention", "transformer")  # state = key-value cache, grows with the length


@dataclasses.dataclass(frozen=True)
class Config:
    """The zoo's sizes. ``tasks`` names any of "mqar", "forgetting_mqar"."""

    models: tuple[str, ...] = DEFAULT_MODELS
    tasks: tuple[str, ...] = ("mqar", "forgetting_mqar")
    seeds: tuple[int, ...] = (0, 1, 2)
    tuning_seed: int = 100
    learning_rates: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    steps: int = 300
    chunk: int = 100  # training steps per compiled call (and per checkpoint)
    length: int = 64
    pairs: int = 4
    reassign: int = 2  # forgetting-MQAR: keys written a second time
    batch: int = 16
    eval_batches: int = 8
    n_layers: int = N_LAYERS

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models {unknown or '()'} unknown; choose from {', '.join(MODELS)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks {bad or '()'} unknown; choose from {', '.join(TASKS)}")
        if not self.seeds or not self.learning_rates:
            raise ConfigError("seeds and learning_rates must each name at least one")
        if self.tuning_seed in self.seeds:
            raise ConfigError(f"tuning_seed ({self.tuning_seed}) must not be one of the seeds {self.seeds}")
        if any(not lr > 0 for lr in self.learning_rates):
            raise ConfigError(f"learning_rates must be positive, got {self.learning_rates}")
        if self.steps <= 0 or self.chunk <= 0 or self.steps % self.chunk:
            raise ConfigError(f"steps ({self.steps}) must be a positive multiple of chunk ({self.chunk})")
        if self.length % CHUNK:
            raise ConfigError(f"length ({self.length}) must be a multiple of the memory chunk {CHUNK}")
        for name in ("batch", "eval_batches", "pairs", "reassign", "n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        # the generators' own checks (length, vocabulary), made before anything is written
        for task in self.tasks:
            TASKS[task](self, jax.random.key(0))


CONFIG = Config()
QUICK = ["models=deltanet,transformer", "seeds=0", "learning_rates=0.003,0.01", "steps=40", "chunk=20",
         "eval_batches=2", "batch=8"]  # fmt: skip

TASKS: dict[str, Callable] = {
    "mqar": lambda c, key: tasks.mqar(key, c.batch, length=c.length, pairs=c.pairs, vocab=VOCAB),
    "forgetting_mqar": lambda c, key: tasks.forgetting_mqar(
        key, c.batch, length=c.length, pairs=c.pairs, reassign=c.reassign, vocab=VOCAB
    ),
}


# -- sizes --------------------------------------------------------------------------------------------


def describe(name: str, length: int, vocab: int = VOCAB, n_layers: int = N_LAYERS) -> dict[str, Any]:
    """A model's sizes: state size in floats after ``length`` tokens (``nn.state_size``: the mixer's memory
    or key-value cache), the in-context CMS's state (``cms_state``, 0 without one), parameter count, and
    its options."""
    spec = MODELS[name]
    model = spec.model(vocab, nnx.Rngs(0), n_layers)
    params = sum(int(np.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cms = 0  # an in-context CMS's per-sequence state (its blocks' fast weights), which nn.state_size omits
    for layer in model.layers:
        if callable(getattr(layer.channel, "init_state", None)):
            cms += sum(int(np.size(x)) for x in jax.tree.leaves(layer.channel.init_state(1)))
    return {
        "state_size": nn.state_size(model, length),
        "cms_state": cms,
        "params": params,
        "n_layers": n_layers,
        "d_model": spec.kwargs["d_model"],
        "heads": spec.kwargs["heads"],
        "memory_hidden": spec.kwargs.get("memory_hidden", 0),
        "state_grows": name in ATTENTION,
    }


# -- training with a tuned rate -------------------------------------------------------------------------


def split_accuracy(trainer: nn.SeqTrainer, params, sample: Callable, key, batches: int) -> dict[str, Array]:
    """One run's accuracy on all queries, on queries of ``kind`` 0 and of ``kind`` 1 (NaN if none).

    In forgetting-MQAR kind 1 marks a rewritten key (the latest value is right) and 0 a key written once;
    MQAR and passkey have kind 0 only.
    """

    def one(i):
        batch = sample(jax.random.fold_in(key, i))
        logits = trainer.apply(params).logits_at(batch.tokens, batch.positions)
        hit = (jnp.argmax(logits, -1) == batch.labels).astype(jnp.float32)
        kind = batch.kind.astype(jnp.float32)
        return jnp.stack([jnp.sum(hit), hit.size, jnp.sum(hit * kind), jnp.sum(kind),
                          jnp.sum(hit * (1 - kind)), jnp.sum(1 - kind)])  # fmt: skip

    s = jnp.sum(jax.lax.map(one, jnp.arange(batches, dtype=jnp.int32)), 0)
    ratio = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1.0), jnp.nan)  # noqa: E731
    return {"acc": ratio(s[0], s[1]), "acc_rewritten": ratio(s[2], s[3]), "acc_once": ratio(s[4], s[5])}


def eval_keys(seeds) -> jax.Array:
    """Evaluation keys of the runs, a stream of their own (folded 7; training uses 0-3)."""
    return jnp.stack([jax.random.fold_in(jax.random.key(s), 7) for s in seeds])


def tuned_runs(
    trainer: nn.SeqTrainer, config, *, tag: str, rundir: RunDir | None, log=print, rate: float | None = None
) -> tuple[list[dict], dict[str, Any], float]:
    """Every rate of ``config.learning_rates`` on the tuning seed, then the reported seeds at the best rate.

    Returns the tuning rows, ``run_seeds``' results for ``config.seeds`` and the chosen rate. Given a
    ``rate`` (already tuned), or with one rate, no tuning run is made. Both phases run in one compiled
    program when they have as many runs.
    """
    rates = [rate] if rate is not None else list(config.learning_rates)
    rows: list[dict] = []
    if len(rates) > 1:
        with _checkpoints(rundir, f"{tag}/tuning") as checkpoints:
            res = trainer.run_seeds(
                [config.tuning_seed] * len(rates), hparams={"learning_rate": rates}, checkpoints=checkpoints
            )
        acc = np.where(res["diverged"], -np.inf, np.nan_to_num(res["eval_acc"], nan=-np.inf))
        loss = np.where(res["diverged"], np.inf, np.nan_to_num(res["eval_loss"], nan=np.inf))
        best = int(np.lexsort((loss, -acc))[0])  # highest accuracy, then lowest loss
        for i, lr in enumerate(rates):
            rows.append({"learning_rate": lr, "tuning_seed": config.tuning_seed, "eval_acc": res["eval_acc"][i],
                         "eval_loss": res["eval_loss"][i], "diverged_step": int(res["diverged_step"][i]),
                         "chosen": i == best})  # fmt: skip
        log(f"[{tag}] tuning: " + ", ".join(f"{lr:g} -> {a:.3f}" for lr, a in zip(rates, res["eval_acc"]))
            + f"; chose {rates[best]:g}")  # fmt: skip
    else:
        best = 0
    lr = rates[best]
    with _checkpoints(rundir, f"{tag}/seeds") as checkpoints:
        res = trainer.run_seeds(
            config.seeds, hparams={"learning_rate": [lr] * len(config.seeds)}, checkpoints=checkpoints
        )
    return rows, res, lr


def _checkpoints(rundir: RunDir | None, name: str):
    import contextlib

    return rundir.checkpoints(name) if rundir is not None else contextlib.nullcontext()


def describe_values(values) -> str:
    """``mean ± s.e.m.`` of the finite values, naming how many were left out."""
    v = np.asarray(values, float)
    ok = v[np.isfinite(v)]
    if not len(ok):
        return "no finite run"
    sem = ok.std(ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else 0.0
    left = len(v) - len(ok)
    return f"{ok.mean():.3f} ± {sem:.3f}" + (f" ({left} left out)" if left else "")


def zoo_one(
    name: str, task: str, config: Config, rundir: RunDir | None = None, log=print, rate: float | None = None
):
    """One model on one task: tuning rows and per-seed rows (no tuning when given a ``rate``)."""
    sample = functools.partial(TASKS[task], config)
    spec = MODELS[name]
    trainer = nn.SeqTrainer(
        lambda rngs: spec.model(VOCAB, rngs, config.n_layers), spec.optimizer(), sample, steps=config.steps,
        chunk=config.chunk, eval_batches=config.eval_batches,
    )  # fmt: skip
    tuning, res, lr = tuned_runs(trainer, config, tag=f"{task}/{name}", rundir=rundir, log=log, rate=rate)
    split = jax.jit(jax.vmap(lambda p, k: split_accuracy(trainer, p, sample, k, config.eval_batches)))
    accs = jax.tree.map(np.asarray, split(res["state"].params, eval_keys(config.seeds)))
    sizes = describe(name, config.length, n_layers=config.n_layers)
    rows = []
    for i, seed in enumerate(config.seeds):
        dead = bool(res["diverged"][i])
        rows.append({"task": task, "model": name, "seed": seed, "learning_rate": lr,
                     **{k: float("nan") if dead else float(v[i]) for k, v in accs.items()},
                     "diverged_step": int(res["diverged_step"][i]), **sizes,
                     "length": config.length, "pairs": config.pairs})  # fmt: skip
    tuning = [{"task": task, "model": name, **row} for row in tuning]
    log(f"[{task}] {name:>22}  state {sizes['state_size']:>6}  params {sizes['params']:>7}  lr {lr:g}  acc "
        f"{describe_values([r['acc'] for r in rows])}"
        + (f"  rewritten {describe_values([r['acc_rewritten'] for r in rows])}" if task != "mqar" else ""))  # fmt: skip
    return tuning, rows


def summary(zoo: pd.DataFrame, columns=("acc", "acc_once", "acc_rewritten")) -> pd.DataFrame:
    """Mean, s.e.m. and number of finite runs per task and model."""
    out = []
    for (task, model), g in zoo.groupby(["task", "model"], sort=False):
        row = {"task": task, "model": model, "learning_rate": g["learning_rate"].iloc[0],
               "state_size": int(g["state_size"].iloc[0]), "params": int(g["params"].iloc[0])}  # fmt: skip
        for col in columns:
            v = g[col].to_numpy(float)
            ok = v[np.isfinite(v)]
            row[f"{col}_mean"] = ok.mean() if len(ok) else np.nan
            row[f"{col}_sem"] = ok.std(ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else 0.0
        row["n"] = int(np.isfinite(g["acc"].to_numpy(float)).sum())
        out.append(row)
    return pd.DataFrame(out)


def chosen_rate(tuning: list[pd.DataFrame], name: str) -> float | None:
    """The rate chosen for ``name`` in the tuning rows so far (``None`` if it was not tuned: one rate)."""
    if not tuning:
        return None
    rows = pd.concat(tuning, ignore_index=True)
    chosen = rows[(rows.model == name) & rows.chosen.astype(bool)]
    return float(chosen["learning_rate"].iloc[0]) if len(chosen) else None


def run(config: Config, rundir: RunDir) -> None:
    """Every (model, task); each lands on disk when done and is skipped on resume."""
    results = rundir.results
    zoo = [rundir.read_table("zoo")] if (results / "zoo.csv").exists() else []
    tuning = [rundir.read_table("zoo_tuning")] if (results / "zoo_tuning.csv").exists() else []
    for name in config.models:  # model by model, so that a cut-short run has every task of its first models
        for task in config.tasks:
            part = f"{task}/{name}"
            if rundir.done(part):
                rundir.log(f"[{part}] already finished, kept its rows")
                continue
            rate = chosen_rate(tuning, name) if task != config.tasks[0] else None
            t, rows = zoo_one(name, task, config, rundir, rundir.log, rate)
            zoo.append(pd.DataFrame(rows))
            if t:
                tuning.append(pd.DataFrame(t))
            rundir.write_table("zoo", pd.concat(zoo, ignore_index=True))
            if tuning:
                rundir.write_table("zoo_tuning", pd.concat(tuning, ignore_index=True))
            rundir.mark_done(part)
    rundir.write_table("zoo_summary", summary(rundir.read_table("zoo")))
    figures(rundir.path)
    rundir.mark_complete(vocab=VOCAB)


# -- figure ---------------------------------------------------------------------------------------------


def figures(out: Path) -> None:
    """Writes figures/memory_zoo from ``out/results`` (no training)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure(out / "results")
        save_figure(fig, out / "figures" / "memory_zoo")
        plt.close(fig)


def figure(results: Path):
    """Accuracy per model, one panel per task, mean ± s.e.m.; forgetting-MQAR split into keys written once
    and rewritten keys; each model labelled with its state size (KV cache for attention)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    zoo = pd.read_csv(results / "zoo.csv")
    stats = summary(zoo)
    task_names = list(dict.fromkeys(stats["task"]))
    fig, axes = plt.subplots(
        1, len(task_names), figsize=(plot.DOUBLE_COLUMN, 2.6), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], task_names):
        part = stats[stats.task == task].reset_index(drop=True)
        x = np.arange(len(part))
        if task == "mqar":
            bars = [("acc", "all queries")]
        else:
            bars = [("acc_once", "keys written once"), ("acc_rewritten", "rewritten keys (latest value)")]
        width = 0.8 / len(bars)
        for j, (col, label) in enumerate(bars):
            ax.bar(x + (j - (len(bars) - 1) / 2) * width, part[f"{col}_mean"], width,
                   yerr=part[f"{col}_sem"].fillna(0), color=f"C{j}", label=label, capsize=1.5)  # fmt: skip
        labels = [f"{m.replace('_', ' ')}\n{s:,}" + ("*" if m in ATTENTION else "")
                  for m, s in zip(part["model"], part["state_size"])]  # fmt: skip
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=4.5)
        ax.set_ylim(0, 1.02)
        ax.set_title(task.replace("_", "-").replace("mqar", "MQAR"), fontsize=7)
        ax.legend(fontsize=5, frameon=False, loc="upper left")
    axes[0][0].set_ylabel("accuracy (mean ± s.e.m.)")
    fig.text(0.01, 0.01, "under each name: state size in floats (* key-value cache, grows with length)",
             fontsize=5)  # fmt: skip
    return fig
