"""Tokens per second of the memory models, chunkwise-parallel against per-token paths (issue 6).

    python benchmarks/memory_tokens.py [--models ...] [--lengths 256 1024 4096] [--modes inference training]
        [--paths chunk token] [--reps 5] [--batch 4] [--chunk N] [--cell-cap 90] [--total-cap 0]

Every model of ``nestlearn.nn`` that has a memory (``linear_attention``, ``deltanet``, ``ttt_linear``,
``ttt_mlp``, ``titans``, ``self_modifying_titans``, ``hope``) is built at one small size (``--d-model 64``,
2 layers, 2 heads, vocabulary 256) with ``path="chunk"`` and with ``path="token"``; the softmax references
(``transformer``, ``hope_attention``) have no path switch and are timed once (path ``"-"``). Two modes:

- ``inference``: the jitted ``model.logits_at(tokens, positions)`` at 16 query positions per sequence.
- ``training``: one jitted step, ``jax.value_and_grad`` of the next-token cross-entropy at those 16
  positions followed by an ``optax.adam`` update; the new parameters and Adam state feed the next call.

``--level memory`` times the memory layer alone (one block, no MLP channel; the embedding and head are
a small fraction): the chunkwise-against-per-token ratio of the memory itself, which the whole model
dilutes with the parts both paths share.

For each (model, mode, length) the programs of both paths are compiled first (``lower().compile()``, its
wall time recorded as ``compile_s``), called once to warm up, then timed ``--reps`` times with the two
paths interleaved (the order alternating every repeat) so that load from other users hits both alike.
tokens/s = batch * length / median wall time of a call (``block_until_ready``). A path is skipped, with
the reason recorded, when its previous length's time scaled to this length predicts more than
``--cell-cap`` seconds of timing, or when its warm-up call alone exceeds the cap (its repeats are cut to
fit otherwise); ``--total-cap`` skips every cell that would start after that many seconds.

The issue's floor: at length 1024 the chunkwise path of ``linear_attention`` and ``deltanet`` must be at
least 5x faster than the per-token path, in both modes. The script prints a markdown table and the
speed-ups, writes JSON to ``--out`` (default ``benchmarks/results/memory_tokens_cpu.json``) and exits with
status 1 if the floor fails (2 if a floor cell was asked for but could not be measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nestlearn import nn
from nestlearn.experiment import write_json

HERE = Path(__file__).resolve().parent
MEMORY_MODELS = (
    "linear_attention",
    "deltanet",
    "ttt_linear",
    "ttt_mlp",
    "titans",
    "self_modifying_titans",
    "hope",
)
REFERENCE_MODELS = ("transformer", "hope_attention")
FLOOR_MODELS, FLOOR_LENGTH, FLOOR = ("linear_attention", "deltanet"), 1024, 5.0
QUERIES = 16  # positions per sequence that are read (inference) or trained on (training)


def build_model(name: str, path: str, args) -> nnx.Module:
    """The model ``name`` at the benchmark's size; ``path`` is ignored by the softmax references."""
    size = dict(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers, heads=args.heads)
    if name in REFERENCE_MODELS:
        return getattr(nn, name)(**size, rngs=nnx.Rngs(0))
    extra = {} if args.chunk is None else {"chunk": args.chunk}
    model = getattr(nn, name)(**size, path=path, **extra, rngs=nnx.Rngs(0))
    if args.level == "memory":  # the memory layer alone: one block, its MLP channel removed
        model.layers = nnx.List([model.layers[0]])
        model.layers[0].channel = model.layers[0].channel_norm = None
    return model


