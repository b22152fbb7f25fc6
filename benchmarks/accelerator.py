"""The headline workloads on one accelerator, in one call, as one table (issue 14).

    python benchmarks/accelerator.py [--peer-python PY] [--budget 420] [--out benchmarks/results/accelerator.json]
    python benchmarks/accelerator.py --tiny     # the same sections at toy sizes (what the tests run, on CPU)

Four sections, each timed on the default JAX device (a GPU or TPU when one is there); the peers run on
the same device (``--device cuda`` when ``torch.cuda.is_available()`` in the peer interpreter):

1. **Permuted MNIST, naive, 1 / 32 / 256 seeds in one program** (the workload of ``permuted_mnist.py``:
   bundled 5k MNIST, 10 tasks, MLP 784-256-256-10, SGD 0.01 momentum 0.9, batch 64, 2 epochs per task,
   every task evaluated after each). For each seed count: the first call (compilation included) and the
   median of repeated calls of the compiled program; run-seconds per seed; and a check that seed 0's
   accuracy matrix is the same in every program (vmapping more runs must not change a run). Peers: a plain
   PyTorch loop and Avalanche 0.6 train ``--peer-seeds`` seeds one after another on the same device; their
   per-seed time times the seed count is what they would need for the same runs (marked *est.*).
2. **An EWC sweep of 64 runs** (4 strengths x 16 seeds, permuted MNIST 5 tasks, 1 epoch) as one program
   against the same 64 runs one at a time (a single-run program compiled once and called 64 times), with
   the largest difference between the two accuracy matrices.
3. **MAML throughput on sinusoids** (Finn et al.'s setup: 1-40-40-1, one inner SGD step at 0.01, meta-batch
   25, Adam 1e-3), second and first order: meta-iterations/s against learn2learn 0.2.0.
4. **Memory models chunkwise against per-token**, 1k to 16k tokens, training step (``memory_tokens.py``'s
   cells: DeltaNet and Titans, d_model 64, 2 layers, batch 4), tokens/s of each path and their ratio.

Every section starts only while time is left of ``--budget`` seconds (default 7 minutes, inside the
8-minute allowance of a lent device); a skipped cell says so in the table. The JSON holds every number,
the device, versions and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from nestlearn import continual, meta, nn, tasks
from nestlearn.experiment import write_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from permuted_mnist import write_peer_data  # noqa: E402 (the peers' data, as the permuted benchmark writes it)

FULL = dict(
    seeds=(1, 32, 256),
    tasks=10,
    epochs=2.0,
    hidden=256,
    repeats=3,
    sweep_tasks=5,
    sweep_epochs=1.0,
    sweep_values=(1.0, 10.0, 100.0, 1000.0),
    sweep_seeds=16,
    maml_chunk=1000,
    maml_blocks=5,
    lengths=(1024, 4096, 16384),
    memory_models=("deltanet", "titans"),
    d_model=64,
    layers=2,
)
TINY = dict(
    seeds=(1, 3),
    tasks=2,
    epochs=0.1,
    hidden=16,
    repeats=1,
    sweep_tasks=2,
    sweep_epochs=0.05,
    sweep_values=(1.0, 100.0),
    sweep_seeds=2,
    maml_chunk=20,
    maml_blocks=2,
    lengths=(32,),
    memory_models=("deltanet",),
    d_model=8,
    layers=1,
)


class Budget:
    """Seconds left of the whole call; sections ask before they start a cell."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def mlp_learner(size: dict, strategy, *, tasks_epochs: float, stream) -> continual.Learner:
    steps = continual.steps_for_epochs(tasks_epochs, int(stream.train_n[0]), 64)
    h = size["hidden"]
    return continual.Learner(
        lambda rngs: nn.MLP(stream.input_dim, (h, h), 10, init="torch", rngs=rngs),
        optax.sgd(0.01, momentum=0.9),
        strategy,
        continual.TrainConfig(steps_per_task=steps, batch_size=64),
    )


def peer_device(python: str) -> str | None:
    """``"cuda"`` or ``"cpu"`` for a peer interpreter with torch, ``None`` without one."""
    probe = "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_peer(python: str, script: str, args: list[str], device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        flag = "--json" if script.startswith("l2l") else "--out"
        cmd = [python, str(HERE / "peers" / script), *args, "--device", device, flag, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": f"{script} exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}
        return json.loads(out.read_text())


