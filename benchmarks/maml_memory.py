"""Memory of second-order MAML against the number of inner steps, with and without checkpointing.

    python benchmarks/maml_memory.py [--steps 1,10,50,100] [--meta-batch 2] [--k-shot 100]

Model: MLP 784-256-256-10 ReLU on 5-way MNIST tasks (``tasks.few_shot_mnist``, ``--k-shot`` support and
15 query images per class), inner SGD at 0.01, ``--meta-batch`` tasks vmapped. For each number of inner
steps and each rematerialisation mode of the inner loop (``None``, ``"step"``: ``jax.checkpoint`` per
step, ``"segments"``: the sqrt(N) schedule) the meta-gradient is compiled, not run, and XLA's memory
analysis of the compiled program is read: temporary buffers (what grows with the unroll), arguments and
outputs. Then one call of each program at the largest N checks that the modes agree, and times them.
Writes benchmarks/results/maml_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from nestlearn import meta, nn, tasks
from nestlearn.experiment import write_json

HERE = Path(__file__).resolve().parent
MODES = (None, "step", "segments")
MIB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="1,10,50,100")
    p.add_argument("--meta-batch", type=int, default=2)
    p.add_argument("--k-shot", type=int, default=100)
    p.add_argument("--out", default=str(HERE / "results" / "maml_memory.json"))
    args = p.parse_args()
    steps = [int(s) for s in args.steps.split(",")]

    apply, params = meta.functional(nn.MLP(784, (256, 256), 10, rngs=nnx.Rngs(0)))
    family, _ = tasks.few_shot_mnist(n_way=5, k_shot=args.k_shot, k_query=15)
    batch = family.sample(jax.random.PRNGKey(0), args.meta_batch)
    rows, compiled = [], {}
    for n in steps:
        for mode in MODES:
            maml = meta.MAML(meta.cross_entropy_loss(apply), optax.sgd(0.01), steps=n, checkpoint=mode)
            exe = jax.jit(maml.meta_grad).lower(params, batch).compile()
            mem = exe.memory_analysis()
            rows.append(
                {
                    "inner_steps": n,
                    "checkpoint": mode or "none",
                    "temp_bytes": int(mem.temp_size_in_bytes),
                    "argument_bytes": int(mem.argument_size_in_bytes),
                    "output_bytes": int(mem.output_size_in_bytes),
                }
            )
            compiled[(n, mode)] = exe
            print(f"N={n:4d} checkpoint={mode or 'none':8s} temp {mem.temp_size_in_bytes / MIB:8.1f} MiB")
    n = max(steps)
    grads, seconds = {}, {}
    for mode in MODES:
        exe = compiled[(n, mode)]
        jax.block_until_ready(exe(params, batch))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            grads[mode] = jax.block_until_ready(exe(params, batch))[0]
            times.append(time.perf_counter() - t)
        seconds[mode or "none"] = statistics.median(times)
    diff = {
        mode or "none": max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(grads[mode]), jax.tree.leaves(grads[None]))
        )
        for mode in MODES[1:]
    }
    report = {
        "model": "MLP 784-256-256-10",
        "task": f"5-way {args.k_shot}-shot MNIST, 15 query per class",
        "meta_batch": args.meta_batch,
        "rows": rows,
        "largest_n": n,
        "seconds_at_largest_n": seconds,
        "max_abs_grad_diff_vs_none": diff,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
    write_json(Path(args.out), report)
    print(markdown(report))


def markdown(report: dict) -> str:
    by = {(r["inner_steps"], r["checkpoint"]): r["temp_bytes"] for r in report["rows"]}
    lines = [
        "| inner steps | no checkpoint | `step` | `segments` (sqrt N) | segments / none |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({k[0] for k in by}):
        none, step, seg = by[(n, "none")], by[(n, "step")], by[(n, "segments")]
        lines.append(
            f"| {n} | {none / MIB:.1f} MiB | {step / MIB:.1f} MiB | {seg / MIB:.1f} MiB | {seg / max(none, 1):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
