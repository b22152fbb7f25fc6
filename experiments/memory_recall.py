"""Memory models on synthetic recall: MQAR accuracy against state size, forgetting-MQAR (overwriting against
additive memories), HOPE's CMS switched on and off, and the forgetting of one synthetic language when a
second is learned. Issue 6's measured comparisons.

Command:  nestlearn run memory_recall [--set steps=N --set widths=16,32 --set lengths=64,128 --set pairs=4,8
          ...] [--quick] [--resume]    (--quick: 2 seeds, one width, few steps; what CI and the notebook run)
Runtime:  about 60 minutes on 2 (shared) CPU cores; --quick about 10 minutes (mostly compilation).
Produces: results/mqar.csv (per model, width, setting and seed: state size in floats, eval accuracy,
          diverged step), results/forgetting.csv (per model and seed: accuracy on reassigned and on
          untouched keys), results/languages.csv (per model, seed and evaluation point: accuracy on both
          languages) and results/languages_summary.csv (per model and seed: A after A, A after B, B after
          B, the optimal accuracies), results/hope_languages*.csv (the HOPE variants' part of those),
          results/telemetry.csv (per model and chunk: the mixers' gate means, surprise, update norms,
          divergence), figures/mqar_state_size, figures/forgetting_mqar, figures/two_languages (pdf and
          png), status.json.
Resume:   by part: `nestlearn run memory_recall --resume --out DIR` continues a killed run, skipping the
          parts already finished (forgetting, hope_languages, languages, telemetry, mqar, mqar_attention_lr);
          inside forgetting, mqar and mqar_attention_lr every model's training resumes exactly at its last
          chunk (checkpoints/<part>/...).
Setup:    every model is a 2-layer SequenceModel (embedding, pre-norm blocks of mixer and MLP/CMS channel,
          head), 2 heads, memories with a short convolution and chunks of 16, trained with AdamW (lr 3e-3,
          weight decay 1e-4, optax's default) on the query cross-entropy, 128 query labels per batch
          (batch = 128 / pairs sequences, so every setting costs the same per step), 800 steps, seeds 0
          and 1; evaluated on 16 fresh batches.
          MQAR follows Zoology's generator (REFERENCES.md) at (length, pairs) in {(64, 4), (128, 8),
          (256, 16)}, but with a vocabulary of 64 instead of 8,192 so that a CPU run learns the task in
          minutes (keys 1..31, values 32..63); one model per setting; Transformer, linear attention and
          DeltaNet at widths d_model 16 and 32 on (64, 4), at width 32 on the two longer settings (the
          CPU budget).
          Forgetting-MQAR: length 64, 4 pairs, 2 keys written again with new values, batch 32, width 32;
          linear attention (additive) against DeltaNet (overwriting), the Transformer as reference.
          Two languages: sparse Markov chains over 32 tokens (branching 2), batches of 32 sequences of
          64, trained on language A then B for 300 steps each; next-token accuracy on both after every
          100 steps against each language's Bayes-optimal accuracy. Models: Transformer, DeltaNet,
          HOPE-attention (CMS periods (1, 4, 16)), and HOPE's ablation at width 32: CMS off (self-modifying
          Titans + MLP), CMS with periods (1, 1, 1) (a 3-block MLP chain updated every step) and with
          (1, 4, 16) (nestlearn.nn.cms_optimizer over AdamW).
          Telemetry: DeltaNet, Titans and HOPE, 100 steps of MQAR (64, 4), one seed.
          Attention at its own rate: the Transformer at AdamW 1e-3 for 1,500 steps, width 32, on every
          MQAR setting (results/mqar_attention_lr.csv).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx

from nestlearn import ConfigError, nn, tasks
from nestlearn.experiment import RunDir, save_figure

VOCAB = 64
BATCH = 32
LR = 3e-3
SETTINGS = ((64, 4), (128, 8), (256, 16))
# The HOPE measured here is the one of issue 6 (README's numbers): plain gradient descent with retention in the
# self-modifying mixer, the value as the main memory's target (L2-normalised), and the optimizer-level CMS.
# The paper's HOPE (DGD, self-generated target, in-context CMS) is measured by experiments/memory_zoo.py.
ISSUE6_MIXER = {"inner": "gd", "main_target": "v", "normalize_values": True}
ISSUE6_HOPE = {**ISSUE6_MIXER, "cms": "optimizer"}
HOPE_PERIODS = {"cms_off": None, "cms_1_1_1": (1, 1, 1), "cms_1_4_16": (1, 4, 16)}


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of every part. MQAR runs at the (length, pairs) settings ``zip(lengths, pairs)``."""

    seeds: tuple[int, ...] = (0, 1)
    widths: tuple[int, ...] = (16, 32)
    lengths: tuple[int, ...] = tuple(length for length, _ in SETTINGS)
    pairs: tuple[int, ...] = tuple(p for _, p in SETTINGS)
    steps: int = 800  # training steps of every recall run
    chunk: int = 100
    language_steps: int = 300  # per language
    eval_batches: int = 16
    telemetry_steps: int = 100
    attention_steps: int = 1500  # the Transformer at its own rate (AdamW 1e-3)

    @property
    def settings(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.lengths, self.pairs))

    def validate(self) -> None:
        if len(self.lengths) != len(self.pairs) or not self.lengths:
            raise ConfigError(f"lengths {self.lengths} and pairs {self.pairs} must be non-empty and pair up")
        if not self.seeds or not self.widths:
            raise ConfigError("seeds and widths must each name at least one")
        for name in ("widths", "lengths", "pairs"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("chunk", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "language_steps"):  # trained in chunks of `chunk`
            if getattr(self, name) <= 0 or getattr(self, name) % self.chunk:
                raise ConfigError(
                    f"{name} ({getattr(self, name)}) must be a positive multiple of chunk ({self.chunk})"
                )
        if self.telemetry_steps <= 0 or self.telemetry_steps % 4:
            raise ConfigError(f"telemetry_steps ({self.telemetry_steps}) must be a positive multiple of 4")
        if self.attention_steps <= 0:
            raise ConfigError(f"attention_steps must be positive, got {self.attention_steps}")


CONFIG = Config()
QUICK = ["widths=32", "lengths=64", "pairs=4", "steps=100", "chunk=50", "language_steps=50", "eval_batches=2",
         "telemetry_steps=40", "attention_steps=100"]  # fmt: skip
LABELS = 128  # query labels per training batch: batch = LABELS // pairs, so every setting costs the same
CHUNK = 16  # memory chunk (a chunk of 64 costs about twice as much per token at these widths on CPU)

# name -> constructor(vocab, d_model, rngs); the recall comparison's models
MODELS: dict[str, Callable] = {
    "transformer": functools.partial(nn.transformer, heads=2),
    "linear_attention": functools.partial(nn.linear_attention, chunk=CHUNK),
    "deltanet": functools.partial(nn.deltanet, chunk=CHUNK),
}
# forgetting-MQAR: additive against overwriting memories, each with and without a forgetting gate
FORGETTING_MODELS: dict[str, Callable] = {
    "linear_attention": MODELS["linear_attention"],
    "deltanet": MODELS["deltanet"],
    "transformer": MODELS["transformer"],
}
# two languages: name -> (constructor, CMS periods or None); HOPE's CMS variants come from hope_ablation
LANGUAGE_MODELS: dict[str, tuple[Callable, tuple[int, ...] | None]] = {
    "transformer": (functools.partial(nn.transformer, heads=2), None),
    "deltanet": (MODELS["deltanet"], None),
    "hope_attention": (functools.partial(nn.hope_attention, heads=2, cms="optimizer"), (1, 4, 16)),
}
TELEMETRY_MODELS: dict[str, Callable] = {
    "deltanet": MODELS["deltanet"],
    "titans": functools.partial(nn.titans, chunk=CHUNK),
    "hope": functools.partial(nn.hope, chunk=CHUNK, **ISSUE6_HOPE),
}


def optimizer(periods=None) -> optax.GradientTransformation:
    """AdamW at ``LR``; with CMS ``periods``, the CMS rule (block l every periods[l] steps) over it."""
    if periods is None:
        return optax.adamw(LR)
    return nn.cms_optimizer(optax.adamw(LR), periods, io_period=1)


def _model_fn(build: Callable, width: int) -> Callable:
    return lambda rngs: build(vocab=VOCAB, d_model=width, rngs=rngs)


def _checkpoints(rundir: RunDir | None, name: str):
    """The run's checkpoints under the run directory (resumed per chunk), or none without one."""
    return rundir.checkpoints(name) if rundir is not None else contextlib.nullcontext()


def _finite(values: np.ndarray, diverged: np.ndarray) -> list[float]:
    """Per-seed values with diverged runs as NaN, so no table or plot averages them in."""
    return [float("nan") if d else float(v) for v, d in zip(values, diverged)]


# -- 1. MQAR accuracy against state size ------------------------------------------------------------------


def mqar_state_size(
    scale: Config, log=print, partial: Callable | None = None, rundir: RunDir | None = None
) -> pd.DataFrame:
    """Every model at every width on the first setting, at the largest width on the others.

    ``partial(frame)`` is called after every run with the rows so far (the caller saves them); with a
    ``rundir`` every run checkpoints after each chunk and resumes from there."""
    rows = []
    for length, pairs in scale.settings:
        batch = LABELS // pairs
        sample = functools.partial(tasks.mqar, batch=batch, length=length, pairs=pairs, vocab=VOCAB)
        widths = scale.widths if (length, pairs) == scale.settings[0] else scale.widths[-1:]
        for name, build in MODELS.items():
            for width in widths:
                model_fn = _model_fn(build, width)
                trainer = nn.SeqTrainer(
                    model_fn, optimizer(), lambda k, s=sample: s(k), steps=scale.steps, chunk=scale.chunk,
                    eval_batches=scale.eval_batches,
                )  # fmt: skip
                with _checkpoints(rundir, f"mqar/{length}x{pairs}/{name}_d{width}") as checkpoints:
                    res = trainer.run_seeds(scale.seeds, checkpoints=checkpoints)
                size = nn.state_size(model_fn(nnx.Rngs(0)), length)
                accs = _finite(res["eval_acc"], res["diverged"])
                for seed, acc, dstep in zip(scale.seeds, accs, res["diverged_step"]):
                    rows.append({"model": name, "width": width, "length": length, "pairs": pairs,
                                 "state_size": size, "seed": seed, "eval_acc": acc,
                                 "diverged_step": int(dstep)})  # fmt: skip
                log(f"[mqar {length}/{pairs}] {name:>17} d={width:<3} state {size:>7}  acc "
                    f"{_describe(accs)}")  # fmt: skip
                if partial is not None:
                    partial(pd.DataFrame(rows))
    return pd.DataFrame(rows)


def _describe(values) -> str:
    v = np.asarray(values, float)
    ok = v[np.isfinite(v)]
    if not len(ok):
        return "all runs diverged"
    sem = ok.std(ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else 0.0
    left = len(v) - len(ok)
    return f"{ok.mean():.3f} ± {sem:.3f}" + (f" ({left} diverged, left out)" if left else "")


def attention_at_its_rate(scale: Config, log=print, rundir: RunDir | None = None) -> pd.DataFrame:
    """The Transformer at AdamW 1e-3 for 1,500 steps, width 32, every setting (at the shared 3e-3 and 800
    steps some of its seeds stay on the plateau; Zoology tunes the rate per model)."""
    rows = []
    steps = scale.attention_steps
    for length, pairs in scale.settings:
        sample = functools.partial(tasks.mqar, batch=LABELS // pairs, length=length, pairs=pairs, vocab=VOCAB)
        trainer = nn.SeqTrainer(
            _model_fn(MODELS["transformer"], scale.widths[-1]), optax.adamw(1e-3), lambda k, s=sample: s(k),
            steps=steps, chunk=min(500, steps), eval_batches=scale.eval_batches,
        )  # fmt: skip
        with _checkpoints(rundir, f"mqar_attention_lr/{length}x{pairs}") as checkpoints:
            res = trainer.run_seeds(scale.seeds, checkpoints=checkpoints)
        accs = _finite(res["eval_acc"], res["diverged"])
        for seed, acc in zip(scale.seeds, accs):
            rows.append({"model": "transformer", "learning_rate": 1e-3, "steps": steps, "length": length,
                         "pairs": pairs, "seed": seed, "eval_acc": acc})  # fmt: skip
        log(f"[mqar {length}/{pairs}] transformer at lr 1e-3, {steps} steps: acc {_describe(accs)}")
    return pd.DataFrame(rows)


# -- 2. forgetting-MQAR: does the memory overwrite? -------------------------------------------------------


def _split_accuracy(trainer: nn.SeqTrainer, params, sample, key, batches: int):
    """Accuracy on reassigned (kind 1) and untouched (kind 0) keys, one run."""

    def one(i):
        batch = sample(jax.random.fold_in(key, i))
        logits = trainer.apply(params).logits_at(batch.tokens, batch.positions)
        hit = (jnp.argmax(logits, -1) == batch.labels).astype(jnp.float32)
        kind = batch.kind.astype(jnp.float32)
        return jnp.sum(hit * kind), jnp.sum(kind), jnp.sum(hit * (1 - kind)), jnp.sum(1 - kind)

    sums = jax.lax.map(one, jnp.arange(batches, dtype=jnp.int32))
    hit_r, n_r, hit_u, n_u = (jnp.sum(s) for s in sums)
    return hit_r / n_r, hit_u / n_u


def forgetting_mqar(scale: Config, log=print, rundir: RunDir | None = None) -> pd.DataFrame:
    sample = functools.partial(
        tasks.forgetting_mqar, batch=BATCH, length=64, pairs=4, reassign=2, vocab=VOCAB
    )
    width = 32 if 32 in scale.widths else scale.widths[0]
    rows = []
    for name, build in FORGETTING_MODELS.items():
        trainer = nn.SeqTrainer(
            _model_fn(build, width), optimizer(), lambda k: sample(k), steps=scale.steps, chunk=scale.chunk,
            eval_batches=scale.eval_batches,
        )  # fmt: skip
        with _checkpoints(rundir, f"forgetting/{name}") as checkpoints:
            res = trainer.run_seeds(scale.seeds, checkpoints=checkpoints)
        keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 7) for s in scale.seeds])
        split = jax.jit(
            jax.vmap(lambda p, k, t=trainer: _split_accuracy(t, p, sample, k, scale.eval_batches))
        )
        reassigned, untouched = (np.asarray(x) for x in split(res["state"].params, keys))
        reassigned = _finite(reassigned, res["diverged"])
        untouched = _finite(untouched, res["diverged"])
        for seed, r, u, dstep in zip(scale.seeds, reassigned, untouched, res["diverged_step"]):
            rows.append({"model": name, "width": width, "seed": seed, "acc_reassigned": r, "acc_untouched": u,
                         "diverged_step": int(dstep)})  # fmt: skip
        log(
            f"[forgetting-mqar] {name:>22}  reassigned {_describe(reassigned)}  untouched {_describe(untouched)}"
        )
    return pd.DataFrame(rows)


