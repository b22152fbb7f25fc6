import time

T0 = time.perf_counter()

# Imports deliberately follow the timer start and the torch thread settings.
#
# Avalanche 0.6 peer for the nestlearn benchmark.
#
# Builds an Avalanche benchmark from the driver's tensors (one experience per
# task, task label 0 everywhere, i.e. one shared head) and trains it with
# Avalanche's own strategy (``Naive`` by default; ``EWC`` and ``Replay`` on
# request), evaluating with Avalanche's ``EvaluationPlugin`` on the whole test
# stream after every experience.
#
# Workload (the same as torch_loop.py): 784-256-256-10 ReLU MLP, cross-entropy,
# SGD lr 0.01 momentum 0.9, batch 64, 2 epochs per experience, eval batch 1000,
# device cpu.
#
# Optimizer state: Avalanche 0.6 does NOT reset the optimizer between
# experiences by default. Before each experience the strategy calls
# ``check_model_and_optimizer`` -> ``make_optimizer(reset_optimizer_state=False)``
# (``avalanche.training.templates.observation_type.batch_observation``), which
# only re-registers the model's parameters with the existing optimizer; the
# momentum buffers are cleared only on the very first call (when they are still
# empty). So one SGD optimizer with its momentum carries over all experiences,
# and torch_loop.py does the same.
#
# Usage::
#
#     python benchmarks/peers/avalanche_naive.py --data DATA.npz --seeds 5 --out RESULT.json \
#         [--threads 2] [--strategy naive|ewc|replay] [--ewc-lambda L] [--mem-size K]

import argparse
import json
import os
import random
import re
import sys
import tempfile


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description="Avalanche 0.6 peer (Naive / EWC / Replay).")
    p.add_argument("--data", required=True, help="npz with train_x, train_y, test_x, test_y")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, run as 0..S-1")
    p.add_argument("--out", required=True, help="path of the result JSON")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--strategy", choices=("naive", "ewc", "replay"), default="naive")
    p.add_argument("--ewc-lambda", type=float, default=None, help="EWC penalty weight (--strategy ewc)")
    p.add_argument("--mem-size", type=int, default=None, help="replay buffer size (--strategy replay)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.strategy == "ewc" and args.ewc_lambda is None:
        p.error("--strategy ewc needs --ewc-lambda")
    if args.strategy == "replay" and (args.mem_size is None or args.mem_size < 1):
        p.error("--strategy replay needs --mem-size >= 1")
    return args


ARGS = _parse_args()

import torch

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)

import avalanche
import numpy as np
from avalanche.benchmarks import tensors_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import BaseLogger
from avalanche.training import EWC, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

N_CLASSES = 10
HIDDEN = 256
LR = 0.01
MOMENTUM = 0.9
BATCH = 64
EPOCHS = 2
EVAL_BATCH = 1000

# e.g. "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp003"
_EXP_ACC = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")


class SilentLogger(BaseLogger):
    """A logger that receives the metric values and prints nothing."""


