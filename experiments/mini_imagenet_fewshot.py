"""mini-ImageNet 5-way 1-shot and 5-shot with Conv-4: MAML, first-order MAML, ANIL, Reptile and Meta-SGD.

Command:  nestlearn run mini_imagenet_fewshot --set data_root=~/data/mini-imagenet
          [--set shots=1 --set methods=maml,fomaml --set seeds=0,1,2 --set n_iters=60000] [--quick] [--resume]
          (data_root holds train/, val/ and test/, each <wnid>/*.jpg, Ravi & Larochelle's split; --quick: a
          synthetic mini-ImageNet of 16/4/8 classes written as JPEGs into the run directory, read at 32x32,
          200 meta-iterations, 100 test tasks, 3 seeds)
Runtime:  full size (60,000 meta-iterations x 5 methods x 2 shots, 3 seeds, 84x84 images, second-order
          MAML through 5 steps) is GPU work. --quick is compile-bound on a CPU: it took 62 minutes on 2
          CPU cores shared with two other --quick runs (2026-12-07).
Produces: results/accuracy.npz, results/per_seed.csv, results/table.csv (mean ± s.e.m. over seeds, mean
          per-seed 95 % CI, the published number and its source, "data" and "comparable" columns),
          figures/mini_imagenet_fewshot.{pdf,png}.
Setup:    Finn et al. 2017 (MAML), mini-ImageNet: 64 meta-training and 20 meta-test classes of 600
          84x84 images (tasks.mini_imagenet_few_shot), normalised per channel; 5-way, K = 1 or 5 support
          and 15 query images per class; Conv-4 with 32 filters and BatchNorm (nn.Conv4); 5 inner SGD steps
          at 0.01 during meta-training, 10 at meta-test; meta-batch 4 (the paper: 4 tasks at 1-shot, 2 at
          5-shot; set meta_batch=2 for the latter); Adam 1e-3; 60,000 meta-iterations; BatchNorm in train
          mode. ANIL, Meta-SGD and Reptile as in omniglot_fewshot (Meta-SGD's rates start at 0.01; Reptile
          anneals its outer SGD step from 1 to 0). Meta-test: 600 tasks from the test classes, the same for
          every method and seed; mean ± 95 % CI per seed, then mean ± s.e.m. over seeds.
Published (5-way, accuracy %, 1-shot / 5-shot):
          MAML              48.70 ± 1.84 / 63.11 ± 0.92   Finn et al. 2017, Table 1 (bottom)
          first-order MAML  48.07 ± 1.75 / 63.15 ± 0.91   Finn et al. 2017, Table 1 (bottom)
          Reptile           49.97 ± 0.32 / 65.99 ± 0.58   Nichol et al. 2018, Table 1, Reptile + transduction
                            (their non-transductive row: 47.07 ± 0.26 / 62.74 ± 0.37)
          Meta-SGD          50.47 ± 1.87 / 64.03 ± 0.94   Li et al. 2017 (table number not checked)
          ANIL              46.7 ± 0.4   / 61.5 ± 0.5     Raghu et al. 2020, Table 2 (± is the s.d. over 3 seeds)
          Checked against full-text copies of the papers: MAML and first-order MAML (arXiv 1703.03400v3:
          one Table 1, Omniglot on top, MiniImagenet below; its Table 2 is sinusoid regression) and ANIL
          (arXiv 1909.09157, ICLR 2020). Not read in the papers themselves, so marked "recalled, unverified"
          in results/table.csv: Reptile (the latest arXiv 1803.02999; its v1 has other numbers; the values
          agree in three independent copies of Table 1) and Meta-SGD (arXiv 1707.09835; the values agree with
          those later papers quote).
Synthetic: ``synthetic=true`` (and ``--quick``) writes random colour patterns as 84x84 JPEGs in the
          train/val/test layout (experiments/_image_data.py) and loads them with tasks.load_mini_imagenet;
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

CONFIG = FewShotConfig(dataset="mini_imagenet", meta_batch=4, inner_lr=0.01, inner_steps=5, test_steps=10,
                       width=32, image_size=84, synthetic_classes=(16, 4, 8), synthetic_per_class=30)  # fmt: skip
QUICK = ["synthetic=true", "n_iters=200", "chunk=100", "image_size=32", "inner_steps=2", "test_steps=5",
         "k_query=5", "test_tasks=100", "inner_lr=0.1", "seeds=0,1,2"]  # fmt: skip

# (method, shot): (accuracy %, 95 % CI, source)
PUBLISHED = {
    ("maml", 1): (48.70, 1.84, "Finn et al. 2017, Table 1 (checked: full-text copy of arXiv 1703.03400v3)"),
    ("maml", 5): (63.11, 0.92, "Finn et al. 2017, Table 1 (checked: full-text copy of arXiv 1703.03400v3)"),
    ("fomaml", 1): (48.07, 1.75, "Finn et al. 2017, Table 1 (checked: full-text copy of arXiv 1703.03400v3)"),
    ("fomaml", 5): (63.15, 0.91, "Finn et al. 2017, Table 1 (checked: full-text copy of arXiv 1703.03400v3)"),
    ("reptile", 1): (49.97, 0.32, "Nichol et al. 2018, Table 1, transductive (recalled, unverified)"),
    ("reptile", 5): (65.99, 0.58, "Nichol et al. 2018, Table 1, transductive (recalled, unverified)"),
    ("metasgd", 1): (50.47, 1.87, "Li et al. 2017 (recalled, unverified)"),
    ("metasgd", 5): (64.03, 0.94, "Li et al. 2017 (recalled, unverified)"),
    ("anil", 1): (
        46.7,
        0.4,
        "Raghu et al. 2020, Table 2, ± = s.d. over 3 seeds (checked: copy of arXiv 1909.09157)",
    ),
    ("anil", 5): (
        61.5,
        0.5,
        "Raghu et al. 2020, Table 2, ± = s.d. over 3 seeds (checked: copy of arXiv 1909.09157)",
    ),
}


def run(config, rundir) -> None:
    """Meta-trains and meta-tests every (method, shot); see the module docstring."""
    fewshot.run(config, rundir, PUBLISHED)