# -- 3 and 4. two languages, and HOPE with the CMS on and off --------------------------------------------


def two_languages(build: Callable, periods, scale: Config, width: int = 32, seed_offset: int = 0):
    """Train on language A, then B; accuracy on both after every chunk. Returns (curves, result dict)."""
    langs = tasks.two_languages(0, vocab=32, branching=2)
    samplers = [lambda k, lang=lang: langs.sample(k, lang, BATCH, 64) for lang in (0, 1)]
    trainers = [
        nn.SeqTrainer(
            lambda rngs: build(vocab=32, d_model=width, rngs=rngs),
            optimizer(periods),
            s,
            steps=scale.language_steps,
            chunk=scale.chunk,
            eval_batches=scale.eval_batches,
        )  # fmt: skip
        for s in samplers
    ]
    seeds = [s + seed_offset for s in scale.seeds]
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 9) for s in seeds])
    evaluate = jax.jit(
        jax.vmap(
            lambda p, k: jnp.stack(
                [trainers[0].evaluate(p, samplers[lang], k, scale.eval_batches)["acc"] for lang in (0, 1)]
            )
        )
    )
    state = trainers[0].init(seeds)
    curve = [np.asarray(evaluate(state.params, keys))]
    for phase in (0, 1):
        for _ in range(scale.language_steps // scale.chunk):
            state, _ = trainers[phase].run_chunk(state, seeds)
            curve.append(np.asarray(evaluate(state.params, keys)))
    curve = np.stack(curve, 1)  # [S, points, 2]
    diverged = np.asarray(state.diverged_step) >= 0
    curve[diverged] = np.nan
    mid = scale.language_steps // scale.chunk
    return curve, {
        "a_after_a": curve[:, mid, 0],
        "a_after_b": curve[:, -1, 0],
        "b_after_b": curve[:, -1, 1],
        "optimal_a": langs.optimal_accuracy(0),
        "optimal_b": langs.optimal_accuracy(1),
        "diverged_step": np.asarray(state.diverged_step),
    }


def languages(scale: Config, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    curve_rows, rows = [], []
    for name, (build, periods) in LANGUAGE_MODELS.items():
        curve, res = two_languages(build, periods, scale)
        _language_rows(name, scale, curve, res, curve_rows, rows, log)
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)


def _language_rows(name, scale, curve, res, curve_rows, rows, log) -> None:
    for s, seed in enumerate(scale.seeds):
        for p in range(curve.shape[1]):
            curve_rows.append({"model": name, "seed": seed, "step": p * scale.chunk,
                               "acc_a": curve[s, p, 0], "acc_b": curve[s, p, 1]})  # fmt: skip
        rows.append({"model": name, "seed": seed, "a_after_a": res["a_after_a"][s],
                     "a_after_b": res["a_after_b"][s], "b_after_b": res["b_after_b"][s],
                     "optimal_a": res["optimal_a"], "optimal_b": res["optimal_b"],
                     "diverged_step": int(res["diverged_step"][s])})  # fmt: skip
    kept = res["a_after_a"] - res["a_after_b"]
    log(f"[two languages] {name:>15}  A after A {_describe(res['a_after_a'])}, after B "
        f"{_describe(res['a_after_b'])} (forgetting {_describe(kept)}); B {_describe(res['b_after_b'])}; "
        f"optimal {res['optimal_a']:.3f}/{res['optimal_b']:.3f}")  # fmt: skip


def hope_ablation(scale: Config, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """HOPE with the CMS off, with periods (1, 1, 1) and with (1, 4, 16), on the two languages."""
    curve_rows, rows = [], []
    for variant, periods in HOPE_PERIODS.items():
        build = (
            functools.partial(nn.self_modifying_titans, **ISSUE6_MIXER)
            if periods is None
            else functools.partial(nn.hope, **ISSUE6_HOPE)
        )
        curve, lang = two_languages(build, periods, scale)
        _language_rows(f"hope_{variant}", scale, curve, lang, curve_rows, rows, log)
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)


def telemetry(scale: Config, log=print) -> pd.DataFrame:
    """The memory mixers' statistics over training, MQAR at the first setting, width 32, first seed."""
    length, pairs = scale.settings[0]
    sample = functools.partial(tasks.mqar, batch=LABELS // pairs, length=length, pairs=pairs, vocab=VOCAB)
    rows = []
    for name, build in TELEMETRY_MODELS.items():  # sample: the first setting's MQAR
        trainer = nn.SeqTrainer(
            _model_fn(build, 32), optimizer(), lambda k: sample(k), steps=scale.telemetry_steps,
            chunk=scale.telemetry_steps // 4, eval_batches=1, telemetry=True,
        )  # fmt: skip
        res = trainer.run_seeds(scale.seeds[:1])
        for stat, values in res["telemetry"].items():
            for c, value in enumerate(np.asarray(values)[0]):
                rows.append(
                    {"model": name, "step": int(res["curve_step"][c]), "stat": stat, "value": float(value)}
                )
        last = {
            k: float(np.asarray(v)[0, -1]) for k, v in res["telemetry"].items() if k.startswith("layer0/")
        }
        log(f"[telemetry] {name}: " + ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in last.items()))
    return pd.DataFrame(rows)


def run(config: Config, rundir: RunDir) -> None:
    """Runs every part; a finished part (its tables on disk, marked done) is skipped on resume."""
    scale, log, save = config, rundir.log, rundir.write_table

    def part(name: str, make: Callable[[], None]) -> None:
        if rundir.done(name):
            log(f"[{name}] already finished, kept its tables")
        else:
            make()
            rundir.mark_done(name)

    def hope() -> None:
        hope_curves, hope_languages = hope_ablation(scale, log)
        save("hope_languages", hope_curves)
        save("hope_language_summary", hope_languages)

    def both_languages() -> None:
        curves, summary = languages(scale, log)
        save("languages", pd.concat([curves, rundir.read_table("hope_languages")], ignore_index=True))
        save(
            "languages_summary",
            pd.concat([summary, rundir.read_table("hope_language_summary")], ignore_index=True),
        )

    # cheapest and most telling first; every part lands on disk as it finishes, and --resume skips the
    # parts already done
    part("forgetting", lambda: save("forgetting", forgetting_mqar(scale, log, rundir)))
    part("hope_languages", hope)
    part("languages", both_languages)
    part("telemetry", lambda: save("telemetry", telemetry(scale, log)))
    part("mqar", lambda: save("mqar", mqar_state_size(scale, log, lambda f: save("mqar_partial", f), rundir)))
    part("mqar_attention_lr", lambda: save("mqar_attention_lr", attention_at_its_rate(scale, log, rundir)))
    figures(rundir.path)
    rundir.mark_complete(vocab=VOCAB)


def figures(out: Path) -> None:
    """Writes the three figures from ``out/results`` (no training)."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    results = out / "results"
    for name, make in (
        ("mqar_state_size", mqar_figure),
        ("forgetting_mqar", forgetting_figure),
        ("two_languages", languages_figure),
    ):
        with plot.style():
            fig = make(results)
            save_figure(fig, out / "figures" / name)
            plt.close(fig)


def mqar_figure(results: Path):
    """MQAR accuracy against state size, one panel per (length, pairs), mean ± s.e.m. over seeds."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    mqar = pd.read_csv(results / "mqar.csv")
    settings = sorted({(r.length, r.pairs) for r in mqar.itertuples()})
    fig, axes = plt.subplots(1, len(settings), figsize=(plot.DOUBLE_COLUMN, 2.3), squeeze=False)
    for ax, (length, pairs) in zip(axes[0], settings):
        part = mqar[(mqar.length == length) & (mqar.pairs == pairs)]
        for i, (name, g) in enumerate(part.groupby("model", sort=False)):
            stats = g.groupby("state_size")["eval_acc"].agg(["mean", "sem"]).reset_index()
            ax.errorbar(stats["state_size"], stats["mean"], yerr=stats["sem"].fillna(0), marker="o", ms=3,
                        lw=0.8, capsize=2, color=f"C{i}", label=name.replace("_", " "))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"length {length}, {pairs} pairs", fontsize=7)
        ax.set_xlabel("state size (floats)")
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=5, frameon=False)
    return fig


