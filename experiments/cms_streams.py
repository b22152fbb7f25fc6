"""CMS-MLP (several period choices, and CMS off), nested CMS and fast/slow consolidation against naive, EWC
and replay on permuted MNIST and split MNIST (domain-incremental); forgetting curves, a summary table,
per-level telemetry per task, and the stability–plasticity plane with the periods and rates as the swept
axis. Issue 5's second and third measured comparisons.

Command:  nestlearn run cms_streams [--set n_tasks=N --set seeds=0,1 --set bases=1,4 ...] [--quick] [--resume]
                                           (--quick: 3 tasks, 2 seeds, fewer swept values)
Runtime:  about 5-8 minutes on 2 (shared) CPU cores; --quick about 1-2 minutes.
Produces: results/<stream>/<method>.npz (one StreamResult per method, sweeps as rows; load with
          nestlearn.experiment.load_result), results/summary.csv (every metrics.summary value per
          stream, method, swept value and seed), results/tradeoff.csv (plasticity and stability, mean and
          s.e.m., per stream, method and swept value), results/telemetry.csv (per stream, CMS period
          choice, seed and task: each level's cumulative update count, update norm over the task, and the cosine
          between blocks' weights), figures/cms_<stream>.{pdf,png} (average accuracy and the forgetting
          curve of task 1 per method), figures/cms_tradeoff.{pdf,png}, status.json.
Setup:    model nn.CMSMLP(784, 128, dout, levels=3, hidden=128), sequential residual blocks, for every
          method (CMS off is the plain network); SGD lr 0.01, momentum 0.9, batch 64; permuted MNIST 5
          tasks x 64 steps (about one epoch of the 4,000 training images), split MNIST domain 5 tasks x
          32 steps (about 2.5 epochs of 800), evaluated every 16 steps; seeds 0-4. Methods:
            cms       periods (1, b, b^2) for b in {1 (CMS off = naive), 2, 4, 8}, one program
                      (b is an optax.inject_hyperparams hyperparameter swept by the engine);
            nested    periods (1, 4, 16) with continual.nested_cms, meta-rate beta in {0.2, 0.5, 0.8};
            fastslow  CMS off, continual.FastSlow with P in {4, 16} and alpha in {0.2, 0.5, 0.8};
            ewc       CMS off, EWC lam 100;   replay   CMS off, reservoir buffer of 500.
          Summaries read the end-of-task accuracy matrix (fast weights; with FastSlow at a task length
          divisible by P these are the slow weights).
Resume:   by part: a finished (stream, method) (results/<stream>/<method>.npz, and the cms telemetry) is
          kept on --resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from nestlearn import ConfigError, continual, engine, metrics, nn, tasks
from nestlearn.experiment import RunDir, load_result, save_figure

WIDTH = 128


@dataclasses.dataclass(frozen=True)
class Config:
    """Tasks per stream, seeds, and the swept values of each method."""

    n_tasks: int = 5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    bases: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    nested_rates: tuple[float, ...] = (0.2, 0.5, 0.8)
    fs_periods: tuple[float, ...] = (4.0, 16.0)
    fs_rates: tuple[float, ...] = (0.2, 0.5, 0.8)

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            if field.name != "n_tasks" and not getattr(self, field.name):
                raise ConfigError(f"{field.name} must name at least one value")
        if not 2 <= self.n_tasks <= 5:
            raise ConfigError(
                f"n_tasks must be between 2 and 5 (split MNIST has 5 tasks), got {self.n_tasks}"
            )


CONFIG = Config()
QUICK = ["n_tasks=3", "seeds=0,1", "bases=1,4", "nested_rates=0.5", "fs_periods=16", "fs_rates=0.2,0.8"]
STREAMS = {"permuted": 64, "split_domain": 32}  # stream -> steps per task


def cms_sgd(learning_rate, period_base, momentum):
    """SGD with momentum under the CMS rule with periods (1, b, b^2); b may be traced (a swept value)."""
    b = jnp.round(period_base)
    return nn.cms_optimizer(optax.sgd(learning_rate, momentum), (1, b, b * b), io_period=1)


def injected_cms(base: float = 1.0):
    return optax.inject_hyperparams(cms_sgd, static_args=("momentum",))(
        learning_rate=0.01, period_base=base, momentum=0.9
    )


def make_stream(name: str, n_tasks: int):
    if name == "permuted":
        return tasks.permuted_mnist(n_tasks, seed=0)
    return tasks.split_mnist("domain", n_tasks)


def model_for(dout: int):
    return lambda rngs: nn.CMSMLP(784, WIDTH, dout, levels=3, hidden=WIDTH, rngs=rngs)


def run_with_telemetry(learner, stream, seeds, sweep, periods_of):
    """``Learner.run`` with per-task telemetry: per run and task, each level's updates, update norm, and
    the cosine between blocks; ``periods_of(run) -> (periods, io_period)``."""
    runs = engine.run_grid(seeds, sweep)
    hparams = {k: [r[k] for r in runs] for k in sweep}
    state = learner.init(stream, [r["seed"] for r in runs], None, hparams)
    recorder = continual.Recorder(learner.config, stream, runs)
    recorder.record_init(learner.evaluate(state, stream))
    norms = jax.jit(jax.vmap(nn.level_update_norms))
    cosine = jax.jit(jax.vmap(nn.block_cosine))
    rows = []
    before = jax.tree.map(jnp.copy, state.params)
    for task in range(stream.n_tasks):
        state, out = learner.run_task(state, stream, task)
        recorder.record_task(task, out, state.diverged_step)
        n = {k: np.asarray(v) for k, v in norms(before, state.params).items()}
        cos = np.asarray(cosine(state.params))
        steps = {k: np.asarray(v) for k, v in nn.level_steps(state.opt_state).items()}
        for r, run in enumerate(runs):
            periods, io_period = periods_of(run)
            table = {nn.block_label(i): p for i, p in enumerate(periods)} | {"io": io_period}
            for label in n:
                rows.append({**run, "task": task, "level": label, "period": table[label],
                             "updates": int(steps[label][r]) // table[label], "update_norm": float(n[label][r]),
                             **{f"cos_block{j}": float(cos[r, int(label[-1]), j])
                                for j in range(cos.shape[-1]) if label != "io"}})  # fmt: skip
        before = jax.tree.map(jnp.copy, state.params)
    return recorder.result(), rows


def methods(scale: Config, steps: int):
    """name -> (optimizer, strategy, sweep, swept key)."""
    off = nn.cms_optimizer(optax.sgd(0.01, 0.9), (1, 1, 1), io_period=1)
    return {
        "cms": (injected_cms(), continual.Naive(), {"optimizer.period_base": scale.bases}, "optimizer.period_base"),
        "nested": (nn.cms_optimizer(optax.sgd(0.01, 0.9), (1, 4, 16), io_period=1), continual.nested_cms((1, 4, 16)),
                   {"rate": scale.nested_rates}, "rate"),
        "fastslow": (off, continual.FastSlow(), {"period": scale.fs_periods, "rate": scale.fs_rates}, "rate"),
        "ewc": (off, continual.EWC(lam=100.0), {}, None),
        "replay": (off, continual.Replay(buffer_size=500), {}, None),
    }  # fmt: skip


def run(config: Config, rundir: RunDir) -> None:
    """Runs both streams and every method; a finished (stream, method) is kept on --resume."""
    scale, log, out = config, rundir.log, rundir.path
    summary_rows, tele_rows, trade = [], [], []
    for stream_name, steps in STREAMS.items():
        stream = make_stream(stream_name, scale.n_tasks)
        config = continual.TrainConfig(steps_per_task=steps, batch_size=64, eval_every=16)
        for name, (opt, strategy, sweep, key) in methods(scale, steps).items():
            part = f"{stream_name}/{name}"
            if rundir.done(part):
                result = rundir.load_result(part)
                if name == "cms":
                    tele_rows += rundir.read_table(f"{stream_name}/cms_telemetry").to_dict("records")
                log(f"[{part}] already finished, loaded results/{part}.npz")
            else:
                learner = continual.Learner(model_for(stream.n_classes), opt, strategy, config)
                if name == "cms":
                    result, rows = run_with_telemetry(
                        learner, stream, scale.seeds, sweep,
                        lambda r: ((1, int(r["optimizer.period_base"]), int(r["optimizer.period_base"]) ** 2), 1),
                    )  # fmt: skip
                    rows = [{"stream": stream_name, **row} for row in rows]
                    rundir.write_table(f"{stream_name}/cms_telemetry", pd.DataFrame(rows))
                    tele_rows += rows
                else:
                    result = learner.run(stream, scale.seeds, sweep=sweep)
                rundir.save_result(part, result)
                rundir.mark_done(part)
            table = metrics.summary(result.acc_matrix, result.acc_init)
            for s, r in enumerate(result.runs):
                summary_rows.append({"stream": stream_name, "method": name, **r,
                                     "diverged": bool(result.diverged[s]),
                                     **{k: float(v[s]) for k, v in table.items()}})  # fmt: skip
            points = metrics.tradeoff_points({name: result}, swept={name: key} if key else None)
            if name == "fastslow":  # one curve per period, the rate along it
                points = pd.concat(
                    [
                        metrics.tradeoff_points({f"fastslow P={int(p)}": result.select(period=p)}, swept={f"fastslow P={int(p)}": "rate"})
                        for p in scale.fs_periods
                    ]
                )  # fmt: skip
            trade.append(points.assign(stream=stream_name))
            ok = ~result.diverged
            log(f"[{stream_name}/{name}] ACC {table['average_accuracy'][ok].mean():.3f}, "
                f"forgetting {table['forgetting'][ok].mean():.3f}, learning accuracy "
                f"{table['learning_accuracy'][ok].mean():.3f} over {len(result.runs)} runs")  # fmt: skip
    rundir.write_table("summary", pd.DataFrame(summary_rows))
    rundir.write_table("telemetry", pd.DataFrame(tele_rows))
    rundir.write_table("tradeoff", pd.concat(trade))
    figures(out, scale)
    rundir.mark_complete(streams=list(STREAMS), seeds=list(scale.seeds), n_tasks=scale.n_tasks)


def labelled_results(out: Path, stream: str) -> dict:
    """Method (and swept value) -> StreamResult, for the curves: one line per configuration."""
    found = {}
    for name in ("cms", "nested", "fastslow", "ewc", "replay"):
        r = load_result(out / "results" / stream / f"{name}.npz")
        keys = [k for k in r.runs[0] if k != "seed"]
        if not keys:
            found[name] = r
            continue
        for values, group in r.groups(*keys).items():
            tag = ", ".join(f"{k.removeprefix('optimizer.').replace('period_base', 'b')}={v:g}"
                            for k, v in zip(keys, values))  # fmt: skip
            label = "naive (CMS off)" if name == "cms" and values[0] == 1.0 else f"{name} {tag}"
            found[label] = group
    return found


def figures(out: Path, scale: Config) -> None:
    import matplotlib.pyplot as plt

    from nestlearn import plot

    with plot.style():
        for stream in STREAMS:
            results = labelled_results(out, stream)
            fig, (left, right) = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.6))
            # More methods than the default ten colours: tab20 keeps every line distinct.
            colors = list(plt.get_cmap("tab20").colors)
            left.set_prop_cycle(color=colors)
            for i, (label, result) in enumerate(results.items()):
                color = colors[i % len(colors)]
                plot.average_accuracy_curve(result, ax=left, label=label)
                plot.forgetting_curves(result, ax=right, tasks=[0], label_prefix=f"{label}: ",
                                       color_cycle=[color], legend=False)  # fmt: skip
            left.legend(fontsize=5, frameon=False, ncol=2)
            right.set_title(f"{stream}: task 1 over the stream", fontsize=7)
            save_figure(fig, out / "figures" / f"cms_{stream}")
            plt.close(fig)
        points = pd.read_csv(out / "results" / "tradeoff.csv")
        fig, axes = plt.subplots(1, len(STREAMS), figsize=(plot.DOUBLE_COLUMN, 2.8))
        for ax, stream in zip(axes, STREAMS):
            plot.stability_plasticity(points[points["stream"] == stream].drop(columns="stream"), ax=ax,
                                      references=(), legend=ax is axes[0])  # fmt: skip
            ax.set_title(stream, fontsize=7)
        save_figure(fig, out / "figures" / "cms_tradeoff")
        plt.close(fig)


def summary_table(path: Path) -> pd.DataFrame:
    """Mean ± s.e.m. per stream, method and swept values over non-diverged seeds, from results/summary.csv."""
    frame = pd.read_csv(path)
    kept = frame[~frame["diverged"]]
    keys = ["stream", "method"] + [c for c in ("optimizer.period_base", "period", "rate") if c in frame]
    cols = ["average_accuracy", "learning_accuracy", "forgetting", "backward_transfer"]
    g = kept.groupby(keys, sort=False, dropna=False)[cols]
    return g.mean().round(3).astype(str) + " ± " + g.sem().round(3).astype(str)
