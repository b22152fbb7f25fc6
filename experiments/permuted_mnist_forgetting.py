"""Permuted MNIST forgetting curves: naive fine-tuning against joint training (the upper bound).

Command:  nestlearn run permuted_mnist_forgetting          (--quick for a 3-task, 2-seed version)
Runtime:  about 1-2 minutes on 2 CPU cores (compilation included); --quick about 20 seconds.
Produces: figures/forgetting_curves.{pdf,png} (accuracy on each task over training, mean ± s.e.m. over
          5 seeds, task boundaries dashed), figures/average_accuracy.{pdf,png} (naive vs joint),
          figures/accuracy_matrix_{naive,joint}.{pdf,png}; results/accuracy_matrix.csv, curves.csv,
          summary.csv (ACC, BWT, FWT, forgetting in four conventions) and one .npz per strategy.
Setup:    the bundled 5,000-image MNIST (4,000 train / 1,000 test, stratified, seed 0), 10 tasks each with
          its own pixel permutation, MLP 784-256-256-10 ReLU with one shared head, SGD lr 0.01 momentum
          0.9, batch 64, 2 epochs per task, every task evaluated 5 times per task, seeds 0-4.
"""

from nestlearn.experiment import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainSpec

CONFIG = ExperimentConfig(
    data=DataConfig(stream="permuted_mnist", n_tasks=10, seed=0),
    model=ModelConfig(hidden=(256, 256)),
    optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
    train=TrainSpec(epochs=2.0, batch_size=64, evals_per_task=5),
    strategies=("naive", "joint"),
    seeds=5,
)

QUICK = ["data.n_tasks=3", "train.epochs=0.5", "seeds=2"]
