"""Passkey and multi-key needle retrieval beyond the training length, for every memory model and attention.

Item 6 of issue 12 ("HOPE as the paper describes it"): the Nested Learning paper reports HOPE strong on
needle-in-a-haystack retrieval. Here every model of ``memory_zoo.MODELS`` (the one model table) is trained
at one length and evaluated at 1x, 2x and 4x that length.

Command:  nestlearn run passkey [--set models=deltanet,transformer --set lengths=2,4 --set steps=N ...]
          [--quick] [--resume]   (--quick: 2 models, 1 seed, 2 rates, 40 steps)
Runtime:  the default about 25 minutes on 2 shared CPU cores (mostly compilation: a training program per
          model and task, a forward program per evaluation length); --quick under 2 minutes.
Produces: results/passkey.csv (per task, model, reported seed and evaluation length: accuracy, the rate,
          state size at the training length and at that length, parameters), results/passkey_tuning.csv
          (per task, model and rate: the tuning seed's accuracy at the training length, the chosen rate),
          results/passkey_summary.csv (mean ± s.e.m. over seeds), figures/passkey (pdf and png),
          status.json.
Resume:   `nestlearn run passkey --resume --out DIR` skips every (task, model) already finished.

Setup (choices, and how they differ from RULER and the paper):
  - Tasks: "multikey" is :func:`multikey` below (RULER's multi-key needle, every key queried):
    ``needles`` (4) key-value pairs with distinct keys, one per equal segment of the sequence at a uniform
    offset, then the keys again in random order, each to be answered with its value (4 labels per
    sequence). "passkey" is ``nestlearn.tasks.passkey`` (RULER's single needle): filler tokens 0..31, one
    key from 32..47 followed by its value from 48..63 at a uniform depth, and the key again as the last
    token (1 label per sequence). Vocabulary 64 (RULER: a tokenizer's), training length 32 (the paper:
    thousands of tokens, pretrained models), evaluation at ``lengths`` (1, 2, 4) times it; batch 32
    sequences, 300 steps. The rate is tuned on the first task (multikey, the one with more labels).
  - Models, widths, matched state size, AdamW (weight decay 1e-4) and the per-model rate tuned on
    ``tuning_seed`` (not reported) over ``learning_rates`` on the first task, reused on the others: as
    in ``experiments/memory_zoo.py``. Memory
    models carry a fixed-size state at every length; attention's key-value cache grows with the length
    and its rotary embedding (RoPE) meets relative distances it never saw in training.
  - Reported: accuracy on 8 fresh batches per length, mean ± s.e.m. over ``seeds``; chance is 1/16.

References: Hsieh et al., RULER (arXiv 2404.06654); Mohtashami and Jaggi, Landmark attention (passkey);
Behrouz et al., Nested Learning (arXiv 2512.24695).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import PRNGKeyArray

from nestlearn import ConfigError, nn, tasks
from nestlearn.experiment import RunDir, load_experiment, save_figure

zoo = load_experiment(str(Path(__file__).with_name("memory_zoo.py")))[1]
MODELS = zoo.MODELS
VOCAB = zoo.VOCAB


def multikey(
    key: PRNGKeyArray, batch: int, *, length: int, vocab: int = VOCAB, needles: int = 4
) -> tasks.RecallBatch:
    """Multi-key needle retrieval: ``needles`` key-value pairs in filler, every key asked again at the end.

    With :math:`F = \\lfloor V/2 \\rfloor` and :math:`c = F + \\lfloor (V - F)/2 \\rfloor`, filler tokens are
    uniform on :math:`\\{0..F-1\\}`, keys :math:`K_1..K_n` distinct and uniform on :math:`\\{F..c-1\\}`,
    values :math:`u_1..u_n` uniform on :math:`\\{c..V-1\\}` (they may repeat). The first :math:`L-n`
    positions are cut into :math:`n` segments of :math:`s = \\lfloor (L-n)/n \\rfloor` tokens; needle
    :math:`i` (:math:`K_i u_i`) starts at a uniform offset :math:`o_i \\in \\{0..s-2\\}` of segment
    :math:`i`. The last :math:`n` tokens are the keys again in a uniform random order :math:`\\pi`;
    position :math:`L-n+j` (reading :math:`K_{\\pi(j)}`) is scored with label :math:`u_{\\pi(j)}`, so every
    needle is retrieved once across the filler (RULER's multi-key needle with all keys queried, which
    gives ``needles`` labels per sequence instead of one). With ``needles=1`` it is a passkey.

    Args:
      key: a PRNG key.
      batch: sequences (static).
      length: tokens per sequence, at least ``3 * needles`` (static).
      vocab: vocabulary size; the key range must hold ``needles`` distinct keys (static).
      needles: key-value pairs per sequence (static).

    Returns:
      A :class:`nestlearn.tasks.RecallBatch`: ``tokens [batch, length]``, ``positions``, ``labels`` and
      ``kind`` (0) of shape ``[batch, needles]``.

    Example:
      >>> b = multikey(jax.random.key(0), 2, length=16, vocab=64, needles=2)
      >>> b.tokens.shape, [int(p) for p in b.positions[0]]
      ((2, 16), [14, 15])
    """
    for name, value, low in (("batch", batch, 1), ("needles", needles, 1), ("vocab", vocab, 4)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 3 * needles:
        raise ConfigError(f"length must be an int >= 3 * needles = {3 * needles}, got {length!r}")
    f = vocab // 2
    cut = f + (vocab - f) // 2
    if cut - f < needles:
        raise ConfigError(f"vocab={vocab} has {cut - f} key tokens, fewer than needles={needles}")
    return _multikey(key, batch=batch, length=length, vocab=vocab, needles=needles)


@functools.partial(jax.jit, static_argnames=("batch", "length", "vocab", "needles"))
def _multikey(key, *, batch, length, vocab, needles) -> tasks.RecallBatch:
    f = vocab // 2
    cut = f + (vocab - f) // 2
    seg = (length - needles) // needles
    k_fill, k_keys, k_vals, k_off, k_pick = jax.random.split(key, 5)
    tokens = jax.random.randint(k_fill, (batch, length), 0, f, dtype=jnp.int32)
    # distinct keys: the first `needles` of a random permutation of the key range, per row
    order = jnp.argsort(jax.random.uniform(k_keys, (batch, cut - f)), axis=1)
    keys = (f + order[:, :needles]).astype(jnp.int32)
    values = jax.random.randint(k_vals, (batch, needles), cut, vocab, dtype=jnp.int32)
    starts = (jnp.arange(needles, dtype=jnp.int32) * seg)[None, :] + jax.random.randint(
        k_off, (batch, needles), 0, seg - 1, dtype=jnp.int32
    )
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    tokens = tokens.at[rows, starts].set(keys).at[rows, starts + 1].set(values)
    asked = jnp.argsort(jax.random.uniform(k_pick, (batch, needles)), axis=1).astype(jnp.int32)
    tokens = tokens.at[:, length - needles :].set(jnp.take_along_axis(keys, asked, 1))
    positions = jnp.broadcast_to(jnp.arange(length - needles, length, dtype=jnp.int32), (batch, needles))
    labels = jnp.take_along_axis(values, asked, 1)
    return tasks.RecallBatch(tokens, positions, labels, jnp.zeros_like(positions))


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes. ``lengths`` are multiples of ``train_length`` to evaluate at; ``tasks``: "passkey", "multikey"."""

    models: tuple[str, ...] = zoo.DEFAULT_MODELS
    tasks: tuple[str, ...] = ("multikey", "passkey")
    seeds: tuple[int, ...] = (0, 1, 2)
    tuning_seed: int = 100
    learning_rates: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    steps: int = 300
    chunk: int = 100
    train_length: int = 32
    lengths: tuple[int, ...] = (1, 2, 4)
    needles: int = 4  # multikey
    batch: int = 32
    eval_batches: int = 8
    n_layers: int = zoo.N_LAYERS

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models {unknown or '()'} unknown; choose from {', '.join(MODELS)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks {bad or '()'} unknown; choose from {', '.join(TASKS)}")
        if not self.seeds or not self.learning_rates or not self.lengths:
            raise ConfigError("seeds, learning_rates and lengths must each name at least one")
        if self.tuning_seed in self.seeds:
            raise ConfigError(f"tuning_seed ({self.tuning_seed}) must not be one of the seeds {self.seeds}")
        if any(not lr > 0 for lr in self.learning_rates):
            raise ConfigError(f"learning_rates must be positive, got {self.learning_rates}")
        if any(m < 1 for m in self.lengths):
            raise ConfigError(f"lengths are multiples of train_length and must be >= 1, got {self.lengths}")
        if self.steps <= 0 or self.chunk <= 0 or self.steps % self.chunk:
            raise ConfigError(f"steps ({self.steps}) must be a positive multiple of chunk ({self.chunk})")
        if self.train_length % zoo.CHUNK:
            raise ConfigError(f"train_length ({self.train_length}) must be a multiple of {zoo.CHUNK}")
        for name in ("batch", "eval_batches", "n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for task in self.tasks:
            TASKS[task](self, self.train_length, jax.random.key(0))


TASKS: dict[str, Callable] = {
    "passkey": lambda c, length, key: tasks.passkey(key, c.batch, length=length, vocab=VOCAB),
    "multikey": lambda c, length, key: multikey(key, c.batch, length=length, vocab=VOCAB, needles=c.needles),
}

CONFIG = Config()
QUICK = ["models=deltanet,transformer", "seeds=0", "learning_rates=0.003,0.01", "steps=40", "chunk=20",
         "eval_batches=2", "batch=8", "lengths=1,2"]  # fmt: skip


def passkey_one(
    name: str, task: str, config: Config, rundir: RunDir | None = None, log=print, rate: float | None = None
):
    """One model on one task, trained at ``train_length`` (at ``rate``, or tuned when ``None``) and evaluated
    at every length. Returns (tuning rows, rows)."""
    spec = MODELS[name]
    sample = functools.partial(TASKS[task], config, config.train_length)
    trainer = nn.SeqTrainer(
        lambda rngs: spec.model(VOCAB, rngs, config.n_layers), spec.optimizer(), sample, steps=config.steps,
        chunk=config.chunk, eval_batches=config.eval_batches,
    )  # fmt: skip
    tuning, res, lr = zoo.tuned_runs(trainer, config, tag=f"{task}/{name}", rundir=rundir, log=log, rate=rate)
    keys = zoo.eval_keys(config.seeds)
    sizes = zoo.describe(name, config.train_length, n_layers=config.n_layers)
    model = spec.model(VOCAB, nnx_rngs(), config.n_layers)
    rows = []
    for factor in config.lengths:
        length = factor * config.train_length
        at = functools.partial(TASKS[task], config, length)
        evaluate = jax.jit(
            jax.vmap(lambda p, k, s=at: zoo.split_accuracy(trainer, p, s, k, config.eval_batches))
        )
        acc = np.asarray(evaluate(res["state"].params, keys)["acc"])
        for i, seed in enumerate(config.seeds):
            rows.append({"task": task, "model": name, "seed": seed, "learning_rate": lr,
                         "train_length": config.train_length, "factor": factor, "eval_length": length,
                         "acc": float("nan") if res["diverged"][i] else float(acc[i]),
                         "diverged_step": int(res["diverged_step"][i]), **sizes,
                         "state_size_at_length": nn.state_size(model, length)})  # fmt: skip
        log(
            f"[{task}] {name:>22}  lr {lr:g}  length {length:>4}: acc {zoo.describe_values(acc[~res['diverged']])}"
        )
    return [{"task": task, "model": name, **row} for row in tuning], rows


def nnx_rngs():
    from flax import nnx

    return nnx.Rngs(0)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, s.e.m. and number of finite runs per task, model and evaluation length."""
    out = []
    for (task, model, length), g in table.groupby(["task", "model", "eval_length"], sort=False):
        v = g["acc"].to_numpy(float)
        ok = v[np.isfinite(v)]
        out.append({"task": task, "model": model, "eval_length": int(length), "factor": int(g["factor"].iloc[0]),
                    "learning_rate": g["learning_rate"].iloc[0], "state_size": int(g["state_size"].iloc[0]),
                    "state_size_at_length": int(g["state_size_at_length"].iloc[0]),
                    "acc_mean": ok.mean() if len(ok) else np.nan,
                    "acc_sem": ok.std(ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else 0.0,
                    "n": len(ok)})  # fmt: skip
    return pd.DataFrame(out)


def run(config: Config, rundir: RunDir) -> None:
    """Every (model, task); each lands on disk when done and is skipped on resume."""
    results = rundir.results
    table = [rundir.read_table("passkey")] if (results / "passkey.csv").exists() else []
    tuning = [rundir.read_table("passkey_tuning")] if (results / "passkey_tuning.csv").exists() else []
    for name in config.models:  # model by model, so that a cut-short run has every task of its first models
        for task in config.tasks:
            part = f"{task}/{name}"
            if rundir.done(part):
                rundir.log(f"[{part}] already finished, kept its rows")
                continue
            rate = zoo.chosen_rate(tuning, name) if task != config.tasks[0] else None
            t, rows = passkey_one(name, task, config, rundir, rundir.log, rate)
            table.append(pd.DataFrame(rows))
            if t:
                tuning.append(pd.DataFrame(t))
            rundir.write_table("passkey", pd.concat(table, ignore_index=True))
            if tuning:
                rundir.write_table("passkey_tuning", pd.concat(tuning, ignore_index=True))
            rundir.mark_done(part)
    rundir.write_table("passkey_summary", summary(rundir.read_table("passkey")))
    figures(rundir.path)
    rundir.mark_complete(vocab=VOCAB)


def figures(out: Path) -> None:
    """Writes figures/passkey from ``out/results`` (no training)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure(out / "results")
        save_figure(fig, out / "figures" / "passkey")
        plt.close(fig)


def figure(results: Path):
    """Accuracy against evaluation length per model (mean ± s.e.m.), one panel per task; the training
    length dashed, chance dotted; attention models drawn dashed."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    stats = summary(pd.read_csv(results / "passkey.csv"))
    names = list(dict.fromkeys(stats["task"]))
    fig, axes = plt.subplots(1, len(names), figsize=(plot.DOUBLE_COLUMN, 2.4), squeeze=False, sharey=True)
    models = list(dict.fromkeys(stats["model"]))
    for ax, task in zip(axes[0], names):
        part = stats[stats.task == task]
        for i, model in enumerate(models):
            g = part[part.model == model].sort_values("eval_length")
            if g.empty:
                continue
            ax.errorbar(g["eval_length"], g["acc_mean"], yerr=g["acc_sem"], marker="o", ms=2.5, lw=0.8,
                        capsize=1.5, color=plt.cm.tab10(i % 10), ls="--" if model in zoo.ATTENTION else "-",
                        label=model.replace("_", " "))  # fmt: skip
        train = int(part["eval_length"].min())
        ax.axvline(train, color="0.6", ls="--", lw=0.5)
        ax.axhline(1 / 16, color="0.3", ls=":", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_title({"passkey": "passkey (one needle)", "multikey": "multi-key needle"}.get(task, task),
                     fontsize=7)  # fmt: skip
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=4.5, frameon=False, loc="lower left")
    return fig
