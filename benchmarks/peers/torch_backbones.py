import time

T0 = time.perf_counter()

# Plain-PyTorch peer of benchmarks/backbones.py: training steps per second of the reduced ResNet-18 and
# the Conv-4 in a hand-written loop (forward, cross-entropy, backward, SGD with momentum), train-mode
# BatchNorm, batches of 32 drawn from a random permutation of in-memory tensors, torch limited to
# --threads intra-op threads. The networks are written here to match nestlearn.nn.ResNet18 / Conv4
# (same layers, same parameter counts, which the script checks and reports).
#
# Usage::
#
#     python benchmarks/peers/torch_backbones.py --workloads resnet18,conv4_omniglot --out RESULT.json

import argparse
import json
import statistics


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description="Plain PyTorch training-step throughput of the conv backbones.")
    p.add_argument("--workloads", required=True, help="comma-separated names (see WORKLOADS)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=7, help="timed blocks (the median is reported)")
    p.add_argument("--pool", type=int, default=512, help="in-memory examples the batches are drawn from")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


ARGS = _parse_args()

import torch

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)

from torch import nn

# name: (height, width, channels, classes, kind, width or nf)
WORKLOADS = {
    "resnet18": (32, 32, 3, 10, "resnet", 20),
    "conv4_omniglot": (28, 28, 1, 5, "conv4", 64),
    "conv4_miniimagenet": (84, 84, 3, 5, "conv4", 32),
}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """GEM's reduced ResNet-18 (nf=20): 3x3 stem, no max-pool, [2, 2, 2, 2] basic blocks, global pool."""

    def __init__(self, channels, n_classes, nf):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, cin = [], nf
        for stage in range(4):
            cout = nf * 2**stage
            for b in range(2):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, n_classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(out.mean((2, 3)))


def conv4(channels, side, n_classes, width):
    blocks, cin = [], channels
    for _ in range(4):
        blocks += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        cin = width
        side //= 2
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(side * side * width, n_classes))


def measure(name):
    h, w, c, n_classes, kind, width = WORKLOADS[name]
    torch.manual_seed(0)
    model = ResNet18(c, n_classes, width) if kind == "resnet" else conv4(c, h, n_classes, width)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=ARGS.lr, momentum=0.9)
    x = torch.rand(ARGS.pool, c, h, w)
    y = torch.randint(0, n_classes, (ARGS.pool,))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(ARGS.pool, generator=gen)
    pos = 0

    def step():
        nonlocal perm, pos
        if pos + ARGS.batch > ARGS.pool:
            perm, pos = torch.randperm(ARGS.pool, generator=gen), 0
        idx = perm[pos : pos + ARGS.batch]
        pos += ARGS.batch
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    for _ in range(ARGS.steps):  # warm-up block (allocator, kernels)
        loss = step()
    warmup = time.perf_counter() - start
    rates = []
    for _ in range(ARGS.blocks):
        start = time.perf_counter()
        for _ in range(ARGS.steps):
            loss = step()
        loss.item()
        rates.append(ARGS.steps / (time.perf_counter() - start))
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps_per_s": statistics.median(rates),
        "block_steps_per_s": rates,
        "warmup_block_s": warmup,
        "final_loss": float(loss),
    }


def main():
    results = {name: measure(name) for name in ARGS.workloads.split(",")}
    out = {
        "peer": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "results": results,
        "process_s": time.perf_counter() - T0,
    }
    with open(ARGS.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
