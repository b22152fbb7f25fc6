"""The associative-memory primitive alone: ``memory_chunked`` against ``memory_scan`` (issue 6).

    python benchmarks/memory_primitive.py [--lengths 256 1024 4096] [--chunks 16 64] [--reps 7]
        [--sequences 8] [--d-head 32] [--out benchmarks/results/memory_primitive_cpu.json]

Times the memory recurrence without anything around it (no projections, convolution, norms, MLPs,
embedding or head, which both paths share): ``--sequences`` independent (batch x head) sequences of
``d_head``-dimensional unit-norm keys and queries, vmapped, for the two matrix memories the issue names:
linear attention (``objective="dot"``, no gate, rate 1) and the delta rule (``objective="l2"``, online,
rates in (0, 1)). Inference is the jitted read-out; training the jitted gradient of a squared read-out
with respect to queries, keys and values. Both paths are interleaved (alternating order) and timed after
a warm-up; tokens/s = sequences x length / median time. Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nestlearn.experiment import write_json
from nestlearn.nn import MemorySpec, initial_state, memory_chunked, memory_scan

HERE = Path(__file__).resolve().parent
MEMORIES = {"linear_attention": "dot", "delta_rule": "l2"}


def inputs(length: int, sequences: int, d: int):
    ks = jax.random.split(jax.random.PRNGKey(length), 4)
    unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (sequences, length, d)))
    k = unit(jax.random.normal(ks[1], (sequences, length, d)))
    v = jax.random.normal(ks[2], (sequences, length, d))
    lr = jax.nn.sigmoid(jax.random.normal(ks[3], (sequences, length)))
    return q, k, v, lr


def programs(objective: str, chunk: int, path: str, lr, d: int, sequences: int):
    spec = MemorySpec("linear", objective, chunk=chunk)
    run = memory_chunked if path == "chunk" else memory_scan
    state = initial_state(spec, (jnp.zeros((sequences, d, d)),))
    rate = jnp.ones_like(lr) if objective == "dot" else lr
    ones = jnp.ones_like(lr)
    read = jax.vmap(lambda s, q, k, v, r, a: run(spec, s, q, k, v, r, a)[0])
    infer = jax.jit(lambda q, k, v: read(state, q, k, v, rate, ones))
    train = jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(read(state, q, k, v, rate, ones) ** 2), argnums=(0, 1, 2))
    )
    return {"inference": infer, "training": train}


def timed(fn, args, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--chunks", nargs="+", type=int, default=[16, 64])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--d-head", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "results" / "memory_primitive_cpu.json"))
    args = p.parse_args(argv)
    load_start, start = os.getloadavg(), time.time()
    rows = []
    for name, objective in MEMORIES.items():
        for length in args.lengths:
            q, k, v, lr = inputs(length, args.sequences, args.d_head)
            for chunk in args.chunks:
                progs = {
                    path: programs(objective, chunk, path, lr, args.d_head, args.sequences)
                    for path in ("chunk", "token")
                }
                for mode in ("inference", "training"):
                    times = {"chunk": [], "token": []}
                    for path in times:
                        jax.block_until_ready(progs[path][mode](q, k, v))  # compile and warm up
                    for rep in range(args.reps):  # interleaved, alternating order
                        for path in ("chunk", "token") if rep % 2 == 0 else ("token", "chunk"):
                            times[path] += timed(progs[path][mode], (q, k, v), 1)
                    med = {path: statistics.median(t) for path, t in times.items()}
                    tps = {path: args.sequences * length / m for path, m in med.items()}
                    rows.append({"memory": name, "length": length, "chunk": chunk, "mode": mode,
                                 "chunk_s": med["chunk"], "token_s": med["token"], "chunk_tok_s": tps["chunk"],
                                 "token_tok_s": tps["token"], "speedup": med["token"] / med["chunk"],
                                 "times": times})  # fmt: skip
                    r = rows[-1]
                    print(f"{name:>16} {mode:>9} T={length:<5} chunk {chunk:<3} chunk {r['chunk_tok_s']:>11,.0f} "
                          f"tok/s  token {r['token_tok_s']:>11,.0f} tok/s  speed-up {r['speedup']:.2f}x", flush=True)  # fmt: skip
    meta = dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__, cpu_count=os.cpu_count(),
                load_start=load_start, load_end=os.getloadavg(), wall_s=time.time() - start,
                settings=vars(args))  # fmt: skip
    write_json(Path(args.out), {"meta": meta, "rows": rows})
    print(
        "\n| memory | mode | length | chunk | chunk tok/s | token tok/s | speed-up |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(f"| {r['memory']} | {r['mode']} | {r['length']} | {r['chunk']} | {r['chunk_tok_s']:,.0f} | "
              f"{r['token_tok_s']:,.0f} | {r['speedup']:.2f}x |")  # fmt: skip
    print(f"load {load_start} -> {os.getloadavg()}; wrote {args.out}")


if __name__ == "__main__":
    main()
