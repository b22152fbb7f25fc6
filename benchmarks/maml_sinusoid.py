"""MAML speed on sinusoid regression: nestlearn against learn2learn 0.2.0, in one run.

    python benchmarks/maml_sinusoid.py [--peer-python PY] [--blocks 7] [--skip-peer]

Setup (REFERENCES.md, Finn et al. 2017): amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5], K = 10
support and 10 query points per task, MSE, network 1-40-40-1 ReLU, one inner SGD step at 0.01,
meta-batch 25 tasks, Adam 1e-3 on the initialisation; second order (through the inner step) and first
order. Both sides train one seed continuously and draw fresh tasks every meta-iteration.

Measured: meta-iterations per second in each of ``--blocks`` timing blocks after a warm-up (for
nestlearn the warm-up is the compilation of one chunk), the median over blocks, and the ratio of the
medians. nestlearn runs ``--chunk`` meta-iterations per compiled call (tasks sampled inside), the peer
``--peer-iters`` per block in learn2learn's Python loop over tasks (torch limited to 2 threads).
The peer needs ``bash benchmarks/peers/install_learn2learn.sh PEER/bin/python``. Run nothing else
meanwhile: the machine has 2 cores. Writes benchmarks/results/maml_sinusoid.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import optax
from flax import nnx

from nestlearn import meta, nn, tasks
from nestlearn.experiment import write_json

HERE = Path(__file__).resolve().parent


def nestlearn_rates(order: int, blocks: int, chunk: int, seed: int = 0) -> dict:
    """Meta-iterations per second of nestlearn's compiled chunk, one block per call."""
    apply, params = meta.functional(nn.MLP(1, (40, 40), 1, init="torch", rngs=nnx.Rngs(seed)))
    maml = meta.MAML(meta.mse_loss(apply), optax.sgd(0.01), steps=1, first_order=order == 1)
    family = tasks.Sinusoid(k_support=10, k_query=10)
    trainer = meta.MetaTrainer(maml, optax.adam(1e-3), lambda key: family.sample(key, 25), n_iters=chunk)
    state = trainer.init(maml.init(params))
    key = jax.random.PRNGKey(seed)
    t = time.perf_counter()
    state, metrics = jax.block_until_ready(trainer.run(state, key))  # compiles
    compile_s = time.perf_counter() - t
    rates = []
    for _ in range(blocks):
        t = time.perf_counter()
        state, metrics = jax.block_until_ready(trainer.run(state, key))
        rates.append(chunk / (time.perf_counter() - t))
    return {
        "block_iters_per_s": rates,
        "median_iters_per_s": statistics.median(rates),
        "first_call_seconds": compile_s,
        "final_query_mse": float(metrics["loss_post"][-100:].mean()),
        "iters_per_block": chunk,
        "meta_iterations": int(state.step),
    }


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
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", default=sys.executable, help="interpreter with learn2learn 0.2.0")
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--chunk", type=int, default=2000, help="nestlearn meta-iterations per timed call")
    p.add_argument("--peer-iters", type=int, default=50, help="peer meta-iterations per timed block")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "maml_sinusoid.json"))
    args = p.parse_args()
    report = {"machine": {"cpus": _cpus(), "jax": jax.__version__}, "orders": {}}
    for order in (2, 1):
        row = {"nestlearn": nestlearn_rates(order, args.blocks, args.chunk)}
        if not args.skip_peer:
            row["learn2learn"] = peer_rates(args.peer_python, order, args.blocks, args.peer_iters)
            row["speedup"] = row["nestlearn"]["median_iters_per_s"] / row["learn2learn"]["median_iters_per_s"]
        report["orders"][str(order)] = row
        print(f"order {order}: done", file=sys.stderr)
    write_json(Path(args.out), report)
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "| MAML sinusoid, meta-batch 25 | nestlearn it/s | learn2learn it/s | speed-up |",
        "|---|---|---|---|",
    ]
    for order, row in report["orders"].items():
        n, peer = row["nestlearn"], row.get("learn2learn")
        name = "second order" if order == "2" else "first order"
        lines.append(
            f"| {name} | {n['median_iters_per_s']:.0f} | "
            + (f"{peer['median_iters_per_s']:.1f} | {row['speedup']:.0f}x |" if peer else "- | - |")
        )
    return "\n".join(lines)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
