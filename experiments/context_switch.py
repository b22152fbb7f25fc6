"""In-context continual learning: the key -> value assignment switches inside one sequence, and the model is
asked afterwards for the values of BOTH regimes. Issue 12, item 6(c).

memory_recall's two-languages probe switches the task between training phases, which forces total
forgetting for every model by construction. Here the switch happens *within* a sequence, at test time,
so a memory that keeps the first regime somewhere (a slow level, a cache) can answer and one that
overwrites cannot.

Command:  nestlearn run context_switch [--set models=transformer,hope --set steps=N ...] [--quick]
          [--resume]   (--quick: HOPE, HOPE without CMS and the Transformer, two seeds, width
          16, 40 steps)
Runtime:  6.4 minutes of CPU time (39 minutes of wall time on 2 cores shared at load 12-19); --quick
          2 minutes of CPU time (7 minutes of wall time there), mostly compilation.
Produces: results/context_switch.csv (per model and seed: parameters, accuracy on the old and on the new
          regime's values, diverged step), results/context_switch_curves.csv (the same accuracies after
          every chunk of training), figures/context_switch (pdf and png), status.json.
Resume:   by model: `nestlearn run context_switch --resume --out DIR` skips the models already finished.

The task (:func:`context_switch`). Vocabulary: two markers R1 = 1 and R2 = 2, ``keys`` key tokens and
``values`` value tokens (token 0 is never used). A sequence is

    R1 (k v) x (keys * repeats)   R2 (k v') x (keys * repeats)   (R_r k) x (2 * keys)

Regime 1 writes every key ``repeats`` times (a fresh random order each pass) with its value v(k); regime 2
writes the same keys with new values v'(k) != v(k) for every key (so the second regime overwrites the
whole first one); then every (regime, key) pair is queried once, in random order, as the marker of the
regime asked about followed by the key. The scored prediction is the one made at the key: v(k) after R1,
v'(k) after R2. Accuracy is split into the OLD regime (queries after R1) and the NEW one (after R2).

What an ideal memory and an overwriting one score. A memory that keeps one slot per (regime, key) (a
softmax cache, or a memory whose keys carry the regime, e.g. through a slow level that holds regime 1)
scores 1 on both. A memory that holds only the latest value of each key answers v'(k) to an R1 query,
which is wrong by construction: 0 on the old regime, 1 on the new. Guessing scores 1 / values; guessing
among the values not seen last in the key's slot scores 1 / (values - 1).

Setup (default): 3 keys, 6 values, 2 repeats (sequences of 38 tokens), batch 16, 2-layer models at width
24 with 2 heads, memories with chunks of 16, AdamW (lr 3e-3, optax's weight decay) on the query
cross-entropy, 300 steps, seeds 0, 1 and 2; accuracies on 16 fresh batches after every 100 steps.
Models (``MODELS``, the one table to change; ``models`` picks from it): ``hope``, HOPE with the paper's
in-context CMS (``nn.hope(cms="context")``: block l learns from the tokens every C(l) tokens, inside the
sequence), periods (2, 8, 32) (choice: the paper's 512-32K tokens are for 4K+ sequences; these let every
level change inside a 38-token sequence, the slowest once); its parameter-matched control with every
level at the fastest period, ``hope_ctx_2_2_2``; HOPE with the CMS off, ``hope_cms_off`` (self-modifying
Titans + MLP channel); Titans; DeltaNet; a softmax Transformer. Not run by default: the optimizer-level
CMS (blocks step every C(l) outer steps, constant inside a sequence; ``nestlearn.nn.cms_optimizer`` with
``io_period=1``), ``hope_opt_1_4_16`` and its control ``hope_opt_1_1_1``.

Differences from the paper: the paper's continual and long-context claims are measured on language
modelling and needle-in-a-haystack benchmarks at 760M-1.3B parameters and 4K-32K-token sequences, with
in-context CMS chunks of 512 to 32K tokens; here the models have 10^4-10^5 parameters, sequences are 38
tokens and training is a few hundred steps, so only the mechanism is probed, not the scale.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx
from jaxtyping import PRNGKeyArray

from nestlearn import ConfigError, nn, tasks
from nestlearn.experiment import RunDir, save_figure

R1, R2 = 1, 2  # regime markers; keys start at KEY0, values follow the keys
KEY0 = 3
CHUNK = 16  # memory chunk (tokens)


class Variant(NamedTuple):
    """One model of the comparison: ``build(vocab=, d_model=, rngs=)`` and the CMS periods of its optimizer
    (``None``: plain AdamW)."""

    build: Callable
    periods: tuple[int, ...] | None = None


# The one table of models. A new model option (an in-context CMS, DGD as inner optimizer) is one line here.
MODELS: dict[str, Variant] = {
    # in-context CMS (the paper's): block l learns from the tokens every C(l) tokens, inside the sequence
    "hope": Variant(functools.partial(nn.hope, chunk=CHUNK, cms="context", cms_periods=(2, 8, 32))),
    "hope_ctx_2_2_2": Variant(functools.partial(nn.hope, chunk=CHUNK, cms="context", cms_periods=(2, 2, 2))),
    "hope_cms_off": Variant(functools.partial(nn.hope, chunk=CHUNK, cms=None)),
    # optimizer-level CMS: block l steps every C(l) outer steps, constant inside a sequence
    "hope_opt_1_4_16": Variant(functools.partial(nn.hope, chunk=CHUNK, cms="optimizer"), (1, 4, 16)),
    "hope_opt_1_1_1": Variant(functools.partial(nn.hope, chunk=CHUNK, cms="optimizer"), (1, 1, 1)),
    "titans": Variant(functools.partial(nn.titans, chunk=CHUNK)),
    "deltanet": Variant(functools.partial(nn.deltanet, chunk=CHUNK)),
    "transformer": Variant(functools.partial(nn.transformer, heads=2)),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the task and of the training; ``models`` are names in ``MODELS``."""

    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = ("hope", "hope_ctx_2_2_2", "hope_cms_off", "titans", "deltanet", "transformer")
    keys: int = 3
    values: int = 6
    repeats: int = 2
    width: int = 24
    batch: int = 16
    steps: int = 300
    chunk: int = 100
    eval_batches: int = 16
    lr: float = 3e-3

    @property
    def vocab(self) -> int:
        return KEY0 + self.keys + self.values

    @property
    def length(self) -> int:
        return 2 * (1 + 2 * self.keys * self.repeats) + 4 * self.keys

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models {list(self.models)}: unknown {unknown}; known: {', '.join(MODELS)}")
        for name in ("keys", "repeats", "width", "batch", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.values < 2:
            raise ConfigError(
                f"values must be >= 2 (the new value of a key differs from the old), got {self.values}"
            )
        if self.steps <= 0 or self.chunk <= 0 or self.steps % self.chunk:
            raise ConfigError(f"steps ({self.steps}) must be a positive multiple of chunk ({self.chunk})")
        if self.width % 2:
            raise ConfigError(f"width must be even (2 heads), got {self.width}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


CONFIG = Config()
QUICK = [
    "models=hope,hope_cms_off,transformer",
    "seeds=0,1",
    "width=16",
    "steps=40",
    "chunk=20",
    "eval_batches=2",
]


def context_switch(
    key: PRNGKeyArray, *, batch: int, keys: int, values: int, repeats: int
) -> tasks.RecallBatch:
    """A batch of the in-context switch task (layout in the module docstring).

    Args:
      key: the batch's random key.
      batch: sequences (keyword-only, like every size).
      keys: distinct keys, written in both regimes.
      values: distinct values (>= 2); v'(k) is drawn uniformly among the ``values - 1`` others than v(k).
      repeats: passes over the keys in each regime, each in a fresh random order.

    Returns:
      A :class:`nestlearn.tasks.RecallBatch` with ``tokens [batch, 2 (1 + 2 keys repeats) + 4 keys]``,
      ``positions``, ``labels`` and ``kind`` ``[batch, 2 keys]``; ``kind`` is 0 for a query of the old
      regime (R1) and 1 for the new one (R2).

    Example:
      >>> b = context_switch(jax.random.key(0), batch=2, keys=4, values=8, repeats=2)
      >>> b.tokens.shape, b.labels.shape
      ((2, 50), (2, 8))
    """
    for name, value, low in (
        ("batch", batch, 1),
        ("keys", keys, 1),
        ("values", values, 2),
        ("repeats", repeats, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    k_old, k_new, k_order, k_query = jax.random.split(key, 4)
    val0 = KEY0 + keys
    old = jax.random.randint(k_old, (batch, keys), 0, values)
    new = (old + jax.random.randint(k_new, (batch, keys), 1, values)) % values  # != old, uniform otherwise
    vals = jnp.stack([old, new], 1)  # [B, regime, key]
    order = jnp.argsort(jax.random.uniform(k_order, (batch, 2, repeats, keys)), axis=-1)  # a pass = a perm
    written = jnp.take_along_axis(jnp.broadcast_to(vals[:, :, None, :], order.shape), order, axis=-1)
    pairs = jnp.stack([KEY0 + order, val0 + written], -1).reshape(batch, 2, 2 * keys * repeats)
    markers = jnp.broadcast_to(jnp.array([R1, R2], jnp.int32)[None, :, None], (batch, 2, 1))
    blocks = jnp.concatenate([markers, pairs.astype(jnp.int32)], -1).reshape(batch, -1)
    slot = jnp.argsort(jax.random.uniform(k_query, (batch, 2 * keys)), axis=-1)  # (regime, key) pairs
    regime, qkey = slot // keys, slot % keys
    queries = jnp.stack([R1 + regime, KEY0 + qkey], -1).reshape(batch, -1)
    tokens = jnp.concatenate([blocks, queries.astype(jnp.int32)], 1)
    positions = blocks.shape[1] + 1 + 2 * jnp.arange(2 * keys, dtype=jnp.int32)
    labels = val0 + vals[jnp.arange(batch)[:, None], regime, qkey]
    return tasks.RecallBatch(
        tokens=tokens,
        positions=jnp.broadcast_to(positions, (batch, 2 * keys)),
        labels=labels.astype(jnp.int32),
        kind=regime.astype(jnp.int32),
    )


def split_accuracy(model, sample: Callable, key: PRNGKeyArray, batches: int):
    """Accuracy on the old regime's queries (kind 0) and on the new one's (kind 1), over ``batches`` batches
    ``sample(fold_in(key, i))``; pure and jittable."""

    def one(i):
        batch = sample(jax.random.fold_in(key, i))
        hit = (jnp.argmax(model.logits_at(batch.tokens, batch.positions), -1) == batch.labels).astype(
            jnp.float32
        )
        new = batch.kind.astype(jnp.float32)
        return jnp.sum(hit * (1 - new)), jnp.sum(1 - new), jnp.sum(hit * new), jnp.sum(new)

    hit_old, n_old, hit_new, n_new = (jnp.sum(s) for s in jax.lax.map(one, jnp.arange(batches)))
    return hit_old / n_old, hit_new / n_new


def n_params(model_fn: Callable) -> int:
    """The number of trainable floats (``nnx.Param`` leaves) of ``model_fn(rngs)``, without allocating."""
    abstract = jax.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def optimizer(config: Config, periods) -> optax.GradientTransformation:
    """AdamW at ``config.lr``; with CMS ``periods``, the CMS rule (block l every periods[l] steps) over it."""
    inner = optax.adamw(config.lr)
    return inner if periods is None else nn.cms_optimizer(inner, periods, io_period=1)


def train_model(name: str, config: Config, log=print) -> tuple[list[dict], list[dict]]:
    """Trains one model for every seed (one program) and measures both regimes after every chunk.

    Returns:
      ``(rows, curve_rows)``: one row per seed with the final accuracies, and one per seed and chunk.
    """
    variant = MODELS[name]
    model_fn = lambda rngs: variant.build(vocab=config.vocab, d_model=config.width, rngs=rngs)  # noqa: E731
    sample = functools.partial(
        context_switch, batch=config.batch, keys=config.keys, values=config.values, repeats=config.repeats
    )
    trainer = nn.SeqTrainer(
        model_fn, optimizer(config, variant.periods), sample, steps=config.steps, chunk=config.chunk,
        eval_batches=config.eval_batches,
    )  # fmt: skip
    seeds = list(config.seeds)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 7) for s in seeds])
    measure = jax.jit(jax.vmap(lambda p, k: split_accuracy(trainer.apply(p), sample, k, config.eval_batches)))
    start = time.perf_counter()
    state = trainer.init(seeds)
    curve = [np.stack([np.asarray(a) for a in measure(state.params, keys)], -1)]
    for _ in range(config.steps // config.chunk):
        state, _ = trainer.run_chunk(state, seeds)
        curve.append(np.stack([np.asarray(a) for a in measure(state.params, keys)], -1))
    curve = np.stack(curve, 1)  # [S, points, (old, new)]
    diverged = np.asarray(state.diverged_step)
    curve[diverged >= 0] = np.nan
    params = n_params(model_fn)
    rows = [
        {"model": name, "seed": seed, "params": params, "width": config.width, "acc_old": curve[s, -1, 0],
         "acc_new": curve[s, -1, 1], "diverged_step": int(diverged[s])}
        for s, seed in enumerate(seeds)
    ]  # fmt: skip
    curve_rows = [
        {"model": name, "seed": seed, "step": p * config.chunk, "acc_old": curve[s, p, 0],
         "acc_new": curve[s, p, 1]}
        for s, seed in enumerate(seeds) for p in range(curve.shape[1])
    ]  # fmt: skip
    log(f"[context switch] {name:>15} ({params} params): old regime {describe(curve[:, -1, 0])}, new regime "
        f"{describe(curve[:, -1, 1])}  ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return rows, curve_rows


def describe(values) -> str:
    """``mean ± s.e.m.`` over the finite values (a diverged run is NaN and is left out, and said so)."""
    v = np.asarray(values, float)
    ok = v[np.isfinite(v)]
    if not len(ok):
        return "all runs diverged"
    sem = ok.std(ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else 0.0
    left = len(v) - len(ok)
    return f"{ok.mean():.3f} ± {sem:.3f}" + (f" ({left} diverged, left out)" if left else "")


def run(config: Config, rundir: RunDir) -> None:
    """Trains every model of ``config.models``; a finished model (its rows on disk) is skipped on resume."""
    for name in config.models:
        if rundir.done(f"model_{name}"):
            rundir.log(f"[context switch] {name} already finished, kept its rows")
            continue
        rows, curve_rows = train_model(name, config, rundir.log)
        rundir.write_table(f"parts/{name}", pd.DataFrame(rows))
        rundir.write_table(f"parts/{name}_curves", pd.DataFrame(curve_rows))
        rundir.mark_done(f"model_{name}")
    summary = pd.concat([rundir.read_table(f"parts/{n}") for n in config.models], ignore_index=True)
    curves = pd.concat([rundir.read_table(f"parts/{n}_curves") for n in config.models], ignore_index=True)
    rundir.write_table("context_switch", summary)
    rundir.write_table("context_switch_curves", curves)
    figures(rundir.path, config.values)
    rundir.mark_complete(values=config.values, length=config.length)


def figures(out: Path, values: int | None = None) -> None:
    """Writes figures/context_switch from ``out/results`` (no training)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure(out / "results", values)
        save_figure(fig, out / "figures" / "context_switch")
        plt.close(fig)


def figure(results: Path, values: int | None = None):
    """Left: accuracy on the old and the new regime per model (mean ± s.e.m. over seeds), chance dotted.
    Right: the old regime's accuracy over training."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    summary = pd.read_csv(results / "context_switch.csv")
    curves = pd.read_csv(results / "context_switch_curves.csv")
    fig, (left, right) = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.4))
    g = summary.groupby("model", sort=False)
    names = list(g.groups)
    for j, (col, label) in enumerate((("acc_old", "old regime (R1)"), ("acc_new", "new regime (R2)"))):
        mean, sem = g[col].mean(), g[col].sem().fillna(0)
        left.bar(np.arange(len(names)) + (j - 0.5) * 0.38, mean[names], 0.38, yerr=sem[names], label=label,
                 color=f"C{j}", capsize=2)  # fmt: skip
    if values:
        left.axhline(1 / values, color="0.3", ls=":", lw=0.6, label="chance")
    left.set_xticks(
        range(len(names)), [n.replace("_", " ") for n in names], fontsize=5, rotation=35, ha="right"
    )
    left.set_ylabel("query accuracy")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=5, frameon=False, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    for i, (name, c) in enumerate(curves.groupby("model", sort=False)):
        stats = c.groupby("step")["acc_old"].agg(["mean", "sem"]).reset_index()
        sem = stats["sem"].fillna(0)
        right.plot(stats["step"], stats["mean"], color=f"C{i % 10}", lw=0.9, label=name.replace("_", " "))
        right.fill_between(stats["step"], stats["mean"] - sem, stats["mean"] + sem, color=f"C{i % 10}",
                           alpha=0.2, lw=0)  # fmt: skip
    right.set_xlabel("training step")
    right.set_ylabel("old-regime accuracy")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=5, frameon=False)
    return fig
