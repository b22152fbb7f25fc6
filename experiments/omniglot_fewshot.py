"""Omniglot 5-way 1-shot and 5-shot with Conv-4: MAML, first-order MAML, ANIL, Reptile and Meta-SGD.

Command:  nestlearn run omniglot_fewshot --set data_root=~/data/omniglot
          [--set shots=1 --set methods=maml,anil --set seeds=0,1,2 --set n_iters=60000] [--quick] [--resume]
          (data_root holds the unzipped images_background/ and images_evaluation/; --quick: a synthetic
          Omniglot of 40 characters written as PNGs into the run directory, 300 meta-iterations, 100
          test tasks, 3 seeds)
Runtime:  full size (60,000 meta-iterations x 5 methods x 2 shots, 3 seeds) is GPU work; --quick is
          compile-bound on a CPU (two programs per method and shot, second-order through Conv-4): it
          took 72 minutes on 2 CPU cores shared with two other --quick runs (2026-12-07).
Produces: results/accuracy.npz (per-task test accuracies and meta-training curves per method, shot and
          seed), results/per_seed.csv, results/table.csv (mean ± s.e.m. over seeds, the mean per-seed 95 %
          confidence interval over the test tasks, the published number and its source, and "data" and
          "comparable" columns: synthetic runs say so), figures/omniglot_fewshot.{pdf,png}.
Setup:    Finn et al. 2017 (MAML), Omniglot: 1,623 characters resized to 28x28, 1,200 characters
          meta-train and 423 meta-test (tasks.omniglot_few_shot), every class also rotated by 90/180/270
          degrees; 5-way, K = 1 or 5 support and 15 query images per class; Conv-4 with 64 filters and
          BatchNorm (nn.Conv4: max-pooling, where MAML's Omniglot network uses stride-2 convolutions);
          one inner SGD step at 0.4 during meta-training, 3 at meta-test (a config field); meta-batch 32;
          Adam 1e-3; 60,000 meta-iterations; BatchNorm in train mode on each set, as MAML does. ANIL adapts
          only the head. Meta-SGD learns one inner rate per parameter, initialised at 0.4. Reptile uses the
          same inner loop (SGD 0.4, ``inner_steps``) with an outer SGD step annealed linearly from 1 to 0
          (Nichol et al. 2018 anneal the outer step; their inner loop is Adam, not reproduced here).
          Meta-test: 600 tasks from the held-out characters, the same for every method and seed; accuracy
          mean ± 95 % CI (1.96 s/sqrt(n)) per seed, then mean ± s.e.m. over seeds.
Published (5-way, accuracy %, 1-shot / 5-shot):
          MAML              98.7 ± 0.4   / 99.9 ± 0.1    Finn et al. 2017, Table 1 (top)
          first-order MAML  98.3 ± 0.5   / 99.2 ± 0.2    Nichol et al. 2018, Table 2, 1st-order MAML + transduction
          Reptile           97.68 ± 0.04 / 99.48 ± 0.06  Nichol et al. 2018, Table 2, Reptile + transduction
                            (their non-transductive row: 95.39 ± 0.09 / 98.90 ± 0.10)
          Meta-SGD          99.53 ± 0.26 / 99.93 ± 0.09  Li et al. 2017 (table number not checked)
          ANIL              none at 5-way (Raghu et al. 2020, Table 2, report 20-way Omniglot only)
          Checked against full-text copies of the papers: MAML (arXiv 1703.03400v3; its Table 1 has no
          first-order Omniglot row, its first-order row is mini-ImageNet only) and ANIL (arXiv 1909.09157,
          ICLR 2020). Not read in the papers themselves, so marked "recalled, unverified" in results/table.csv:
          first-order MAML and Reptile (the latest arXiv 1803.02999; its v1 has other Reptile numbers; the
          values agree in three independent copies of Table 2) and Meta-SGD (arXiv 1707.09835; the values agree
          with those later papers quote).
Synthetic: ``synthetic=true`` (and ``--quick``) writes random stroke patterns as 105x105 PNGs in
          Omniglot's folder layout (experiments/_image_data.py) and loads them with tasks.load_omniglot;
          every log line, table row and figure title says "synthetic".
Resume:   a finished (method, shot) is kept (results/parts/); meta-training resumes at its last chunk.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load(name: str):
    """A helper file next to this one (experiment files are imported by path, not as a package)."""
    key = f"nestlearn_experiment_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


fewshot = _load("_fewshot")
FewShotConfig = fewshot.FewShotConfig

CONFIG = FewShotConfig(dataset="omniglot", meta_batch=32, inner_lr=0.4, inner_steps=1, test_steps=3,
                       width=64, image_size=28, n_train_classes=1200)  # fmt: skip
QUICK = ["synthetic=true", "n_iters=300", "chunk=150", "meta_batch=8", "k_query=5", "width=32",
         "test_tasks=100", "seeds=0,1,2"]  # fmt: skip

# (method, shot): (accuracy %, 95 % CI, source)
PUBLISHED = {
    ("maml", 1): (98.7, 0.4, "Finn et al. 2017, Table 1 (checked: full-text copy of arXiv 1703.03400v3)"),
    ("maml", 5): (99.9, 0.1, "Finn et al. 2017, Table 1 (checked: full-text copy of arXiv 1703.03400v3)"),
    ("fomaml", 1): (
        98.3,
        0.5,
        "Nichol et al. 2018, Table 2, 1st-order MAML + transduction (recalled, unverified)",
    ),
    ("fomaml", 5): (
        99.2,
        0.2,
        "Nichol et al. 2018, Table 2, 1st-order MAML + transduction (recalled, unverified)",
    ),
    ("reptile", 1): (97.68, 0.04, "Nichol et al. 2018, Table 2, transductive (recalled, unverified)"),
    ("reptile", 5): (99.48, 0.06, "Nichol et al. 2018, Table 2, transductive (recalled, unverified)"),
    ("metasgd", 1): (99.53, 0.26, "Li et al. 2017 (recalled, unverified)"),
    ("metasgd", 5): (99.93, 0.09, "Li et al. 2017 (recalled, unverified)"),
}


def run(config, rundir) -> None:
    """Meta-trains and meta-tests every (method, shot); see the module docstring."""
    fewshot.run(config, rundir, PUBLISHED)
