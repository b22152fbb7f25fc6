"""A small character-level language model on Python's own documentation: HOPE against a Transformer and
Titans at matched parameter counts. Issue 12, item 6(d).

Command:  nestlearn run char_lm [--set models=hope,transformer --set steps=N --set context=128 ...]
          [--quick] [--resume]   (--quick: context 64, a few dozen steps)
Runtime:  5.8 minutes of CPU time (38 minutes of wall time on 2 cores shared at load 12-19); --quick
          2.3 minutes of CPU time (7.5 minutes of wall time there), mostly compilation.
Produces: results/char_lm.csv (per model and seed: width, parameters, validation bits per character and
          perplexity per character, diverged step), results/char_lm_positions.csv (validation bits per
          character per bucket of context positions), results/char_lm_curves.csv (training bits per
          character per chunk), results/params.csv (per model: width and parameters), figures/char_lm
          (pdf and png), status.json.
Resume:   by model: `nestlearn run char_lm --resume --out DIR` skips the models already finished, and a
          model's training resumes at its last chunk (checkpoints/<model>/).

Corpus (:func:`corpus`): ``pydoc_data.topics``, which ships with CPython (the text of ``help()``'s topics,
about 465,000 characters): the topics joined in sorted key order, each character its code point when
below 128 and 26 (ASCII "substitute") otherwise (575 characters, mostly typographic quotes and dashes), so
the vocabulary is 128 whatever the Python version. Choice: the first 90 % trains and the last 10 %
validates, a contiguous split, because random windows from one text overlap their neighbours; the
validation topics (the alphabetically last ones) are text the model never saw.

Setup (default): context 256 characters, batch 8 random windows of the training text per step, 300
steps of AdamW (lr 3e-3, optax's weight decay) on the mean next-character cross-entropy at every
position, seeds 0, 1 and 2 (one program per model, seeds vmapped). Models (``MODELS``, the one table to
change), 2 layers each: HOPE at width 24 (self-modifying Titans + the paper's in-context CMS, block l
learning from the tokens every C(l) = 16, 64, 256 tokens, ``nn.hope``'s default; ``hope_opt_1_4_16`` is
the optimizer-level CMS instead, blocks stepping every 1, 4, 16 outer steps), and a Transformer (2 heads,
RoPE) and Titans at the widths whose parameter counts come closest to HOPE's (``matched_width``; the counts are in
results/params.csv and the log). Memories use chunks of 16 tokens. Evaluated on the first 128
non-overlapping 257-character windows of the validation text (or all of them if fewer): bits per
character = cross-entropy / ln 2, per position and in buckets of 32 positions (does a model use its
context better further in?). Then at twice the training context, 512 characters (``long_context``): a
model that streams (``SequenceModel.init_state``/``apply``: HOPE, Titans) reads each window in pieces of
256 with its state carried; the Transformer (no key-value cache kept) reads the whole window, past the
length it was trained on.

Differences from the paper: the paper's language-modelling results are at 340M-1.3B parameters on 15-100B
tokens of web text, at 4K-token contexts, with in-context CMS chunks of 512-32K tokens; here the models
have about 5 x 10^4 parameters, see about 600,000 characters, and reach bits per character near the
corpus's bigram/trigram statistics, not language understanding. The comparison is of what each
architecture learns at equal parameters and equal steps, not at equal compute (HOPE costs several times
more per step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
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

from nestlearn import ConfigError, nn, tasks
from nestlearn.experiment import RunDir, save_figure

VOCAB = 128  # ASCII; every other character becomes SUBSTITUTE
SUBSTITUTE = 26
CHUNK = 16  # memory chunk (tokens)
EVAL_BATCH = 8  # validation windows per forward pass


class Variant(NamedTuple):
    """One model: ``build(vocab=, d_model=, rngs=)`` and the CMS periods of its optimizer (``None``: plain
    AdamW)."""

    build: Callable
    periods: tuple[int, ...] | None = None


# The one table of models. A new model option (in-context CMS, DGD as inner optimizer) is one line here.
MODELS: dict[str, Variant] = {
    # in-context CMS (the paper's), periods 16, 64, 256 tokens (nn.hope's default)
    "hope": Variant(functools.partial(nn.hope, chunk=CHUNK, cms="context")),
    # optimizer-level CMS: block l steps every C(l) outer steps, constant inside a sequence
    "hope_opt_1_4_16": Variant(functools.partial(nn.hope, chunk=CHUNK, cms="optimizer"), (1, 4, 16)),
    "titans": Variant(functools.partial(nn.titans, chunk=CHUNK)),
    "transformer": Variant(functools.partial(nn.transformer, heads=2)),
    "hope_cms_off": Variant(functools.partial(nn.hope, chunk=CHUNK, cms=None)),
    "deltanet": Variant(functools.partial(nn.deltanet, chunk=CHUNK)),  # cheap, for tests and the notebook
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the comparison; ``models`` are names in ``MODELS``, ``reference`` one of them."""

    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = ("hope", "titans", "transformer")
    reference: str = "hope"  # built at ``width``; every other model at the width matching its parameters
    width: int = 24
    context: int = 256
    batch: int = 8
    steps: int = 300
    chunk: int = 100
    lr: float = 3e-3
    bucket: int = 32  # positions per bucket of the per-position curve
    eval_windows: int = 128
    long_context: int = 512  # evaluated beyond training, the state carried; 0 skips (a multiple of context)

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models {list(self.models)}: unknown {unknown}; known: {', '.join(MODELS)}")
        if self.reference not in self.models:
            raise ConfigError(f"reference {self.reference!r} must be one of models {list(self.models)}")
        for name in ("width", "context", "batch", "bucket", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % 2:
            raise ConfigError(f"width must be even (2 heads), got {self.width}")
        if self.context % self.bucket:
            raise ConfigError(f"context ({self.context}) must be a multiple of bucket ({self.bucket})")
        if self.long_context < 0 or self.long_context % self.context:
            raise ConfigError(
                f"long_context ({self.long_context}) must be 0 or a positive multiple of context ({self.context})"
            )
        if self.steps <= 0 or self.chunk <= 0 or self.steps % self.chunk:
            raise ConfigError(f"steps ({self.steps}) must be a positive multiple of chunk ({self.chunk})")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


CONFIG = Config()
QUICK = ["seeds=0,1", "context=64", "bucket=16", "steps=30", "chunk=15", "eval_windows=16"]


def corpus() -> np.ndarray:
    """``pydoc_data.topics`` as int32 character codes (layout in the module docstring).

    Example:
      >>> text = corpus()
      >>> text.dtype, int(text.max()) < VOCAB
      (dtype('int32'), True)
    """
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    return np.where(codes < VOCAB, codes, SUBSTITUTE).astype(np.int32)


def split(data: np.ndarray, fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The first ``fraction`` of the text (training) and the rest (validation)."""
    cut = int(len(data) * fraction)
    return data[:cut], data[cut:]


def window_sampler(data: np.ndarray, *, batch: int, context: int) -> Callable:
    """``sample(key) -> RecallBatch``: ``batch`` random windows of ``context + 1`` characters of ``data``;
    every position is scored against the next character (``positions = 0..context-1``)."""
    if len(data) < context + 1:
        raise ValueError(f"data has {len(data)} characters, fewer than context + 1 = {context + 1}")
    text = jnp.asarray(data, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))

    def sample(key):
        start = jax.random.randint(key, (batch, 1), 0, text.shape[0] - context)
        window = text[start + jnp.arange(context + 1)[None, :]]
        return tasks.RecallBatch(window[:, :-1], positions, window[:, 1:], jnp.zeros_like(positions))

    return sample


def validation_windows(data: np.ndarray, context: int, count: int) -> np.ndarray:
    """The first ``count`` non-overlapping windows of ``context + 1`` characters (fewer if the text is
    short), cut to a multiple of ``EVAL_BATCH``: ``[n, context + 1]``."""
    n = min(count, len(data) // (context + 1))
    n = max(n - n % EVAL_BATCH, 0)
    if n == 0:
        raise ValueError(
            f"validation text of {len(data)} characters holds no {EVAL_BATCH} windows of {context + 1}"
        )
    return data[: n * (context + 1)].reshape(n, context + 1)


def position_loss(model, windows: jax.Array) -> jax.Array:
    """Mean next-character cross-entropy (nats) at every context position over ``windows [n, T + 1]``
    (``n`` a multiple of ``EVAL_BATCH``): ``[T]``. Pure and jittable."""
    n, width = windows.shape

    def one(w):
        logits = model(w[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).sum(0)

    return jax.lax.map(one, windows.reshape(n // EVAL_BATCH, EVAL_BATCH, width)).sum(0) / n


def streams(model) -> bool:
    """Whether ``model`` can run a stream in pieces with its state carried (``init_state``/``apply``; softmax
    attention keeps no key-value cache, so a Transformer cannot)."""
    if not callable(getattr(model, "init_state", None)):
        return False
    try:
        jax.eval_shape(lambda: model.init_state(1))
    except ValueError:
        return False
    return True


def carried_position_loss(model, windows: jax.Array, piece: int) -> jax.Array:
    """:func:`position_loss` with the window fed in pieces of ``piece`` tokens, each piece starting from the
    state the previous one left (``model.apply(tokens, state)``), so a window longer than the training
    context is read as a stream. ``[T]`` nats; pure and jittable."""
    n, width = windows.shape
    pieces = (width - 1) // piece

    def one(w):
        state, losses = model.init_state(w.shape[0]), []
        for p in range(pieces):
            logits, state = model.apply(w[:, p * piece : (p + 1) * piece], state)
            labels = w[:, p * piece + 1 : (p + 1) * piece + 1]
            losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum(0))
        return jnp.concatenate(losses)

    return jax.lax.map(one, windows.reshape(n // EVAL_BATCH, EVAL_BATCH, width)).sum(0) / n


def n_params(model_fn: Callable) -> int:
    """The number of trainable floats (``nnx.Param`` leaves) of ``model_fn(rngs)``, without allocating."""
    abstract = jax.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def _model_fn(build: Callable, width: int) -> Callable:
    return lambda rngs: build(vocab=VOCAB, d_model=width, rngs=rngs)


def matched_width(build: Callable, target: int, step: int = 4, largest: int = 512) -> int:
    """The width (a multiple of ``step``, from ``2 * step`` up to ``largest``) whose parameter count is closest
    to ``target`` (the smaller width on a tie). Counts grow with the width, so the search stops at the
    first width above the target."""
    best, best_gap = 2 * step, math.inf
    for d in range(2 * step, largest + 1, step):
        gap = n_params(_model_fn(build, d)) - target
        if abs(gap) < best_gap:
            best, best_gap = d, abs(gap)
        if gap >= 0:
            break
    return best


def widths(config: Config) -> dict[str, int]:
    """Every model's width: the reference at ``config.width``, the others matched to its parameter count."""
    target = n_params(_model_fn(MODELS[config.reference].build, config.width))
    return {
        m: config.width if m == config.reference else matched_width(MODELS[m].build, target)
        for m in config.models
    }


def optimizer(config: Config, periods) -> optax.GradientTransformation:
    """AdamW at ``config.lr``; with CMS ``periods``, the CMS rule (block l every periods[l] steps) over it."""
    inner = optax.adamw(config.lr)
    return inner if periods is None else nn.cms_optimizer(inner, periods, io_period=1)


def train_model(name: str, width: int, config: Config, rundir: RunDir | None = None, log=print):
    """Trains one model for every seed and evaluates it per position on the validation windows.

    With ``config.long_context``, the validation windows are also read at that longer length: a model that
    streams (:func:`streams`) in pieces of ``context`` with its state carried (``mode="carried"``), any
    other (softmax attention) on the whole window at once, past the length it was trained on
    (``mode="whole"``; RoPE extrapolates the positions).

    Returns:
      ``(rows, position_rows, curve_rows, long_rows)`` as in the result tables.
    """
    train, valid = split(corpus())
    variant = MODELS[name]
    model_fn = _model_fn(variant.build, width)
    trainer = nn.SeqTrainer(
        model_fn, optimizer(config, variant.periods), window_sampler(train, batch=config.batch, context=config.context),
        steps=config.steps, chunk=config.chunk, eval_batches=1,
    )  # fmt: skip
    start = time.perf_counter()
    if rundir is None:
        res = trainer.run_seeds(list(config.seeds))
    else:
        with rundir.checkpoints(name) as checkpoints:
            res = trainer.run_seeds(list(config.seeds), checkpoints=checkpoints)
    windows = jnp.asarray(validation_windows(valid, config.context, config.eval_windows))
    per_position = jax.jit(jax.vmap(lambda p: position_loss(trainer.apply(p), windows)))
    nats = np.array(per_position(res["state"].params))  # [S, T], a writable copy
    nats[res["diverged"]] = np.nan
    params = n_params(model_fn)
    bits = nats / math.log(2)
    rows, position_rows, curve_rows = [], [], []
    for s, seed in enumerate(config.seeds):
        rows.append({"model": name, "seed": seed, "width": width, "params": params, "val_bpc": bits[s].mean(),
                     "val_ppl": float(np.exp(nats[s].mean())), "windows": len(windows),
                     "diverged_step": int(res["diverged_step"][s])})  # fmt: skip
        for b in range(config.context // config.bucket):
            position_rows.append({"model": name, "seed": seed, "position": b * config.bucket,
                                  "bpc": bits[s, b * config.bucket : (b + 1) * config.bucket].mean()})  # fmt: skip
        for step, loss in zip(res["curve_step"], res["curve_loss"][s]):
            curve_rows.append(
                {"model": name, "seed": seed, "step": int(step), "train_bpc": loss / math.log(2)}
            )
    first, last = bits[:, : config.bucket].mean(1), bits[:, -config.bucket :].mean(1)
    log(f"[char lm] {name:>12} d={width:<3} {params} params: validation bpc {describe(bits.mean(1))} "
        f"(first {config.bucket} positions {describe(first)}, last {describe(last)})  "
        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    long_rows = []
    if config.long_context:
        long_windows = jnp.asarray(validation_windows(valid, config.long_context, config.eval_windows))
        mode = "carried" if streams(model_fn(nnx.Rngs(0))) else "whole"
        if mode == "carried":
            read = lambda m: carried_position_loss(m, long_windows, config.context)  # noqa: E731
        else:
            read = lambda m: position_loss(m, long_windows)  # noqa: E731
        long_bits = np.array(jax.jit(jax.vmap(lambda p: read(trainer.apply(p))))(res["state"].params))
        long_bits = long_bits / math.log(2)
        long_bits[res["diverged"]] = np.nan
        for s, seed in enumerate(config.seeds):
            rows[s].update(long_mode=mode, long_windows=len(long_windows),
                           long_bpc_within=long_bits[s, : config.context].mean(),
                           long_bpc_beyond=long_bits[s, config.context :].mean())  # fmt: skip
            for b in range(config.long_context // config.bucket):
                long_rows.append({"model": name, "seed": seed, "mode": mode, "position": b * config.bucket,
                                  "bpc": long_bits[s, b * config.bucket : (b + 1) * config.bucket].mean()})  # fmt: skip
        log(f"[char lm] {name:>12} at {config.long_context} characters ({mode}): positions < {config.context} "
            f"{describe(long_bits[:, : config.context].mean(1))}, beyond "
            f"{describe(long_bits[:, config.context :].mean(1))}")  # fmt: skip
    return rows, position_rows, curve_rows, long_rows


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
    """Trains every model of ``config.models`` at matched parameters; finished models are kept on resume."""
    matched = widths(config)
    params = pd.DataFrame(
        [
            {"model": m, "width": d, "params": n_params(_model_fn(MODELS[m].build, d))}
            for m, d in matched.items()
        ]
    )
    rundir.write_table("params", params)
    rundir.log(
        "[char lm] parameters: " + ", ".join(f"{r.model} d={r.width} {r.params}" for r in params.itertuples())
    )
    for name in config.models:
        if rundir.done(f"model_{name}"):
            rundir.log(f"[char lm] {name} already finished, kept its rows")
            continue
        tables = train_model(name, matched[name], config, rundir, rundir.log)
        for part, rows in zip(("", "_positions", "_curves", "_long"), tables):
            if rows:
                rundir.write_table(f"parts/{name}{part}", pd.DataFrame(rows))
        rundir.mark_done(f"model_{name}")
    for part in (
        ("", "_positions", "_curves", "_long") if config.long_context else ("", "_positions", "_curves")
    ):
        frames = [rundir.read_table(f"parts/{n}{part}") for n in config.models]
        rundir.write_table(f"char_lm{part}", pd.concat(frames, ignore_index=True))
    figures(rundir.path)
    rundir.mark_complete(vocab=VOCAB, characters=len(corpus()))


def figures(out: Path) -> None:
    """Writes figures/char_lm from ``out/results`` (no training)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        fig = figure(out / "results")
        save_figure(fig, out / "figures" / "char_lm")
        plt.close(fig)


def figure(results: Path):
    """Left: validation bits per character against context position (bucket means, mean ± s.e.m. over
    seeds). Middle (when results/char_lm_long.csv exists): the same over windows longer than the training
    context, the training length dashed. Right: training bits per character over steps."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    summary = pd.read_csv(results / "char_lm.csv")
    positions = pd.read_csv(results / "char_lm_positions.csv")
    curves = pd.read_csv(results / "char_lm_curves.csv")
    params = summary.groupby("model", sort=False)["params"].first()
    color = {name: f"C{i % 10}" for i, name in enumerate(params.index)}  # one color per model in every panel
    long = results / "char_lm_long.csv"
    panels = 3 if long.exists() else 2
    fig, axes = plt.subplots(1, panels, figsize=(plot.DOUBLE_COLUMN, 2.4))
    left, right = axes[0], axes[-1]
    tables = [(left, positions)] + ([(axes[1], pd.read_csv(long))] if panels == 3 else [])
    for ax, table in tables:
        for name, g in table.groupby("model", sort=False):
            stats = g.groupby("position")["bpc"].agg(["mean", "sem"]).reset_index()
            sem = stats["sem"].fillna(0)
            label = f"{name.replace('_', ' ')} ({params[name] / 1000:.0f}k)"
            if "mode" in g:
                label = f"{name.replace('_', ' ')} ({g['mode'].iloc[0]})"
            ax.plot(
                stats["position"], stats["mean"], marker="o", ms=2.5, lw=0.9, color=color[name], label=label
            )
            ax.fill_between(stats["position"], stats["mean"] - sem, stats["mean"] + sem, color=color[name],
                            alpha=0.2, lw=0)  # fmt: skip
        ax.set_xlabel("context position (bucket start)")
        ax.legend(fontsize=5, frameon=False)
    left.set_ylabel("validation bits / character")
    if panels == 3:
        axes[1].axvline(positions["position"].max() + (positions["position"].diff().max() or 0), color="0.5",
                        ls="--", lw=0.6)  # fmt: skip
        axes[1].set_title("past the training length", fontsize=7)
    for name, g in curves.groupby("model", sort=False):
        stats = g.groupby("step")["train_bpc"].agg(["mean", "sem"]).reset_index()
        right.plot(stats["step"], stats["mean"], lw=0.9, color=color[name], label=name.replace("_", " "))
    right.set_xlabel("training step")
    right.set_ylabel("training bits / character")
    return fig
