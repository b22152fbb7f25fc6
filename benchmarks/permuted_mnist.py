"""Permuted-MNIST benchmark: nestlearn against Avalanche 0.6 and a plain PyTorch loop, in one run.

    python benchmarks/permuted_mnist.py [--peer-python PY] [--seeds 5] [--scaling 1,8,32] [--skip-peers]

Workload (issue #2): the bundled 5k MNIST (stratified 4,000 / 1,000 with seed 0, pixels in [0, 1]),
10 tasks each with its own pixel permutation, MLP 784-256-256-10 ReLU with one shared head, SGD lr 0.01
momentum 0.9, batch 64, 2 epochs per task, every task evaluated after each task, 5 seeds. The peers get
the very same arrays (written here to an .npz) and run their seeds one after another in one process
with torch limited to 2 threads.

Measured, every process started fresh and run one at a time:
  end to end   process start to results written (interpreter, imports, data, compilation included);
  compiled     nestlearn: median of repeated runs of the compiled program (init, training, evaluation);
               peers: their training + evaluation time summed over seeds (imports and data excluded);
  accuracy     final average accuracy (mean of the last row of R), mean over seeds;
  scaling      nestlearn with 1, 8 and 32 seeds in one program: compiled time, peak RSS, XLA's
               memory analysis of the task program.
Writes benchmarks/results/permuted_mnist.json and prints a markdown table. Peers need
``pip install -e '.[bench]'`` (torch 2.14.1, torchvision 0.29.1, avalanche-lib 0.6.0) in the
interpreter given by --peer-python (default: this one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_peer_data(path: Path, stream=None) -> None:
    """A stream (default: the benchmark's, 10 permuted-MNIST tasks), materialised per task for the peers."""
    import jax.numpy as jnp

    from nestlearn import tasks

    stream = tasks.permuted_mnist(10, seed=0) if stream is None else stream
    arrays = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for t in range(stream.n_tasks):
        n = int(stream.train_n[t])
        x, y = stream.train_examples(jnp.full((n,), t), jnp.arange(n))
        tx, ty, valid = stream.test_set(jnp.asarray(t))
        arrays["train_x"].append(np.asarray(x, np.float32))
        arrays["train_y"].append(np.asarray(y, np.int64))
        arrays["test_x"].append(np.asarray(tx)[np.asarray(valid)].astype(np.float32))
        arrays["test_y"].append(np.asarray(ty)[np.asarray(valid)].astype(np.int64))
    np.savez(path, **{k: np.stack(v) for k, v in arrays.items()})


def timed(cmd: list[str], out: Path, env: dict | None = None) -> tuple[dict, float]:
    """Runs a benchmark process; returns its JSON and the wall time from start to results written."""
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    written = result.get("results_written_at")
    return result, (written - start if written else wall)


def summarize(result: dict) -> dict:
    """Final average accuracy over seeds, diverged seeds (nestlearn reports them) left out and counted."""
    acc = np.asarray(result["final_avg_acc"], float)
    ok = np.asarray(result.get("diverged_step", [-1] * acc.size)) < 0
    kept = acc[ok]
    return {
        "final_acc_mean": float(kept.mean()) if kept.size else float("nan"),
        "final_acc_sem": float(kept.std(ddof=1) / np.sqrt(kept.size)) if kept.size > 1 else float("nan"),
        "n_diverged": int((~ok).sum()),
        "final_acc_per_seed": acc.tolist(),
    }


IMPORT_PROBE = """
import importlib, json, sys, time
t0 = time.perf_counter()
import jax, flax.nnx, optax
t1 = time.perf_counter()
for m in sys.argv[1:]:
    importlib.import_module(m)
print(json.dumps([t1 - t0, time.perf_counter() - t1]))
"""
TRAINING_IMPORTS = ["nestlearn", "nestlearn.engine", "nestlearn.tasks", "nestlearn.nn", "nestlearn.continual",
                    "nestlearn.experiment"]  # fmt: skip


def import_times(modules: list[str], runs: int = 5) -> dict:
    """``import jax, flax.nnx, optax``, and what ``modules`` add after it, median of fresh processes."""
    base, extra = [], []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *modules], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"import probe failed:\n{proc.stderr[-3000:]}")
        b, e = json.loads(proc.stdout)
        base.append(b)
        extra.append(e)
    return {"modules": modules, "base_s": statistics.median(base), "extra_s": statistics.median(extra),
            "extra_runs_s": extra, "load_average": os.getloadavg()}  # fmt: skip


