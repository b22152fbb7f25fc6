"""Training steps per second of the convolutional backbones: nestlearn's engine against a plain PyTorch loop.

    python benchmarks/backbones.py [--peer-python PY] [--workloads resnet18,conv4_omniglot,conv4_miniimagenet]
                                   [--impls lax,im2col] [--steps 20] [--blocks 7] [--rounds 2] [--seeds 1]
                                   [--skip-peers]

Workloads (issue 15), batch 32, SGD lr 0.01 momentum 0.9, train-mode BatchNorm, random inputs and labels
drawn from an in-memory pool of 512 examples:
  resnet18             nn.ResNet18 (reduced, nf=20) on 32x32x3, 10 classes (1.1 M parameters);
  conv4_omniglot       nn.Conv4, 64 filters, on 28x28x1, 5 classes;
  conv4_miniimagenet   nn.Conv4, 32 filters (MAML's), on 84x84x3, 5 classes.

nestlearn runs the steps the way a continual run does: a ``continual.Learner`` (Naive) on a one-task
stream, its compiled chunk (``Learner.engine``: ``lax.scan`` over ``--steps`` steps, batches gathered from
the stream on device, BatchNorm statistics carried in the run state) called once per block. PyTorch runs
``benchmarks/peers/torch_backbones.py``: the same networks in a hand-written loop, 2 intra-op threads.
nestlearn is timed with each convolution implementation of ``--impls`` (``lax``: XLA's convolution;
``im2col``: slices + matmul, see ``nn.Conv4(impl=...)``). Each timed block is ``--steps`` steps after one warm-up block (which includes nestlearn's compilation);
the figure is the median over blocks of steps/s. The two sides run one after the other, ``--rounds``
times alternately, so a shared machine's load falls on both; all blocks of all rounds enter the median.
Writes benchmarks/results/backbones.json and prints a markdown table.
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

HERE = Path(__file__).resolve().parent

# name: (input shape, classes, model kwargs)
WORKLOADS = {
    "resnet18": ((32, 32, 3), 10, {"kind": "resnet", "nf": 20}),
    "conv4_omniglot": ((28, 28, 1), 5, {"kind": "conv4", "width": 64}),
    "conv4_miniimagenet": ((84, 84, 3), 5, {"kind": "conv4", "width": 32}),
}


def measure_nestlearn(
    name: str, *, batch: int, steps: int, blocks: int, seeds: int, lr: float, pool: int, impl: str
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from nestlearn import continual, nn
    from nestlearn.tasks import TaskStream
    from nestlearn.tasks._stream import identity_features

    shape, n_classes, kw = WORKLOADS[name]
    if kw["kind"] == "resnet":
        model = lambda rngs: nn.ResNet18(shape, n_classes, nf=kw["nf"], impl=impl, rngs=rngs)
    else:
        model = lambda rngs: nn.Conv4(shape, n_classes, width=kw["width"], impl=impl, rngs=rngs)
    d = int(np.prod(shape))
    rng = np.random.default_rng(0)
    fi, fw = identity_features(1, d)
    stream = TaskStream(
        train_x=jnp.asarray(rng.uniform(size=(pool, d)), jnp.float32),
        train_y=jnp.asarray(rng.integers(0, n_classes, pool), jnp.int32),
        test_x=jnp.zeros((batch, d), jnp.float32),
        test_y=jnp.zeros((batch,), jnp.int32),
        train_idx=jnp.arange(pool, dtype=jnp.int32)[None],
        train_n=jnp.full((1,), pool, jnp.int32),
        test_idx=jnp.arange(batch, dtype=jnp.int32)[None],
        test_n=jnp.full((1,), batch, jnp.int32),
        feature_idx=fi,
        feature_w=fw,
        label_map=jnp.arange(n_classes, dtype=jnp.int32)[None],
        class_mask=jnp.ones((1, n_classes), bool),
        name=name,
        n_classes=n_classes,
    )
    config = continual.TrainConfig(steps_per_task=steps * (blocks + 1), batch_size=batch)
    learner = continual.Learner(model, optax.sgd(lr, momentum=0.9), continual.Naive(), config)
    state = learner.init(stream, list(range(seeds)))
    n_params = sum(
        int(np.prod(x.shape))
        for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: model(nnx.Rngs(0))), nnx.Param))
    )
    n_epochs = learner._n_epochs(stream)
    task = jnp.asarray(0, jnp.int32)
    start = time.perf_counter()
    state, m = learner.engine.run(state, stream, task, n_epochs, count=steps)  # compiles
    jax.block_until_ready((state, m))
    warmup = time.perf_counter() - start
    rates = []
    for _ in range(blocks):
        start = time.perf_counter()
        state, m = learner.engine.run(state, stream, task, n_epochs, count=steps)
        jax.block_until_ready((state, m))
        rates.append(steps / (time.perf_counter() - start))
    return {
        "n_params": n_params,
        "steps_per_s": statistics.median(rates),
        "block_steps_per_s": rates,
        "warmup_block_s": warmup,
        "final_loss": float(np.asarray(m["loss"]).mean()),
        "runs": seeds,
    }


def run_nestlearn(args, names: list[str], impl: str, out: Path) -> dict:
    """Runs this script's nestlearn side in a fresh process (so each round starts cold, like the peer)."""
    cmd = [sys.executable, __file__, "--nestlearn-only", "--workloads", ",".join(names), "--steps", str(args.steps),
           "--blocks", str(args.blocks), "--seeds", str(args.seeds), "--lr", str(args.lr), "--impl", impl, "--json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"nestlearn side failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_peer(args, names: list[str], out: Path) -> dict:
    cmd = [args.peer_python, str(HERE / "peers" / "torch_backbones.py"), "--workloads", ",".join(names),
           "--steps", str(args.steps), "--blocks", str(args.blocks), "--lr", str(args.lr), "--threads", "2",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="nestlearn runs vmapped in one program")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results" / "backbones.json")
    p.add_argument("--nestlearn-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impls", default="lax,im2col", help="nestlearn convolution implementations to time")
    p.add_argument("--impl", default="lax", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    if args.nestlearn_only:
        results = {
            n: measure_nestlearn(
                n,
                batch=32,
                steps=args.steps,
                blocks=args.blocks,
                seeds=args.seeds,
                lr=args.lr,
                pool=512,
                impl=args.impl,
            )
            for n in names
        }
        import jax

        args.json.write_text(
            json.dumps({"jax": jax.__version__, "device": str(jax.devices()[0]), "results": results})
        )
        return
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "config": {
            "batch": 32,
            "steps_per_block": args.steps,
            "blocks": args.blocks,
            "rounds": args.rounds,
            "seeds": args.seeds,
            "lr": args.lr,
        },  # fmt: skip
        "load_before": os.getloadavg(),
        "rounds": [],
    }
    impls = args.impls.split(",")
    sides = [f"nestlearn_{impl}" for impl in impls] + ([] if args.skip_peers else ["torch"])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            round_ = {}
            for impl in impls:
                round_[f"nestlearn_{impl}"] = run_nestlearn(
                    args, names, impl, Path(tmp) / f"nl{r}{impl}.json"
                )
                print(f"round {r}: nestlearn ({impl}) done", flush=True)
            if not args.skip_peers:
                round_["torch"] = run_peer(args, names, Path(tmp) / f"pt{r}.json")
                print(f"round {r}: torch done", flush=True)
            report["rounds"].append(round_)
    report["load_after"] = os.getloadavg()
    table = {}
    for n in names:
        row = {}
        for side in sides:
            rounds = [rd[side]["results"][n] for rd in report["rounds"]]
            blocks = [v for res in rounds for v in res["block_steps_per_s"]]
            row[side] = {
                "steps_per_s": statistics.median(blocks),
                "n_params": rounds[0]["n_params"],
                "warmup_block_s": statistics.median(res["warmup_block_s"] for res in rounds),
            }
        table[n] = row
    report["summary"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nbatch 32, SGD, median of {args.blocks} blocks x {args.rounds} rounds of {args.steps} steps; "
          f"load average {report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after")  # fmt: skip
    print(
        "| workload | params | " + " | ".join(f"{s} steps/s" for s in sides) + " | first block s (compile) |"
    )
    print("|---|---|" + "---|" * (len(sides) + 1))
    for n, row in table.items():
        rates = " | ".join(f"{row[s]['steps_per_s']:.2f}" for s in sides)
        warm = ", ".join(f"{row[s]['warmup_block_s']:.0f}" for s in sides)
        print(f"| {n} | {row[sides[0]]['n_params']:,} | {rates} | {warm} |")
        if len({row[s]["n_params"] for s in sides}) > 1:
            print(f"  warning: parameter counts differ: { {s: row[s]['n_params'] for s in sides} }")


if __name__ == "__main__":
    main()