def forgetting_figure(results: Path):
    """Forgetting-MQAR accuracy on untouched and on reassigned keys per model, mean ± s.e.m."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    forget = pd.read_csv(results / "forgetting.csv")
    fig, ax = plt.subplots(figsize=(plot.SINGLE_COLUMN, 2.2))
    g = forget.groupby("model", sort=False)
    names = list(g.groups)
    for j, col in enumerate(("acc_untouched", "acc_reassigned")):
        mean, sem = g[col].mean(), g[col].sem().fillna(0)
        ax.bar(np.arange(len(names)) + (j - 0.5) * 0.38, mean[names], 0.38, yerr=sem[names],
               label=col.removeprefix("acc_") + " keys", color=f"C{j}")  # fmt: skip
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=5)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=6, frameon=False)
    return fig


def languages_figure(results: Path):
    """Accuracy on language A and on language B while training on A, then B; optimal accuracies dotted."""
    import matplotlib.pyplot as plt

    from nestlearn import plot

    curves = pd.read_csv(results / "languages.csv")
    summary = pd.read_csv(results / "languages_summary.csv")
    fig, (left, right) = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.3), sharey=True)
    for i, (name, g) in enumerate(curves.groupby("model", sort=False)):
        for ax, col in ((left, "acc_a"), (right, "acc_b")):
            stats = g.groupby("step")[col].agg(["mean", "sem"]).reset_index()
            sem = stats["sem"].fillna(0)
            ax.plot(
                stats["step"], stats["mean"], color=plt.cm.tab10(i % 10), lw=0.9, label=name.replace("_", " ")
            )
            ax.fill_between(stats["step"], stats["mean"] - sem, stats["mean"] + sem, color=plt.cm.tab10(i % 10),
                            alpha=0.2, lw=0)  # fmt: skip
    switch = curves["step"].max() / 2
    for ax, col, title in ((left, "optimal_a", "language A"), (right, "optimal_b", "language B")):
        ax.axvline(switch, color="0.6", ls="--", lw=0.5)
        ax.axhline(summary[col].iloc[0], color="0.3", ls=":", lw=0.6)
        ax.set_title(title, fontsize=7)
        ax.set_xlabel("training step (A, then B)")
    left.set_ylabel("next-token accuracy")
    right.legend(fontsize=5, frameon=False)
    return fig
