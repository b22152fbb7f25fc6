"""Per-step overhead of nestlearn.optim's transforms against plain optax SGD with momentum.

Model: nestlearn.nn.MLP 784-256-256-10, batch 64 of random data, cross-entropy. Each transform runs
``--steps`` steps inside one ``lax.scan`` in one jit; after a warm-up call the compiled program is timed
``--repeats`` times and the median per-step time is reported, together with its ratio to
``optax.sgd(lr, momentum=0.9)`` measured in the same run. The issue asks the period schedule and the
N-level consolidation to stay within 1.3x.

``consolidation(3 levels)`` carries the three copies as ``LevelParams`` (and returns three updates every
step); ``consolidation_in_state(3)`` is the same rule with the two slow levels in the optimizer state and
the model's own parameters as params, the form meant for training loops. Both sync at periods 5 and 20.
The load average (1, 5, 15 min) before and after the timing is printed and stored: on a shared machine,
ratios grow with the load, so compare runs at similar load.

Command: ``python benchmarks/optim_overhead.py [--steps 200] [--repeats 7]`` (about a minute on 2 CPU
cores). Writes ``benchmarks/results/optim_overhead-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import optax
from flax import nnx

from nestlearn import optim
from nestlearn.nn import MLP

LR = 0.01


def transforms():
    sgdm = optax.sgd(LR, momentum=0.9)
    first_layer = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: "slow" if "0" in str(path[:2]) else "fast", p
    )
    return {
        "sgd_momentum": (sgdm, None),
        "period_schedule(1,4)": (
            optim.period_schedule(
                {"fast": optax.sgd(LR, momentum=0.9), "slow": optax.sgd(LR, momentum=0.9)},
                {"fast": 1, "slow": 4},
                first_layer,
            ),
            None,
        ),
        "consolidation(3 levels)": (optim.consolidation(sgdm, [5, 20], [0.5, 0.5]), 3),
        "consolidation_in_state(3)": (optim.consolidation_in_state(sgdm, [5, 20], [0.5, 0.5]), None),
        "lookahead(optax)": (optax.lookahead(sgdm, 5, 0.5), "lookahead"),
        "delta_momentum": (optim.delta_momentum(LR, 0.9, 1.0), None),
        "deep_momentum": (optim.deep_momentum(LR, 0.01), None),
        "m3": (optim.m3(1e-3), None),
    }


def build(tx, levels, graphdef, params, x, y, steps):
    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if levels == "lookahead":
        p0 = optax.LookaheadParams.init_synced(params)
        fast = lambda p: p.fast
    elif levels:
        p0 = optim.LevelParams.init_synced(params, levels)
        fast = lambda p: p.fastest
    else:
        p0 = params
        fast = lambda p: p

    def run(p, s):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(fast(p))
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(step, (p, s), None, length=steps)
        return p, s

    return jax.jit(run), p0, tx.init(p0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    key = jax.random.PRNGKey(0)
    graphdef, params = nnx.split(MLP(784, (256, 256), 10, rngs=nnx.Rngs(0)), nnx.Param)
    x = jax.random.normal(key, (64, 784))
    y = jax.random.randint(jax.random.fold_in(key, 1), (64,), 0, 10)
    compiled = {}
    for name, (tx, levels) in transforms().items():
        with jax.numpy_dtype_promotion("standard"):
            fn, p, s = build(tx, levels, graphdef, params, x, y, args.steps)
            jax.block_until_ready(fn(p, s))
        compiled[name] = (fn, p, s)
    load_before = os.getloadavg()
    # Interleave the repeats so that load from other users of the machine hits every transform alike.
    times = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, (fn, p, s) in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(p, s))
            times[name].append((time.perf_counter() - t0) / args.steps)
    load_after = os.getloadavg()
    base = statistics.median(times["sgd_momentum"])
    rows = []
    print(f"{'transform':26s} {'us/step':>10s} {'ratio':>7s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "transform": name,
                "us_per_step": med * 1e6,
                "ratio": med / base,
                "all_us": [t * 1e6 for t in ts],
            }
        )
        print(f"{name:26s} {med * 1e6:10.1f} {med / base:7.3f}")
    print(f"load average before {load_before}, after {load_after}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"optim_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {
        "steps": args.steps,
        "repeats": args.repeats,
        "device": str(jax.devices()[0]),
        "machine": platform.node(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "load_before": load_before,
        "load_after": load_after,
        "note": "shared machine; medians of interleaved repeats",
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