def permuted(size: dict, budget: Budget, peer: tuple[str, str] | None, peer_seeds: int) -> list[dict]:
    stream = tasks.permuted_mnist(size["tasks"], seed=0)
    rows, seed0 = [], None
    for n in size["seeds"]:
        if budget.left() < 30:
            rows.append({"workload": f"permuted MNIST naive, {n} seeds", "skipped": "budget"})
            continue
        learner = mlp_learner(size, continual.Naive(), tasks_epochs=size["epochs"], stream=stream)
        seeds = list(range(n))
        first, first_s = _timed(lambda: learner.run(stream, seeds, progress=False).acc_matrix)  # noqa: B023
        times = [_timed(lambda: learner.run(stream, seeds, progress=False).acc_matrix)[1] for _ in range(size["repeats"])]  # noqa: B023 # fmt: skip
        acc = np.asarray(first)
        seed0 = acc[0] if seed0 is None else seed0
        run_s = statistics.median(times)
        rows.append(
            {
                "workload": f"permuted MNIST naive, {n} seeds",
                "nestlearn_first_call_s": first_s,
                "nestlearn_s": run_s,
                "nestlearn_s_per_seed": run_s / n,
                "final_avg_acc": float(acc[:, -1].mean()),
                "seed0_max_abs_diff": float(np.abs(acc[0] - seed0).max()),
            }
        )
    if peer is not None:
        python, device = peer
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "permuted.npz"
            write_peer_data(data, stream)
            for name, script in (("torch_loop", "torch_loop.py"), ("avalanche", "avalanche_naive.py")):
                if budget.left() < 60:
                    rows.append({"workload": f"permuted MNIST naive, {name}", "skipped": "budget"})
                    continue
                res = run_peer(python, script, ["--data", str(data), "--seeds", str(peer_seeds)], device)
                per_seed = statistics.median(res["train_seconds"]) if "train_seconds" in res else None
                for row in rows:
                    if "nestlearn_s" in row and per_seed is not None:
                        n = int(row["workload"].split(", ")[1].split()[0])
                        row[f"{name}_s_est"] = per_seed * n
                        row[f"{name}_final_avg_acc"] = float(np.mean(res["final_avg_acc"]))
                if "error" in res:
                    rows.append({"workload": f"permuted MNIST naive, {name}", "skipped": res["error"]})
    return rows


def ewc_sweep(size: dict, budget: Budget) -> list[dict]:
    values, n_seeds = size["sweep_values"], size["sweep_seeds"]
    label = f"EWC sweep, {len(values) * n_seeds} runs"
    if budget.left() < 60:
        return [{"workload": label, "skipped": "budget"}]
    stream = tasks.permuted_mnist(size["sweep_tasks"], seed=0)
    learner = mlp_learner(size, continual.EWC(lam=1.0), tasks_epochs=size["sweep_epochs"], stream=stream)
    seeds = list(range(n_seeds))
    swept, one_s = _timed(
        lambda: learner.run(stream, seeds, sweep={"lam": values}, progress=False).acc_matrix
    )
    single = mlp_learner(size, continual.EWC(lam=1.0), tasks_epochs=size["sweep_epochs"], stream=stream)
    start, parts = time.perf_counter(), []
    for v in values:
        for s in seeds:
            parts.append(
                np.asarray(single.run(stream, [s], sweep={"lam": [v]}, progress=False).acc_matrix[0])
            )
    each_s = time.perf_counter() - start
    return [
        {
            "workload": label,
            "nestlearn_s": one_s,
            "one_at_a_time_s": each_s,
            "speedup": each_s / one_s,
            "max_abs_acc_difference": float(np.nanmax(np.abs(np.stack(parts) - np.asarray(swept)))),
        }
    ]


def maml_rate(order: int, chunk: int, blocks: int) -> dict:
    apply, params = meta.functional(nn.MLP(1, (40, 40), 1, init="torch", rngs=nnx.Rngs(0)))
    maml = meta.MAML(meta.mse_loss(apply), optax.sgd(0.01), steps=1, first_order=order == 1)
    family = tasks.Sinusoid(k_support=10, k_query=10)
    trainer = meta.MetaTrainer(maml, optax.adam(1e-3), lambda key: family.sample(key, 25), n_iters=chunk)
    state = trainer.init(maml.init(params))
    key = jax.random.PRNGKey(0)
    (state, metrics), compile_s = _timed(lambda: trainer.run(state, key))
    rates = []
    for _ in range(blocks):
        (state, metrics), dt = _timed(lambda: trainer.run(state, key))  # noqa: B023
        rates.append(chunk / dt)
    return {
        "it_per_s": statistics.median(rates),
        "first_call_s": compile_s,
        "loss": float(metrics["loss_post"][-1]),
    }


def maml(size: dict, budget: Budget, peer: tuple[str, str] | None) -> list[dict]:
    rows = []
    for order in (2, 1):
        label = f"MAML sinusoid, {'second' if order == 2 else 'first'} order"
        if budget.left() < 30:
            rows.append({"workload": label, "skipped": "budget"})
            continue
        mine = maml_rate(order, size["maml_chunk"], size["maml_blocks"])
        row = {
            "workload": label,
            "nestlearn_it_per_s": mine["it_per_s"],
            "first_call_s": mine["first_call_s"],
        }
        if peer is not None and budget.left() > 60:
            python, device = peer
            res = run_peer(
                python,
                "l2l_maml_sinusoid.py",
                ["--order", str(order), "--warmup", "10", "--blocks", "3", "--iters-per-block", "30"],
                device,
            )
            if "median_iters_per_s" in res:
                row["learn2learn_it_per_s"] = res["median_iters_per_s"]
                row["speedup"] = mine["it_per_s"] / res["median_iters_per_s"]
            else:
                row["peer_error"] = res.get("error")
        rows.append(row)
    return rows