def load_data(path):
    """Load the driver's npz and return torch tensors (x float32, y int64)."""
    with np.load(path) as z:
        missing = {"train_x", "train_y", "test_x", "test_y"} - set(z.files)
        if missing:
            raise SystemExit(f"{path}: missing keys {sorted(missing)}")
        arrs = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    tx, ty, vx, vy = arrs["train_x"], arrs["train_y"], arrs["test_x"], arrs["test_y"]
    if tx.ndim != 3 or vx.ndim != 3 or ty.ndim != 2 or vy.ndim != 2:
        raise SystemExit("expected train_x/test_x [T, N, D] and train_y/test_y [T, N]")
    if not (tx.shape[:2] == ty.shape and vx.shape[:2] == vy.shape and tx.shape[0] == vx.shape[0]):
        raise SystemExit(f"inconsistent shapes: {tx.shape} {ty.shape} {vx.shape} {vy.shape}")
    for y in (ty, vy):
        if y.min() < 0 or y.max() >= N_CLASSES:
            raise SystemExit(f"labels must lie in [0, {N_CLASSES})")
    return (
        torch.from_numpy(np.ascontiguousarray(tx, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(ty, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(vx, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(vy, dtype=np.int64)),
    )


def build_benchmark(train_x, train_y, test_x, test_y):
    """One experience per task; task label 0 for all (domain-incremental, one shared head)."""
    n_tasks = train_x.shape[0]
    return tensors_benchmark(
        train_tensors=[(train_x[t], train_y[t]) for t in range(n_tasks)],
        test_tensors=[(test_x[t], test_y[t]) for t in range(n_tasks)],
        task_labels=[0] * n_tasks,
    )


def make_model(in_dim):
    # Same construction order as torch_loop.py, so a seed gives the same initial weights.
    return nn.Sequential(
        nn.Linear(in_dim, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, N_CLASSES),
    )


def warm_up_lazy_imports():
    """Pay torch's one-off lazy imports (the first optimizer construction imports torch._dynamo,
    ~1.5 s) during setup, so they are not billed to the first seed's train_seconds."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=LR, momentum=MOMENTUM)
    p.sum().backward()
    opt.step()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_strategy(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        loggers=[SilentLogger()],
        collect_all=False,
    )
    common = dict(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=EPOCHS,
        eval_mb_size=EVAL_BATCH,
        device=ARGS.device,
        evaluator=evaluator,
    )
    if ARGS.strategy == "ewc":
        return EWC(ewc_lambda=ARGS.ewc_lambda, **common)
    if ARGS.strategy == "replay":
        return Replay(mem_size=ARGS.mem_size, **common)
    return Naive(**common)


def exp_accuracies(metrics, n_tasks):
    """Per-experience test accuracies from ``strategy.eval``'s last-metrics dict."""
    row = [None] * n_tasks
    for name, value in metrics.items():
        m = _EXP_ACC.match(name)
        if m is not None:
            row[int(m.group(1))] = float(value)
    if any(v is None for v in row):
        raise RuntimeError(f"missing per-experience accuracies in {sorted(metrics)}")
    return row


def run_seed(seed, benchmark, n_tasks, in_dim):
    seed_everything(seed)
    model = make_model(in_dim)
    strategy = make_strategy(model)
    acc = []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        acc.append(exp_accuracies(strategy.eval(benchmark.test_stream), n_tasks))
    return acc


def write_json_atomic(path, obj):
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main():
    train_x, train_y, test_x, test_y = load_data(ARGS.data)
    n_tasks, in_dim = train_x.shape[0], train_x.shape[2]
    benchmark = build_benchmark(train_x, train_y, test_x, test_y)
    warm_up_lazy_imports()
    setup_seconds = time.perf_counter() - T0

    acc_matrix, final_avg, train_seconds = [], [], []
    for s in range(ARGS.seeds):
        t = time.perf_counter()
        acc = run_seed(s, benchmark, n_tasks, in_dim)
        train_seconds.append(time.perf_counter() - t)
        acc_matrix.append(acc)
        final_avg.append(float(np.mean(acc[-1])))
        print(
            f"[avalanche/{ARGS.strategy}] seed {s}: final_avg_acc={final_avg[-1]:.4f} "
            f"train_seconds={train_seconds[-1]:.2f}",
            file=sys.stderr,
            flush=True,
        )

    strategy_info = {"name": ARGS.strategy}
    if ARGS.strategy == "ewc":
        strategy_info["ewc_lambda"] = ARGS.ewc_lambda
    if ARGS.strategy == "replay":
        strategy_info["mem_size"] = ARGS.mem_size
    result = {
        "peer": f"avalanche-{avalanche.__version__}",
        "strategy": strategy_info,
        "torch_version": torch.__version__,
        "threads": ARGS.threads,
        "seeds": ARGS.seeds,
        "acc_matrix": acc_matrix,
        "final_avg_acc": final_avg,
        "train_seconds": train_seconds,
        "setup_seconds": setup_seconds,
        "total_seconds": time.perf_counter() - T0,
        # Wall-clock time (time.time()) just before writing; the driver measures end to end up to it.
        "results_written_at": time.time(),
    }
    write_json_atomic(ARGS.out, result)


if __name__ == "__main__":
    main()
