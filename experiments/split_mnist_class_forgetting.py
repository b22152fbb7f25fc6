"""Split MNIST, class-incremental: naive fine-tuning against joint training (notebook 01's split panels).

Command:  nestlearn run split_mnist_class_forgetting          (--quick: 3 tasks, 2 seeds)
Runtime:  about 1 minute on 2 CPU cores (compilation included); --quick about 20 seconds.
Produces: figures/forgetting_curves.{pdf,png}, figures/average_accuracy.{pdf,png},
          figures/accuracy_matrix_{naive,joint}.{pdf,png}; results/*.csv and one .npz per strategy.
Setup:    the bundled 5,000-image MNIST (4,000 train / 1,000 test, stratified, seed 0), 5 tasks of two
          digits each ({0,1}, {2,3}, ...) in the class-incremental scenario of van de Ven et al. (2022),
          MLP 784-256-256 ReLU, SGD lr 0.01 momentum 0.9, batch 64, 5 epochs per task, seeds 0-4.
"""

from nestlearn.experiment import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainSpec

CONFIG = ExperimentConfig(
    data=DataConfig(stream="split_mnist", scenario="class", n_tasks=5),
    model=ModelConfig(hidden=(256, 256)),
    optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
    train=TrainSpec(epochs=5.0, batch_size=64, evals_per_task=5),
    strategies=("naive", "joint"),
    seeds=5,
)

QUICK = ["data.n_tasks=3", "train.epochs=1", "seeds=2"]