def cold_and_warm(cmd: list[str], out: Path, runs: int, env: dict | None = None) -> tuple[dict, dict]:
    """The first process (cold: the compilation cache empty, compiled repeats inside it), then ``runs``
    processes more (warm: ``--repeats 0``); end to end of each, the median of the warm ones."""
    result, cold = timed(cmd, out, env)
    warm_cmd = [*cmd[: cmd.index("--repeats")], "--repeats", "0", *cmd[cmd.index("--repeats") + 2 :]]
    warm = [timed(warm_cmd, out, env)[1] for _ in range(runs)]
    timing = {"end_to_end_cold_s": cold, "end_to_end_s": statistics.median(warm) if warm else cold,
              "end_to_end_warm_runs_s": warm, "load_average": os.getloadavg()}  # fmt: skip
    return result, timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e-runs", type=int, default=3, help="warm-cache end-to-end processes per side")
    p.add_argument("--scaling", default="1,8,32")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-avalanche", action="store_true")
    p.add_argument("--strategy", choices=("naive", "ewc", "replay"), default="naive")
    p.add_argument("--ewc-lambda", type=float, default=100.0)
    p.add_argument("--mem-size", type=int, default=500)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    # --ewc-lambda is in Avalanche's convention (its penalty has no 1/2); nestlearn's side converts it.
    strategy_args = ["--strategy", args.strategy, "--ewc-lambda", str(args.ewc_lambda), "--mem-size", str(args.mem_size),
                     "--avalanche-convention"]  # fmt: skip
    if args.out is None:
        suffix = {"naive": "", "ewc": f"_ewc{args.ewc_lambda:g}", "replay": f"_replay{args.mem_size}"}[
            args.strategy
        ]
        args.out = HERE / "results" / f"permuted_mnist{suffix}.json"
    report: dict = {"seeds": args.seeds, "strategy": args.strategy, "machine": _machine()}
    if args.strategy == "ewc":
        report["ewc_lambda"] = args.ewc_lambda
    if args.strategy == "replay":
        report["mem_size"] = args.mem_size
    report["imports"] = {
        "continual": import_times(["nestlearn.continual"]),
        "training": import_times(TRAINING_IMPORTS),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "permuted_mnist.npz"
        write_peer_data(data)
        nl_out = tmp / "nestlearn.json"
        cmd = [sys.executable, str(HERE / "nestlearn_permuted.py"), "--seeds", str(args.seeds),
               "--repeats", str(args.repeats), "--data", str(data), "--out", str(nl_out), *strategy_args]  # fmt: skip
        # A cache of its own, empty at first: the first process is cold, the next ones warm.
        env = {**os.environ, "NESTLEARN_CACHE_DIR": str(tmp / "cache-nestlearn")}
        nl, timing = cold_and_warm(cmd, nl_out, args.e2e_runs, env)
        report["nestlearn"] = {
            **timing,
            "compiled_s": statistics.median(nl["compiled_seconds"]),
            "compiled_runs_s": nl["compiled_seconds"],
            **summarize(nl),
            "diverged_step": nl["diverged_step"],
        }
        nl_e2e = report["nestlearn"]["end_to_end_s"]
        print(f"nestlearn: end to end cold {timing['end_to_end_cold_s']:.1f}s, warm {nl_e2e:.1f}s, "
              f"compiled {report['nestlearn']['compiled_s']:.1f}s", flush=True)  # fmt: skip
        sides = []
        if args.strategy == "naive":
            ref_out = tmp / "reference.json"
            sides.append(("jax_reference", [sys.executable, str(HERE / "jax_permuted.py"), "--data", str(data),
                          "--seeds", str(args.seeds), "--repeats", str(args.repeats), "--out", str(ref_out),
                          "--cache", str(tmp / "cache-reference")], ref_out))  # fmt: skip
        if not args.skip_peers:
            peers = [] if args.skip_avalanche else [("avalanche", "avalanche_naive.py")]
            if args.strategy == "naive":
                peers.append(("torch_loop", "torch_loop.py"))
            for name, script in peers:
                out = tmp / f"{name}.json"
                cmd = [args.peer_python, str(HERE / "peers" / script), "--data", str(data),
                       "--seeds", str(args.seeds), "--threads", "2", "--out", str(out)]  # fmt: skip
                if name == "avalanche" and args.strategy != "naive":
                    cmd += ["--strategy", args.strategy]
                    cmd += (
                        ["--ewc-lambda", str(args.ewc_lambda)]
                        if args.strategy == "ewc"
                        else ["--mem-size", str(args.mem_size)]
                    )
                sides.append((name, cmd, out))
        for name, cmd, out in sides:
            if name == "jax_reference":
                res, timing = cold_and_warm(cmd, out, args.e2e_runs)
                compiled = statistics.median(res["compiled_seconds"])
            else:  # no compilation cache: every process is the same; the torch loop runs e2e-runs times
                runs = [timed(cmd, out) for _ in range(args.e2e_runs if name == "torch_loop" else 1)]
                res = runs[0][0]
                e2e = [r[1] for r in runs]
                timing = {"end_to_end_s": statistics.median(e2e), "end_to_end_runs_s": e2e,
                          "load_average": os.getloadavg()}  # fmt: skip
                compiled = statistics.median(float(sum(r[0]["train_seconds"])) for r in runs)
            report[name] = {"version": res.get("peer"), **timing, "compiled_s": compiled, **summarize(res)}
            ratio_e2e = report[name]["end_to_end_s"] / nl_e2e
            ratio_compiled = compiled / report["nestlearn"]["compiled_s"]
            report[name]["speedup_end_to_end"] = ratio_e2e
            report[name]["speedup_compiled"] = ratio_compiled
            report[name]["acc_diff_points"] = 100 * (
                report["nestlearn"]["final_acc_mean"] - report[name]["final_acc_mean"]
            )
            print(f"{name}: end to end {report[name]['end_to_end_s']:.1f}s ({ratio_e2e:.2f}x), compiled "
                  f"{compiled:.1f}s ({ratio_compiled:.2f}x)", flush=True)  # fmt: skip
        scaling = []
        for s in [int(v) for v in args.scaling.split(",") if v and args.strategy == "naive"]:
            out = tmp / f"scaling_{s}.json"
            cmd = [sys.executable, str(HERE / "nestlearn_permuted.py"), "--seeds", str(s), "--repeats", "1",
                   "--out", str(out)]  # fmt: skip
            res, e2e = timed(cmd, out)
            row = {
                "seeds": s,
                "compiled_s": res["compiled_seconds"][0],
                "per_seed_s": res["compiled_seconds"][0] / s,
                "end_to_end_s": e2e,
                "peak_rss_mib": res["peak_rss_bytes"] / 2**20,
                "xla_temp_mib": res["compiled_memory"].get("temp_bytes", 0) / 2**20,
                "xla_args_mib": res["compiled_memory"].get("argument_bytes", 0) / 2**20,
            }
            scaling.append(row)
            print(f"scaling {s} seeds: {row['compiled_s']:.1f}s ({row['per_seed_s']:.2f}s/seed), "
                  f"RSS {row['peak_rss_mib']:.0f} MiB, XLA temp {row['xla_temp_mib']:.1f} MiB", flush=True)  # fmt: skip
        report["scaling"] = scaling
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"| {report['seeds']} seeds, 10 tasks | end to end, cold cache (s) | end to end (s) | compiled (s) |"
        " final avg acc | time / nestlearn's, end to end | compiled | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("nestlearn", "jax_reference", "avalanche", "torch_loop"):
        if name not in report:
            continue
        r = report[name]
        e2e = f"{r['speedup_end_to_end']:.2f}x" if "speedup_end_to_end" in r else "-"
        comp = f"{r['speedup_compiled']:.2f}x" if "speedup_compiled" in r else "-"
        cold = f"{r['end_to_end_cold_s']:.1f}" if "end_to_end_cold_s" in r else "-"
        lines.append(
            f"| {r.get('version') or name} | {cold} | {r['end_to_end_s']:.1f} | {r['compiled_s']:.1f} | "
            f"{r['final_acc_mean']:.4f} ± {r['final_acc_sem']:.4f} | {e2e} | {comp} | "
            f"{r.get('load_average', [float('nan')])[0]:.1f} |"
        )
    for imp in report.get("imports", {}).values():
        lines.append(f"\nimport jax, flax.nnx, optax: {imp['base_s']:.2f} s; then {', '.join(imp['modules'])}: "
                     f"+{imp['extra_s']:.2f} s (median of fresh processes, load avg {imp['load_average'][0]:.1f})")  # fmt: skip
    if report.get("scaling"):
        lines += ["", "| seeds in one program | compiled (s) | per seed (s) | peak RSS (MiB) | XLA temp (MiB) |",
                  "|---|---|---|---|---|"]  # fmt: skip
    for row in report.get("scaling", []):
        lines.append(
            f"| {row['seeds']} | {row['compiled_s']:.1f} | {row['per_seed_s']:.2f} | {row['peak_rss_mib']:.0f} | "
            f"{row['xla_temp_mib']:.1f} |"
        )
    return "\n".join(lines)


def _machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


if __name__ == "__main__":
    main()
