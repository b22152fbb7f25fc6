"""MAML speed on sinusoid regression: nestlearn, a hand-written JAX reference and learn2learn 0.2.0, in one run.

    python benchmarks/maml_sinusoid.py [--peer-python PY] [--blocks 7] [--skip-peer] [--e2e-runs 3]

Setup (REFERENCES.md, Finn et al. 2017): amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5], K = 10
support and 10 query points per task, MSE, network 1-40-40-1 ReLU, one inner SGD step at 0.01,
meta-batch 25, Adam 1e-3 on the initialisation; second order (through the inner step) and first
order. Every side trains one seed continuously and draws fresh tasks every meta-iteration.

Sides: nestlearn (``meta.MAML`` on ``meta.MetaTrainer``, as a user writes it, which also records the
gradient, update and parameter norms), nestlearn with ``loss_pre=True`` (the query loss before
adaptation recorded too: one more forward pass per task), and a hand-written reference written below
without the library: ``jax.grad`` through one inner ``jax.grad`` (``stop_gradient`` on it for first
order), tasks under ``vmap``, iterations under ``scan``, the same task sampler, initialisation and outer
Adam, one ``jit``.

Measured: meta-iterations per second in each of ``--blocks`` timing blocks after a warm-up, the three
JAX sides interleaved block by block, median over blocks; the ratio of the reference's median to each
nestlearn median; XLA's op counts and flops of the compiled chunk programs; end to end (a fresh process
that imports, compiles and runs ``--chunk`` meta-iterations, to its results), cold (an empty
compilation cache) and warm (the cache the cold run filled), median of ``--e2e-runs`` processes; the
import time of ``jax, flax.nnx, optax`` and what ``nestlearn.meta`` adds (median of fresh processes);
the load average of the machine next to each. The peer runs ``--peer-iters`` per block in
learn2learn's Python loop over tasks (torch limited to 2 threads); it needs ``bash
benchmarks/peers/install_learn2learn.sh PEER/bin/python``. Writes benchmarks/results/maml_sinusoid.json
and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from permuted_mnist import import_times  # noqa: E402 (median of fresh processes, as there)

N_TASKS, K, INNER_LR, OUTER_LR = 25, 10, 0.01, 1e-3


# ------------------------------------------------------------------------------------ the two JAX sides


def nestlearn_trainer(first_order: bool, chunk: int, *, loss_pre: bool = False, seed: int = 0):
    """nestlearn's MAML as a user writes it: the trainer and its initial state."""
    import optax
    from flax import nnx

    from nestlearn import meta, nn, tasks

    apply, params = meta.functional(nn.MLP(1, (40, 40), 1, init="torch", rngs=nnx.Rngs(seed)))
    maml = meta.MAML(meta.mse_loss(apply), optax.sgd(INNER_LR), steps=1, first_order=first_order)
    family = tasks.Sinusoid(k_support=K, k_query=K)
    trainer = meta.MetaTrainer(
        maml, optax.adam(OUTER_LR), lambda key: family.sample(key, N_TASKS), n_iters=chunk, loss_pre=loss_pre
    )
    return trainer, trainer.init(maml.init(params)), params


