import time

T0 = time.perf_counter()

# Imports deliberately follow the timer start and the torch thread settings.
#
# Plain-PyTorch reference peer for the nestlearn benchmark.
#
# Runs the same workload as ``avalanche_naive.py --strategy naive`` without any
# continual-learning library: a 784-256-256-10 ReLU MLP trained on each task in
# turn with SGD (lr 0.01, momentum 0.9), batch 64, 2 epochs per task, and
# evaluated on the test sets of all tasks after every task.
#
# One optimizer is built per seed and is never reset between tasks: Avalanche
# 0.6's ``Naive`` keeps the optimizer state (the momentum buffers) across
# experiences by default (``make_optimizer(reset_optimizer_state=False)`` is what
# it calls before each experience; only the very first call resets the then
# empty state), so this loop does the same and the two peers run the same
# algorithm.
#
# Usage::
#
#     python benchmarks/peers/torch_loop.py --data DATA.npz --seeds 5 --out RESULT.json [--threads 2]

import argparse
import json
import os
import random
import sys
import tempfile


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description="Plain PyTorch reference loop (continual-learning peer).")
    p.add_argument("--data", required=True, help="npz with train_x, train_y, test_x, test_y")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, run as 0..S-1")
    p.add_argument("--out", required=True, help="path of the result JSON")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


ARGS = _parse_args()

import torch

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)

import numpy as np
from torch import nn

N_CLASSES = 10
HIDDEN = 256
LR = 0.01
MOMENTUM = 0.9
BATCH = 64
EPOCHS = 2
EVAL_BATCH = 1000


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
    return tuple(
        torch.from_numpy(np.ascontiguousarray(a, dtype=dt)).to(ARGS.device)
        for a, dt in ((tx, np.float32), (ty, np.int64), (vx, np.float32), (vy, np.int64))
    )


def make_model(in_dim):
    # Same construction order as avalanche_naive.py, so a seed gives the same initial weights.
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


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], EVAL_BATCH):
        pred = model(x[i : i + EVAL_BATCH]).argmax(dim=1)
        correct += int((pred == y[i : i + EVAL_BATCH]).sum())
    return correct / x.shape[0]


def run_seed(seed, train_x, train_y, test_x, test_y):
    n_tasks, n_train = train_x.shape[0], train_x.shape[1]
    seed_everything(seed)
    model = make_model(train_x.shape[2]).to(ARGS.device)
    # One optimizer for the whole run; its momentum state is kept across tasks (as Avalanche's Naive).
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    acc = [[0.0] * n_tasks for _ in range(n_tasks)]
    for i in range(n_tasks):
        xi, yi = train_x[i], train_y[i]
        model.train()
        for _ in range(EPOCHS):
            perm = torch.randperm(
                n_train, device=ARGS.device
            )  # reshuffled each epoch; last partial batch kept
            for b in range(0, n_train, BATCH):
                idx = perm[b : b + BATCH]
                opt.zero_grad()
                loss = loss_fn(model(xi[idx]), yi[idx])
                loss.backward()
                opt.step()
        for j in range(n_tasks):
            acc[i][j] = evaluate(model, test_x[j], test_y[j])
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
    warm_up_lazy_imports()
    setup_seconds = time.perf_counter() - T0

    acc_matrix, final_avg, train_seconds = [], [], []
    for s in range(ARGS.seeds):
        t = time.perf_counter()
        acc = run_seed(s, train_x, train_y, test_x, test_y)
        if ARGS.device != "cpu":
            torch.cuda.synchronize()
        train_seconds.append(time.perf_counter() - t)
        acc_matrix.append(acc)
        final_avg.append(float(np.mean(acc[-1])))
        print(
            f"[torch-loop] seed {s}: final_avg_acc={final_avg[-1]:.4f} train_seconds={train_seconds[-1]:.2f}",
            file=sys.stderr,
            flush=True,
        )

    result = {
        "peer": "torch-loop",
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