def programs(model: nnx.Module, mode: str, tokens, positions, targets):
    """A pure function of arrays for ``mode`` and its first arguments; calls return the next arguments."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    if mode == "inference":

        def infer(params, tokens, positions):
            return nnx.merge(graphdef, params, rest).logits_at(tokens, positions)

        return infer, (params, tokens, positions), lambda args, out: args

    tx = optax.adam(1e-3)

    def loss_fn(params, tokens, positions, targets):
        logits = nnx.merge(graphdef, params, rest).logits_at(tokens, positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def train(params, opt_state, tokens, positions, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, positions, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def advance(args, out):  # the trained parameters and Adam state feed the next step
        return (out[0], out[1], *args[2:])

    return train, (params, tx.init(params), tokens, positions, targets), advance


def data(args, length: int):
    """Random tokens, query positions in ``[0, length - 1)`` and their next tokens as targets."""
    key = jax.random.PRNGKey(length)
    k1, k2 = jax.random.split(key)
    tokens = jax.random.randint(k1, (args.batch, length), 0, args.vocab, jnp.int32)
    positions = jax.random.randint(k2, (args.batch, QUERIES), 0, length - 1, jnp.int32)
    targets = jnp.take_along_axis(tokens, positions + 1, axis=1)
    return tokens, positions, targets


class Timed:
    """One compiled program of a cell (one path), with its arguments and its measurements."""

    def __init__(self, fn, call_args, advance):
        t0 = time.perf_counter()
        self.compiled = jax.jit(fn).lower(*call_args).compile()
        self.compile_s = time.perf_counter() - t0
        self.args, self.advance, self.times = call_args, advance, []

    def call(self) -> float:
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.compiled(*self.args))
        dt = time.perf_counter() - t0
        self.args = self.advance(self.args, out)
        return dt


def run_cell(model_name, mode, length, args, history, deadline):
    """Rows (one per path) for one (model, mode, length), the paths' repeats interleaved."""
    paths = ("-",) if model_name in REFERENCE_MODELS else tuple(args.paths)
    tokens, positions, targets = data(args, length)
    rows, live = {}, {}
    for path in paths:
        row = dict(model=model_name, mode=mode, length=length, path=path, batch=args.batch)
        rows[path] = row
        if deadline is not None and time.monotonic() > deadline:
            row.update(status="skipped", reason=f"total time cap of {args.total_cap:g} s reached")
            continue
        prev = history.get((model_name, mode, path))
        if prev is not None:  # time per call grows linearly with length (quadratically for softmax)
            power = 2 if model_name in REFERENCE_MODELS else 1
            predicted = prev[1] * (length / prev[0]) ** power
            if predicted * (args.reps + 1) > args.cell_cap:
                row.update(
                    status="skipped",
                    reason=f"predicted {predicted:.1f} s per call from length {prev[0]} "
                    f"(x{args.reps + 1} calls > cell cap {args.cell_cap:g} s)",
                )
                continue
        model = build_model(model_name, path, args)
        row["params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
        timed = Timed(*programs(model, mode, tokens, positions, targets))
        warm = timed.call()
        row.update(compile_s=timed.compile_s, warmup_s=warm)
        history[(model_name, mode, path)] = (length, warm)
        if warm > args.cell_cap:
            row.update(
                status="skipped", reason=f"warm-up call took {warm:.1f} s > cell cap {args.cell_cap:g} s"
            )
            continue
        row["reps"] = max(1, min(args.reps, int(args.cell_cap // warm)))
        live[path] = timed
    for r in range(max((rows[p]["reps"] for p in live), default=0)):
        order = list(live) if r % 2 == 0 else list(reversed(live))
        for path in order:
            if r < rows[path]["reps"]:
                live[path].times.append(live[path].call())
    for path, timed in live.items():
        med = statistics.median(timed.times)
        history[(model_name, mode, path)] = (length, med)
        rows[path].update(
            status="ok", median_s=med, times_s=timed.times, tokens_per_s=args.batch * length / med
        )
    return list(rows.values())


def speedups(rows):
    """chunk tokens/s over token tokens/s for every (model, mode, length) where both were measured."""
    by = {(r["model"], r["mode"], r["length"], r["path"]): r for r in rows}
    out = []
    for (model, mode, length, path), r in by.items():
        other = by.get((model, mode, length, "token"))
        if path == "chunk" and r["status"] == "ok" and other is not None and other["status"] == "ok":
            s = r["tokens_per_s"] / other["tokens_per_s"]
            out.append(dict(model=model, mode=mode, length=length, speedup=s))
    return out


def check_floor(rows, ups, args):
    """(exit status, message) of the issue's 5x floor at length 1024."""
    asked = [
        (m, mode)
        for m in FLOOR_MODELS
        for mode in ("inference", "training")
        if m in args.models and mode in args.modes and FLOOR_LENGTH in args.lengths
        and {"chunk", "token"} <= set(args.paths)
    ]  # fmt: skip
    if not asked:
        return (
            0,
            "floor not checked (length 1024 / linear_attention / deltanet / both paths not all selected)",
        )
    got = {(u["model"], u["mode"]): u["speedup"] for u in ups if u["length"] == FLOOR_LENGTH}
    missing = [f"{m}/{mode}" for m, mode in asked if (m, mode) not in got]
    failed = [f"{m}/{mode} {got[(m, mode)]:.2f}x" for m, mode in asked if got.get((m, mode), FLOOR) < FLOOR]
    if failed:
        return (
            1,
            f"FLOOR FAILED: chunk/token speed-up below {FLOOR:g}x at length {FLOOR_LENGTH}: "
            + ", ".join(failed),
        )
    if missing:
        return 2, "FLOOR NOT VERIFIED: not measured at length 1024: " + ", ".join(missing)
    speeds = ", ".join(f"{m}/{mode} {got[(m, mode)]:.1f}x" for m, mode in asked)
    return 0, f"floor met (>= {FLOOR:g}x at length {FLOOR_LENGTH}): {speeds}"


def markdown(rows, ups) -> str:
    """One line per (model, mode, length): tokens/s of each path, the speed-up and the compile times."""
    by = {(r["model"], r["mode"], r["length"], r["path"]): r for r in rows}
    up = {(u["model"], u["mode"], u["length"]): u["speedup"] for u in ups}
    cells = sorted({k[:3] for k in by}, key=lambda k: (k[1], _order(k[0]), k[2]))

    def tps(r):
        if r is None:
            return ""
        return f"{r['tokens_per_s']:,.0f}" if r["status"] == "ok" else "skipped"

    def comp(r):
        return "-" if r is None or "compile_s" not in r else f"{r['compile_s']:.1f}"

    lines = [
        "| model | mode | length | chunk tok/s | token tok/s | chunk / token | compile s (chunk / token) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, mode, length in cells:
        if (model, mode, length, "-") in by:
            r = by[(model, mode, length, "-")]
            lines.append(f"| {model} | {mode} | {length} | {tps(r)} (no path) | | | {comp(r)} |")
            continue
        c, t = by.get((model, mode, length, "chunk")), by.get((model, mode, length, "token"))
        s = up.get((model, mode, length))
        lines.append(
            f"| {model} | {mode} | {length} | {tps(c)} | {tps(t)} | {'' if s is None else f'{s:.1f}x'} "
            f"| {comp(c)} / {comp(t)} |"
        )
    return "\n".join(lines)


def _order(model: str) -> int:
    names = MEMORY_MODELS + REFERENCE_MODELS
    return names.index(model) if model in names else len(names)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MEMORY_MODELS + REFERENCE_MODELS))
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    p.add_argument("--paths", nargs="+", default=["chunk", "token"], choices=["chunk", "token"])
    p.add_argument("--reps", type=int, default=5, help="timed calls per path after the warm-up")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--chunk", type=int, default=None, help="chunk of every memory (default: each model's)")
    p.add_argument(
        "--level",
        default="model",
        choices=["model", "memory"],
        help="model: the whole model (--layers blocks with MLP channels); memory: one block, memory mixer only",
    )
    p.add_argument("--cell-cap", type=float, default=90.0, help="seconds of timing per path and cell")
    p.add_argument("--total-cap", type=float, default=0.0, help="skip cells starting after this (0: none)")
    p.add_argument(
        "--order", default="length", choices=["length", "model"], help="outer loop over lengths or models"
    )
    p.add_argument("--out", default=str(HERE / "results" / "memory_tokens_cpu.json"))
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MEMORY_MODELS + REFERENCE_MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MEMORY_MODELS + REFERENCE_MODELS)}")
    for name in ("reps", "batch", "d_model", "layers", "heads", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.chunk is not None and args.chunk < 1:
        p.error(f"--chunk must be >= 1, got {args.chunk}")
    if any(n < 2 for n in args.lengths):
        p.error(f"--lengths must all be >= 2, got {args.lengths}")
    if args.cell_cap <= 0:
        p.error(f"--cell-cap must be > 0, got {args.cell_cap}")
    args.lengths = sorted(set(args.lengths))
    return args


def save(args, argv, rows, start, load_start, *, final: bool) -> tuple[int, str, str]:
    """Write the JSON (after every cell, so a killed run keeps what it measured); returns the verdict."""
    ups = speedups(rows)
    status, verdict = check_floor(rows, ups, args)
    table = markdown(rows, ups)
    meta = dict(
        command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        devices=[str(d) for d in jax.devices()],
        platform=jax.devices()[0].platform,
        device_kind=jax.devices()[0].device_kind,
        jax=jax.__version__,
        flax=flax.__version__,
        optax=optax.__version__,
        python=platform.python_version(),
        machine=platform.node(),
        cpu_count=os.cpu_count(),
        load_start=load_start,
        load_end=os.getloadavg(),
        started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
        wall_s=time.time() - start,
        complete=final,
        settings={k: v for k, v in vars(args).items() if k != "out"},
        queries=QUERIES,
        note="tokens/s = batch * length / median call time; paths interleaved; compile excluded",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    floor = dict(models=FLOOR_MODELS, length=FLOOR_LENGTH, min_speedup=FLOOR, status=status, verdict=verdict)
    write_json(out, dict(meta=meta, rows=rows, speedups=ups, floor=floor, table=table))
    return status, verdict, table


def main(argv=None) -> int:
    args = parse(argv)
    start, load_start = time.time(), os.getloadavg()
    deadline = time.monotonic() + args.total_cap if args.total_cap > 0 else None
    print(f"devices {jax.devices()}, jax {jax.__version__}, {os.cpu_count()} CPUs, load {load_start}")
    rows, history = [], {}
    models = sorted(args.models, key=_order)
    # Short lengths first within a model: their times predict the long ones. "--order model" finishes one
    # model at every length before the next (what a time-capped run wants: whole rows, floor models first).
    if args.order == "length":
        cells = [(m, mode, n) for n in args.lengths for mode in args.modes for m in models]
    else:
        cells = [(m, mode, n) for m in models for mode in args.modes for n in args.lengths]
    for model, mode, length in cells:
        for row in run_cell(model, mode, length, args, history, deadline):
            rows.append(row)
            state = (
                f"{row['tokens_per_s']:12,.0f} tok/s  median {row['median_s'] * 1e3:9.1f} ms  "
                f"compile {row['compile_s']:5.1f} s"
                if row["status"] == "ok"
                else f"skipped: {row['reason']}"
            )
            print(f"{model:22s} {mode:9s} {length:6d} {row['path']:5s} {state}", flush=True)
        save(args, argv, rows, start, load_start, final=False)
    status, verdict, table = save(args, argv, rows, start, load_start, final=True)
    print()
    print(table)
    print()
    for u in speedups(rows):
        print(f"speed-up chunk/token {u['model']:22s} {u['mode']:9s} {u['length']:6d} {u['speedup']:6.2f}x")
    print(f"load average at start {load_start}, at end {os.getloadavg()}; wall {time.time() - start:.0f} s")
    print(f"wrote {args.out}")
    print(verdict, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