def reference_program(first_order: bool, chunk: int):
    """The hand-written MAML: ``chunk`` meta-iterations in one jitted ``scan``, no library but optax's Adam.

    Returns ``(run, init)``: ``init(params, key)`` builds the carry from the same initial parameters
    (nestlearn's ``nnx.Param`` tree, read once), ``run(carry) -> (carry, query losses)``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    outer = optax.adam(OUTER_LR)

    def net(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return h @ p["w3"] + p["b3"]

    def mse(p, x, y):
        return jnp.mean(jnp.square(net(p, x) - y))

    def adapted_query_loss(p, xs, ys, xq, yq):
        g = jax.grad(mse)(p, xs, ys)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return mse(jax.tree.map(lambda w, d: w - INNER_LR * d, p, g), xq, yq)

    def sample(key):  # amplitude, phase and points drawn in the order nestlearn's Sinusoid draws them
        k_fn, k_pts = jax.random.split(key)
        k_a, k_ph = jax.random.split(k_fn)
        a = jax.random.uniform(k_a, (N_TASKS, 1, 1), minval=0.1, maxval=5.0)
        ph = jax.random.uniform(k_ph, (N_TASKS, 1, 1), minval=0.0, maxval=jnp.pi)
        k_s, k_q = jax.random.split(k_pts)
        xs = jax.random.uniform(k_s, (N_TASKS, K, 1), minval=-5.0, maxval=5.0)
        xq = jax.random.uniform(k_q, (N_TASKS, K, 1), minval=-5.0, maxval=5.0)
        return xs, a * jnp.sin(xs - ph), xq, a * jnp.sin(xq - ph)

    def meta_loss(p, key):
        return jnp.mean(jax.vmap(adapted_query_loss, (None, 0, 0, 0, 0))(p, *sample(key)))

    def iteration(carry, _):
        p, opt_state, step, key = carry
        loss, g = jax.value_and_grad(meta_loss)(p, jax.random.fold_in(key, step))
        updates, opt_state = outer.update(g, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state, step + 1, key), loss

    run = jax.jit(lambda carry: jax.lax.scan(iteration, carry, length=chunk), donate_argnums=0)

    def init(params, key):
        layers = params["layers"]
        p = {
            f"{n}{i + 1}": jnp.array(layers[i][leaf][...])
            for i in range(3)
            for n, leaf in (("w", "kernel"), ("b", "bias"))
        }
        return p, outer.init(p), jnp.zeros((), jnp.int32), jnp.array(key)

    return run, init


def reference_params(key) -> dict:
    """1-40-40-1 parameters drawn as PyTorch's ``nn.Linear`` does (uniform in ±1/sqrt(fan_in)), in the
    layout of nestlearn's ``nnx.Param`` tree, for the reference's own end-to-end process."""
    import jax

    widths, layers = (1, 40, 40, 1), []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        k_w, k_b = jax.random.split(jax.random.fold_in(key, i))
        bound = fan_in**-0.5
        layers.append({"kernel": jax.random.uniform(k_w, (fan_in, fan_out), minval=-bound, maxval=bound),
                       "bias": jax.random.uniform(k_b, (fan_out,), minval=-bound, maxval=bound)})  # fmt: skip
    return {"layers": layers}


def hlo_summary(compiled) -> dict:
    """Op counts of the optimised HLO (all ops, fusions, dots) and XLA's flops per meta-iteration."""
    ops = collections.Counter(
        m.group(1) for m in re.finditer(r"= [^ ]+ ([a-z][a-z\-]*)\(", compiled.as_text())
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "ops": sum(ops.values()),
        "fusions": ops["fusion"],
        "dots": ops["dot"],
        "reduces": ops["reduce"] + ops["reduce-window"],
        # XLA's cost analysis counts a loop's body once: the flops of one meta-iteration
        "flops_per_iter": float(cost.get("flops", float("nan"))) if cost else float("nan"),
    }


def interleaved_rates(first_order: bool, blocks: int, chunk: int) -> dict:
    """Meta-iterations per second of the three JAX sides, block by block in turn."""
    import jax

    key = jax.random.PRNGKey(0)
    sides = {}
    for name, pre in (("nestlearn", False), ("nestlearn_loss_pre", True)):
        trainer, state, params = nestlearn_trainer(first_order, chunk, loss_pre=pre)
        compiled = trainer._run.lower(state, trainer.learner, key).compile()
        sides[name] = {"hlo": hlo_summary(compiled), "state": state,
                       "call": lambda st, tr=trainer: tr.run(st, key)}  # fmt: skip
    run, init = reference_program(first_order, chunk)
    carry = init(params, key)
    sides["reference"] = {"hlo": hlo_summary(run.lower(carry).compile()), "state": carry, "call": run}
    for side in sides.values():  # warm-up: compile, one chunk
        t = time.perf_counter()
        side["state"], _ = jax.block_until_ready(side["call"](side["state"]))
        side["first_call_seconds"] = time.perf_counter() - t
        side["rates"] = []
    for _ in range(blocks):
        for side in sides.values():
            t = time.perf_counter()
            side["state"], out = jax.block_until_ready(side["call"](side["state"]))
            side["rates"].append(chunk / (time.perf_counter() - t))
            side["last_loss"] = float((out["loss_post"] if isinstance(out, dict) else out)[-100:].mean())
    ref = statistics.median(sides["reference"]["rates"])
    report = {}
    for name, side in sides.items():
        med = statistics.median(side["rates"])
        report[name] = {
            "median_iters_per_s": med,
            "block_iters_per_s": side["rates"],
            "reference_over_this": ref / med,
            "first_call_seconds": side["first_call_seconds"],
            "final_query_mse": side["last_loss"],
            "hlo": side["hlo"],
        }
    report["load_average"] = os.getloadavg()
    return report


# ------------------------------------------------------------------------- end to end and import time

CHILD = "--e2e-child"