def memory(size: dict, budget: Budget) -> list[dict]:
    import memory_tokens

    if budget.left() < 45:
        return [{"workload": "memory models chunk vs token", "skipped": "budget"}]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        argv = [
            *("--models", *size["memory_models"]),
            *("--lengths", *map(str, size["lengths"])),
            *("--modes", "training", "--reps", "3", "--d-model", str(size["d_model"])),
            *("--layers", str(size["layers"])),
            *("--total-cap", str(max(budget.left() - 20, 10)), "--cell-cap", "30", "--out", str(out)),
        ]
        memory_tokens.main(argv)
        report = json.loads(out.read_text())
    by_cell: dict[tuple, dict] = {}
    for r in report["rows"]:
        cell = by_cell.setdefault((r["model"], r["length"]), {})
        cell[r["path"]] = r.get("tokens_per_s") if r["status"] == "ok" else None
    rows = []
    for (model, length), paths in by_cell.items():
        chunk, token = paths.get("chunk"), paths.get("token")
        rows.append(
            {
                "workload": f"{model} training, {length} tokens",
                "chunk_tokens_per_s": chunk,
                "token_tokens_per_s": token,
                "speedup": chunk / token if chunk and token else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    lines = ["| workload | nestlearn | reference / peer | ratio | check |", "|---|---|---|---|---|"]
    for r in rows:
        w = r["workload"]
        if "skipped" in r:
            lines.append(f"| {w} | skipped: {r['skipped']} | | | |")
        elif "seed0_max_abs_diff" in r:
            peers = ", ".join(
                f"{p} {r[f'{p}_s_est']:.1f} s est." for p in ("torch_loop", "avalanche") if f"{p}_s_est" in r
            )
            best = min(
                (r[f"{p}_s_est"] for p in ("torch_loop", "avalanche") if f"{p}_s_est" in r), default=None
            )
            ratio = f"{best / r['nestlearn_s']:.1f}x" if best else "-"
            lines.append(
                f"| {w} | {r['nestlearn_s']:.2f} s ({f(r['nestlearn_first_call_s'], '.1f')} s first call), "
                f"acc {r['final_avg_acc']:.3f} | {peers or '-'} | {ratio} | seed 0 same in every "
                f"program: max diff {r['seed0_max_abs_diff']:.2g} |"
            )
        elif "one_at_a_time_s" in r:
            lines.append(
                f"| {w} | {r['nestlearn_s']:.1f} s one program | {r['one_at_a_time_s']:.1f} s one at a time | "
                f"{r['speedup']:.1f}x | max acc diff {r['max_abs_acc_difference']:.2g} |"
            )
        elif "nestlearn_it_per_s" in r:
            peer = r.get("learn2learn_it_per_s")
            shown = "-" if peer is None else f"learn2learn {peer:,.1f} it/s"
            ratio = "-" if peer is None else f"{r['speedup']:.0f}x"
            lines.append(f"| {w} | {r['nestlearn_it_per_s']:,.0f} it/s | {shown} | {ratio} | |")
        else:
            lines.append(
                f"| {w} | chunk {f(r['chunk_tokens_per_s'], ',.0f')} tok/s | per-token "
                f"{f(r['token_tokens_per_s'], ',.0f')} tok/s | {f(r['speedup'], '.1f')}x | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU, tests)")
    p.add_argument("--peer-python", default=None, help="interpreter with torch, avalanche-lib, learn2learn")
    p.add_argument("--peer-seeds", type=int, default=2, help="seeds each peer trains, one after another")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole call")
    p.add_argument("--sections", nargs="+", default=["permuted", "sweep", "maml", "memory"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "accelerator.json")
    args = p.parse_args(argv)
    size = TINY if args.tiny else FULL
    budget = Budget(args.budget)
    start, load = time.time(), os.getloadavg()
    peer = None
    if args.peer_python and not args.tiny:
        device = peer_device(args.peer_python)
        peer = (args.peer_python, device) if device else None
        print(f"peers: {args.peer_python} on {device or 'unavailable (no torch)'}", file=sys.stderr)
    rows: list[dict] = []
    sections = {
        "permuted": lambda: permuted(size, budget, peer, args.peer_seeds),
        "sweep": lambda: ewc_sweep(size, budget),
        "maml": lambda: maml(size, budget, peer),
        "memory": lambda: memory(size, budget),
    }
    for name in args.sections:
        rows += sections[name]()
        print(f"{name}: done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    device = jax.devices()[0]
    report = {
        "device": f"{device.platform} {device.device_kind} x{jax.device_count()}",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "load_start": load,
        "load_end": os.getloadavg(),
        "wall_s": time.time() - start,
        "rows": rows,
    }
    report["table"] = markdown(rows)
    write_json(args.out, report)
    print(f"device: {report['device']}, wall {report['wall_s']:.0f} s, load {load[0]:.1f}")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