def e2e_child(side: str, first_order: bool, chunk: int, out: str) -> None:
    """One fresh process: imports, builds, compiles and runs one chunk, then writes the results."""
    import jax

    key = jax.random.PRNGKey(0)
    if side == "nestlearn":
        trainer, state, _ = nestlearn_trainer(first_order, chunk)
        state, metrics = trainer.run(state, key)
        loss = float(metrics["loss_post"][-100:].mean())
    else:  # no nestlearn import: the persistent cache set up by hand, as nestlearn sets it up
        jax.config.update("jax_compilation_cache_dir", os.environ["NESTLEARN_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        run, init = reference_program(first_order, chunk)
        _, losses = run(init(reference_params(jax.random.PRNGKey(0)), key))
        loss = float(losses[-100:].mean())
    Path(out).write_text(json.dumps({"final_query_mse": loss, "results_written_at": time.time()}))


def end_to_end(side: str, first_order: bool, chunk: int, cache: Path, runs: int) -> dict:
    """Process start to results written: once with ``cache`` empty (cold), then ``runs`` times warm."""
    env = {**os.environ, "NESTLEARN_CACHE_DIR": str(cache)}
    times = []
    for _ in range(1 + runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, __file__, CHILD, side, str(int(first_order)), str(chunk), str(out)]
            start = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            times.append(json.loads(out.read_text())["results_written_at"] - start)
    return {"cold_s": times[0], "warm_s": statistics.median(times[1:]), "warm_runs_s": times[1:],
            "load_average": os.getloadavg()}  # fmt: skip


def peer_rates(python: str, order: int, blocks: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [
            python,
            str(HERE / "peers" / "l2l_maml_sinusoid.py"),
            *("--order", str(order), "--warmup", "20", "--blocks", str(blocks)),
            *("--iters-per-block", str(iters), "--threads", "2", "--json", str(out)),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"peer failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        return {**json.loads(out.read_text()), "load_average": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", default=sys.executable, help="interpreter with learn2learn 0.2.0")
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--chunk", type=int, default=2000, help="meta-iterations per timed call")
    p.add_argument("--peer-iters", type=int, default=50, help="peer meta-iterations per timed block")
    p.add_argument("--e2e-runs", type=int, default=3, help="warm-cache end-to-end processes (0: skip)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "maml_sinusoid.json"))
    args = p.parse_args()
    import jax

    from nestlearn.experiment import write_json

    report = {"machine": {"cpus": os.cpu_count(), "jax": jax.__version__}, "orders": {}}
    report["imports"] = import_times(["nestlearn.meta", "nestlearn.tasks", "nestlearn.nn"])
    for order in (2, 1):
        row = interleaved_rates(order == 1, args.blocks, args.chunk)
        if args.e2e_runs:
            with tempfile.TemporaryDirectory() as cache:
                for side in ("nestlearn", "reference"):
                    row[side]["end_to_end"] = end_to_end(
                        side, order == 1, args.chunk, Path(cache) / side, args.e2e_runs
                    )
        if not args.skip_peer:
            row["learn2learn"] = peer_rates(args.peer_python, order, args.blocks, args.peer_iters)
            row["speedup"] = row["nestlearn"]["median_iters_per_s"] / row["learn2learn"]["median_iters_per_s"]
        report["orders"][str(order)] = row
        print(f"order {order}: done", file=sys.stderr)
    write_json(Path(args.out), report)
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "| MAML sinusoid, meta-batch 25 | nestlearn it/s | nestlearn, loss_pre=True | hand-written JAX it/s "
        "| hand-written / nestlearn | learn2learn it/s | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for order, row in report["orders"].items():
        n, pre, ref, peer = (
            row["nestlearn"],
            row["nestlearn_loss_pre"],
            row["reference"],
            row.get("learn2learn"),
        )
        name = "second order" if order == "2" else "first order"
        lines.append(
            f"| {name} | {n['median_iters_per_s']:,.0f} | {pre['median_iters_per_s']:,.0f} | "
            f"{ref['median_iters_per_s']:,.0f} | {n['reference_over_this']:.2f}x / "
            f"{pre['reference_over_this']:.2f}x | "
            + (f"{peer['median_iters_per_s']:.1f} | " if peer else "- | ")
            + f"{row['load_average'][0]:.1f} |"
        )
    lines += ["", "| compiled chunk program (per order) | ops | fusions | dots | reductions | flops / iteration |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for order, row in report["orders"].items():
        for side in ("nestlearn", "nestlearn_loss_pre", "reference"):
            h = row[side]["hlo"]
            lines.append(f"| order {order}, {side} | {h['ops']} | {h['fusions']} | {h['dots']} | {h['reduces']} | "
                         f"{h['flops_per_iter']:,.0f} |")  # fmt: skip
    if any("end_to_end" in row["nestlearn"] for row in report["orders"].values()):
        lines += [
            "",
            "| end to end, one chunk | cold cache (s) | warm cache (s), median | load avg |",
            "|---|---|---|---|",
        ]
        for order, row in report["orders"].items():
            for side in ("nestlearn", "reference"):
                e = row[side].get("end_to_end")
                if e:
                    lines.append(f"| order {order}, {side} | {e['cold_s']:.1f} | {e['warm_s']:.1f} | "
                                 f"{e['load_average'][0]:.1f} |")  # fmt: skip
    imp = report["imports"]
    lines += ["", f"import jax, flax.nnx, optax: {imp['base_s']:.2f} s; then {', '.join(imp['modules'])}: "
              f"+{imp['extra_s']:.2f} s (median of fresh processes, load avg {imp['load_average'][0]:.1f})"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        e2e_child(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5])
    else:
        main()
